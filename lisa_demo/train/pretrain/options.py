"""The pretraining recipe's settings and their flags of `python -m lisa_demo.train`.

None of them is in LISA. They all default to off, and then a run is LISA's loop alone.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from lisa_demo.config import ConfigError


@dataclass
class PretrainOptions:
    """The from-scratch recipe of the bundled tiny model (see lisa_demo.train.pretrain)."""

    # Encoder warm-ups before the LISA loop (--train-all; synthetic scenes).
    vision_warmup_minutes: float = 0.0  # CLIP learns to label its patches first
    sam_warmup_minutes: float = 0.0  # SAM learns to segment from a click first
    vision_warmup_lr: float = 1e-3  # peak learning rates of the two warm-ups (cosine over
    sam_warmup_lr: float = 1e-3  # each one's minutes)
    warmup_images: int = 0  # the warm-ups draw from the first N training images; 0 = all
    # Loss terms added to LISA's in the loop, with their weights (0 = off).
    seg_words: float = 0.0  # a training-only head: each [SEG] state predicts its explanation
    point: float = 0.0  # SAM also segments each target from a click inside it (BCE + Dice)
    prompt: float = 0.0  # MSE pulling each [SEG] prompt towards that click's prompt
    target: float = 0.0  # each [SEG] state names its target; its prompt -> the description's
    pointing: float = 0.0  # attention of the last layer's head 0 at [SEG] on the target

    def __post_init__(self) -> None:
        for name in ("vision_warmup_minutes", "sam_warmup_minutes", "warmup_images"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
        for name in ("vision_warmup_lr", "sam_warmup_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
        for name in LOSS_TERMS:
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise ConfigError(f"loss weight {name} must be >= 0, got {getattr(self, name)}")

    @property
    def warms_up(self) -> bool:
        return bool(self.vision_warmup_minutes or self.sam_warmup_minutes)

    @property
    def active(self) -> bool:
        """Whether the recipe adds anything to a run."""
        return self.warms_up or any(getattr(self, name) for name in LOSS_TERMS)

    def replace(self, **changes: object) -> PretrainOptions:
        return dataclasses.replace(self, **changes)


LOSS_TERMS = ("seg_words", "point", "prompt", "target", "pointing")


def add_arguments(p: argparse.ArgumentParser, add) -> None:
    """The recipe's flags; `add(parser, name, **kwargs)` registers both spellings."""
    add(
        p,
        "seg-word-weight",
        type=float,
        default=0.0,
        help="not in LISA: a training-only head makes each mask query state predict the "
        "explanation's words (for training from scratch)",
    )
    add(
        p,
        "point-weight",
        type=float,
        default=0.0,
        help="not in LISA, for training from scratch: SAM also segments each target from a "
        "click inside it (BCE + Dice with the mask weights, times this)",
    )
    add(
        p,
        "prompt-weight",
        type=float,
        default=0.0,
        help="not in LISA, for training from scratch: MSE pulling each [SEG] prompt towards "
        "SAM's prompt for a click inside the target",
    )
    add(
        p,
        "target-weight",
        type=float,
        default=0.0,
        help="not in LISA, for training from scratch on synthetic scenes: each [SEG] state "
        "predicts its target's kind, colour, size and region (a training-only head), and its "
        "prompt is pulled towards the description prompt SAM learned in the SAM warm-up",
    )
    add(
        p,
        "pointing-weight",
        type=float,
        default=0.0,
        help="not in LISA, for training from scratch: the first attention head of the language "
        "model's last layer, at each [SEG] query, learns to attend to its target's image "
        "patches",
    )
    add(
        p,
        "warmup-images",
        type=int,
        default=0,
        help="the encoder warm-ups draw from the first N training images only (0 = all): a "
        "time-budgeted warm-up spends its first pass decoding every image it meets, so a large "
        "set leaves it fewer steps",
    )
    add(
        p,
        "vision-warmup-minutes",
        type=float,
        default=0.0,
        help="--train-all, not in LISA: first train CLIP for this long to label its patches "
        "(kind, colour, size of the object under each; synthetic scenes)",
    )
    add(
        p,
        "sam-warmup-minutes",
        type=float,
        default=0.0,
        help="--train-all, not in LISA: first train SAM for this long to segment each target "
        "from a click inside it",
    )
    add(
        p,
        "vision-warmup-lr",
        type=float,
        default=PretrainOptions.vision_warmup_lr,
        help="peak learning rate of the CLIP warm-up (AdamW, cosine over its minutes)",
    )
    add(
        p,
        "sam-warmup-lr",
        type=float,
        default=PretrainOptions.sam_warmup_lr,
        help="peak learning rate of the SAM warm-up (AdamW, cosine over its minutes)",
    )


def from_args(args: argparse.Namespace) -> PretrainOptions:
    return PretrainOptions(
        vision_warmup_minutes=args.vision_warmup_minutes,
        sam_warmup_minutes=args.sam_warmup_minutes,
        vision_warmup_lr=args.vision_warmup_lr,
        sam_warmup_lr=args.sam_warmup_lr,
        warmup_images=args.warmup_images,
        seg_words=args.seg_word_weight,
        point=args.point_weight,
        prompt=args.prompt_weight,
        target=args.target_weight,
        pointing=args.pointing_weight,
    )
