"""Training options: one typed dataclass, validated before any model is loaded, and its CLI.

Every flag is accepted in the dashed spelling (--max-train-samples) and the underscore
spelling of the LISA seed scripts (--max_train_samples).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from lisa_demo.config import (
    PRECISIONS,
    PRESETS,
    QUANTIZATIONS,
    ConfigError,
    LossWeights,
    ModelConfig,
    base_model_config,
)
from lisa_demo.data.synthetic import (
    DEFAULT_EXTRA_FAMILIES,
    EXTRA_FAMILIES,
    LOOK_ALIKE_SHARE,
    check_look_alikes,
)
from lisa_demo.paths import CHECKPOINT, FILE, FOLDER, MODEL, OUTPUT_FOLDER, check_paths
from lisa_demo.train import pretrain
from lisa_demo.train.pretrain import PretrainOptions

SCHEDULERS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
METRICS = ("giou", "ciou")
# The fine-tune's conservative defaults, chosen by the measured comparison in
# assets/tiny-lisa/README.md ("Choosing the fine-tune's defaults"): a full model's trained
# [SEG] projection and SAM mask decoder stay as they are, and the replay samples' [SEG] prompts
# are held near the base model's. Where the projection starts untrained (a base LLaVA preset,
# whose `heads` is None) or everything trains (--train-all), the mask side learns at the full
# rate.
FINE_TUNE_MASK_LR_SCALE = 0.0
TRAIN_ALL_MASK_LR_SCALE = 1.0
REPLAY_DISTILL = 3.0


@dataclass
class TrainConfig:
    """One training run."""

    output_dir: Path
    model: ModelConfig
    dataset: Path | None = None  # folder with train/ and val/ (ReasonSeg layout)
    synthetic: int = 0  # generate this many synthetic train scenes instead (val: a quarter)
    synthetic_seed: int = 0
    exclude_concept: str | None = None  # synthetic: leave this concept out
    focus_concept: str | None = None  # synthetic: every target has this concept
    synthetic_extra_queries: int = 0  # synthetic: more train samples per scene, other shapes
    synthetic_extra_families: tuple[str, ...] = DEFAULT_EXTRA_FAMILIES  # their query families
    look_alikes: tuple[str, ...] = ()  # synthetic: concepts the target is mistaken for
    look_alike_share: float = LOOK_ALIKE_SHARE  # synthetic: share of scenes showing one
    explanations: Path | None = None  # ReasonSeg explanations JSON: text after [SEG]
    synthetic_explanations: bool = False  # synthetic: answers also describe the target
    explanation_lead: float = 0.0  # share of explained answers that name the target before [SEG]
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0 = run the epochs
    max_minutes: float = 0.0  # wall-clock budget; 0 = none (stops like SIGTERM)
    schedule_by_time: bool = False  # the LR schedule also follows the time budget's clock
    batch_size: int = 2
    grad_accum: int = 1
    learning_rate: float = 3e-4
    # The [SEG] projection and SAM's mask decoder learn at this multiple of learning_rate;
    # None: FINE_TUNE_MASK_LR_SCALE for a fine-tune of a full model (trained heads),
    # TRAIN_ALL_MASK_LR_SCALE with --train-all or untrained heads.
    mask_lr_scale: float | None = None
    projector_lr_scale: float = 1.0  # LLaVA's projector (--train-projector), the same way
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | paged_adamw_8bit (bitsandbytes, 2 bytes of state/param)
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    max_train_samples: int = 0  # 0 = all
    max_val_samples: int = 0
    queries: str = "all"  # all paraphrases (LISA default here) | random: one per image/epoch
    num_workers: int = 0
    eval_every: int = 0  # optimizer steps between evaluations; 0 = once per epoch
    seg_rate_samples: int = 4  # generated answers checked for [SEG] at each evaluation
    log_every: int = 1
    patience: int = 0  # evaluations without improvement before stopping; 0 = never
    select_metric: str = "giou"
    save_best_only: bool = False
    resume: Path | None = None
    # Start from a checkpoint's weights (e.g. a run's checkpoints/warmed) with a fresh
    # optimizer, schedule and step count; unlike --resume, nothing of its run carries over.
    init_from: Path | None = None
    seed: int = 42
    embedding_cache_dir: Path | None = None  # on-disk SAM embedding cache (frozen encoder)
    no_embedding_cache: bool = False
    # Decoded, preprocessed training images kept in memory (LRU); past it, images decode again.
    image_store_size: int = 4096
    export_model: bool = False  # full training: also write OUT/model as a loadable base
    freeze_encoders: bool = False  # --train-all: the loop leaves both image encoders as they are
    save_warmed: bool = False  # write checkpoints/warmed between the warm-ups and the LISA loop
    # The from-scratch recipe (not in LISA; off by default): lisa_demo.train.pretrain.
    pretrain: PretrainOptions = field(default_factory=PretrainOptions)
    # Fine-tuning without forgetting (lisa_demo.train.replay): the share of each epoch drawn
    # from the base model's domain, where that comes from, and the retention loss that warns.
    replay_share: float = 0.5
    replay_dir: Path | None = None  # ReasonSeg folder of the base domain (train/ + val/)
    replay_scenes: int = 0  # synthetic replay scenes to generate; 0 = as many as new images
    retention_margin: float = 0.03  # gIoU the retention set may lose before the run warns
    # Weight of an MSE keeping the replay samples' [SEG] prompts at the base model's (the same
    # model with its LoRA adapters off): replay then keeps what the model did, not only what
    # the labels say. 0 = off.
    replay_distill: float = REPLAY_DISTILL
    # Retention images scored at each evaluation (0 = all there are). Per-image IoUs are
    # nearly all near 0 or near 0.85, so 100 images put the standard error of a difference
    # of gIoU around 0.02 and 40 around 0.04: below that, the margin would be noise.
    retention_samples: int = 100
    # Measure instead of train: start-up, one evaluation and a few steps, then the estimated
    # duration of the run as JSON (an "estimate" event); nothing is saved.
    estimate: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dataset is None and self.synthetic <= 0:
            raise ConfigError("give a dataset folder (--dataset DIR) or --synthetic N")
        if self.dataset is not None and self.synthetic > 0:
            raise ConfigError("use either --dataset or --synthetic, not both")
        if self.look_alikes and not self.synthetic:
            raise ConfigError("--look-alikes shapes synthetic scenes: it needs --synthetic N")
        try:
            self.look_alikes = check_look_alikes(
                self.look_alikes, self.look_alike_share, self.exclude_concept, self.focus_concept
            )
        except ValueError as error:
            raise ConfigError(f"--look-alikes: {error}") from None
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.mask_lr_scale is None:
            trained_heads = self.model.heads is not None and not self.model.train_all
            self.mask_lr_scale = (
                FINE_TUNE_MASK_LR_SCALE if trained_heads else TRAIN_ALL_MASK_LR_SCALE
            )
        for name in ("mask_lr_scale", "projector_lr_scale"):
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}"
                )
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("--epochs is 0 and no --max-steps: nothing to train")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        for name in (
            "max_steps",
            "warmup_steps",
            "max_train_samples",
            "max_val_samples",
            "eval_every",
            "patience",
            "num_workers",
            "weight_decay",
            "max_minutes",
            "synthetic_extra_queries",
            "replay_scenes",
            "retention_margin",
            "retention_samples",
            "replay_distill",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")  # fmt: skip
        if self.image_store_size < 1:
            raise ConfigError(f"--image-store-size must be at least 1, got {self.image_store_size}")
        if not 0.0 <= self.replay_share < 1.0:  # also refuses NaN
            raise ConfigError(f"--replay-share is a share in [0, 1), got {self.replay_share}")
        if self.replay_dir is not None and self.model.train_all:
            raise ConfigError("--replay-dir is for fine-tuning: drop it with --train-all")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {OPTIMIZERS}")
        if not 0.0 <= self.explanation_lead <= 1.0:
            raise ConfigError(
                f"--explanation-lead is a share between 0 and 1, got {self.explanation_lead}"
            )
        if self.schedule_by_time and not self.max_minutes:
            raise ConfigError("--schedule-by-time follows the time budget: add --max-minutes")
        if self.lr_scheduler not in SCHEDULERS:
            raise ConfigError(f"--lr-scheduler must be one of {SCHEDULERS}")
        if self.select_metric not in METRICS:
            raise ConfigError(f"--metric must be one of {METRICS}")
        if self.queries not in ("all", "random"):
            raise ConfigError("--queries must be all or random")
        warmups = self.pretrain.warms_up
        if self.init_from is not None and self.resume is not None:
            raise ConfigError("use either --resume (continue a run) or --init-from, not both")
        if self.init_from is not None and warmups:
            raise ConfigError(
                "--init-from starts from weights that are already trained: drop "
                "--vision-warmup-minutes and --sam-warmup-minutes"
            )
        if self.save_warmed and not warmups:
            raise ConfigError(
                "--save-warmed saves the weights the encoder warm-ups leave: add "
                "--vision-warmup-minutes or --sam-warmup-minutes"
            )
        if self.embedding_cache_dir is not None and (warmups or self.init_from is not None):
            raise ConfigError(
                "--embedding-cache-dir keys its files by the base model, but warmed-up or "
                "--init-from encoders are not the base model's: drop --embedding-cache-dir"
            )
        if (warmups or self.freeze_encoders) and not self.model.train_all:
            raise ConfigError(
                "--vision-warmup-minutes, --sam-warmup-minutes and --freeze-encoders are for "
                "pretraining from scratch: add --train-all"
            )

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        return _jsonable(out)


def _jsonable(value: object) -> object:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _add(parser: argparse.ArgumentParser, name: str, **kwargs: object) -> None:
    """Register --dashed-name and --underscored_name for one option."""
    flags = [f"--{name}"]
    if "-" in name:
        flags.append(f"--{name.replace('-', '_')}")
    parser.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lisa_demo.train",
        description="Fine-tune LISA (QLoRA LLaVA + SAM mask decoder) or pretrain the tiny model.",
    )
    _add(p, "dataset", type=Path, help="folder with train/ and val/ in the ReasonSeg layout")
    _add(p, "synthetic", type=int, default=0, help="generate N synthetic train scenes instead")
    _add(p, "synthetic-seed", type=int, default=0)
    _add(p, "exclude-concept", default=None, help="synthetic: leave a shape/colour word out")
    _add(p, "focus-concept", default=None, help="synthetic: every target has this concept")
    _add(
        p,
        "synthetic-extra-queries",
        type=int,
        default=0,
        metavar="K",
        help="synthetic: up to K more training samples per scene, each about another of its "
        "shapes (so that an image alone never tells the answer)",
    )
    _add(
        p,
        "synthetic-extra-families",
        nargs="+",
        default=list(DEFAULT_EXTRA_FAMILIES),
        choices=EXTRA_FAMILIES,
        metavar="FAMILY",
        help=f"synthetic: query families of those extra samples (some of "
        f"{', '.join(EXTRA_FAMILIES)}; default: {' '.join(DEFAULT_EXTRA_FAMILIES)})",
    )
    _add(
        p,
        "look-alikes",
        nargs="+",
        default=[],
        metavar="WORD",
        help="synthetic: kinds or colours the target is mistaken for (hard negatives); a "
        "share of the scenes shows one beside the target",
    )
    _add(
        p,
        "look-alike-share",
        type=float,
        default=LOOK_ALIKE_SHARE,
        metavar="P",
        help=f"synthetic: share of the scenes that show a look-alike (default {LOOK_ALIKE_SHARE})",
    )
    _add(
        p,
        "explanations",
        type=Path,
        default=None,
        help="JSON list of {image, query, outputs}: explanation text after [SEG]",
    )
    _add(
        p,
        "synthetic-explanations",
        action="store_true",
        help="synthetic: answers go on to name the target ('It is the small red star.')",
    )
    _add(
        p,
        "explanation-lead",
        type=float,
        default=0.0,
        help="share (0-1) of explained answers that name the target first, ending in [SEG]",
    )
    _add(p, "output-dir", type=Path, required=True)
    _add(
        p,
        "model",
        type=Path,
        default=None,
        help="full-model folder to fine-tune (assets/tiny-lisa, a converted LISA)",
    )
    _add(p, "preset", default=None, help=f"model preset (default tiny): {', '.join(PRESETS)}")
    _add(p, "llava", default=None, help="LLaVA Hub id or folder (overrides the preset)")
    _add(p, "sam", default=None, help="SAM Hub id or folder (overrides the preset)")
    _add(p, "quantization", choices=QUANTIZATIONS, default=None)
    _add(p, "precision", choices=PRECISIONS, default=None)
    _add(p, "use-lora", action=argparse.BooleanOptionalAction, default=None)
    _add(p, "lora-r", type=int, default=None)
    _add(p, "lora-alpha", type=int, default=None)
    _add(p, "lora-dropout", type=float, default=None)
    _add(p, "lora-targets", nargs="+", default=None, help="e.g. q_proj v_proj")
    _add(
        p,
        "train-tokens",
        nargs="+",
        default=None,
        metavar="WORD",
        help="words whose embedding and output rows train with LoRA (a new concept's name)",
    )
    _add(
        p,
        "train-projector",
        action="store_true",
        help="also train LLaVA's multimodal projector (frozen in LISA); the vision-feature "
        "cache is then off",
    )
    _add(p, "train-all", action="store_true", help="pretraining: every weight trains")
    _add(p, "gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    _add(
        p,
        "lean-token-rows",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train the [SEG] rows without peft's merged copies of embed_tokens and lm_head "
        "(same values, less GPU memory; default: the preset's, on for the 7B presets)",
    )
    _add(
        p,
        "vision-quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="hold CLIP's frozen vision tower in 8-bit or 4-bit (default: the preset's, 8bit "
        "for the 7B presets)",
    )
    _add(
        p,
        "offload-sam-encoder",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="encode every image first, then move SAM's image encoder off the GPU (default: "
        "the preset's, on for the 7B presets; needs the embedding cache)",
    )
    _add(p, "epochs", type=int, default=1)
    _add(p, "max-steps", type=int, default=0)
    _add(p, "max-minutes", type=float, default=0.0)
    _add(
        p,
        "schedule-by-time",
        action="store_true",
        help="with --max-minutes: the learning-rate schedule runs at the pace of whichever is "
        "further along, the steps or the time budget (from the LISA loop's start), so a run "
        "the budget stops ends its schedule however fast the machine is",
    )
    _add(p, "batch-size", type=int, default=2)
    _add(p, "grad-accum", type=int, default=1)
    _add(p, "learning-rate", type=float, default=3e-4)
    _add(
        p,
        "mask-lr-scale",
        type=float,
        default=TrainConfig.mask_lr_scale,
        help="the [SEG] projection and SAM's mask decoder learn at this multiple of the "
        "learning rate (the language model's LoRA and token rows at the rate itself); default "
        f"{FINE_TUNE_MASK_LR_SCALE:g} (they stay as they are) for a fine-tune of a full model "
        "(the bundled model, a converted LISA, a fine-tuned run), "
        f"{TRAIN_ALL_MASK_LR_SCALE:g} with --train-all or a base LLaVA preset (the projection "
        "starts untrained)",
    )
    _add(
        p,
        "projector-lr-scale",
        type=float,
        default=TrainConfig.projector_lr_scale,
        help="with --train-projector: LLaVA's projector learns at this multiple of the "
        "learning rate",
    )
    _add(p, "weight-decay", type=float, default=0.0)
    _add(
        p,
        "optimizer",
        choices=OPTIMIZERS,
        default="adamw",
        help="paged_adamw_8bit: bitsandbytes PagedAdamW8bit, 2 bytes of state per parameter",
    )
    _add(p, "lr-scheduler", choices=SCHEDULERS, default="linear")
    _add(p, "warmup-steps", type=int, default=0)
    _add(p, "max-grad-norm", type=float, default=1.0)
    _add(p, "max-train-samples", type=int, default=0)
    _add(p, "max-val-samples", type=int, default=0)
    _add(p, "queries", choices=("all", "random"), default="all")
    _add(p, "num-workers", type=int, default=0)
    _add(p, "eval-every", type=int, default=0)
    _add(p, "seg-rate-samples", type=int, default=4)
    _add(p, "log-every", type=int, default=1)
    _add(p, "patience", type=int, default=0)
    _add(p, "metric", choices=METRICS, default="giou", help="selects the best checkpoint")
    _add(p, "save-best-only", action="store_true")
    _add(p, "resume", type=Path, default=None, help="run folder or checkpoint to continue")
    _add(
        p,
        "init-from",
        type=Path,
        default=None,
        help="start from the weights of a checkpoint folder (or a run folder's "
        "checkpoints/warmed) with a fresh optimizer and schedule: e.g. try LISA-loop settings "
        "from the same warmed-up encoders, whatever the CPU's speed",
    )
    _add(p, "seed", type=int, default=42)
    _add(p, "ce-weight", type=float, default=1.0)
    _add(p, "bce-weight", type=float, default=2.0)
    _add(p, "dice-weight", type=float, default=0.5)
    _add(p, "iou-weight", type=float, default=0.0, help="train SAM's IoU head (not in LISA)")
    pretrain.options.add_arguments(p, _add)
    _add(p, "embedding-cache-dir", type=Path, default=None)
    _add(p, "no-embedding-cache", action="store_true")
    _add(
        p,
        "image-store-size",
        type=int,
        default=TrainConfig.image_store_size,
        help="decoded, preprocessed training images kept in memory (LRU; about 1.1 MB each on "
        "the tiny model). Set it to the number of training images when memory allows: past "
        "it, every epoch decodes and preprocesses images again",
    )
    _add(p, "export-model", action="store_true", help="full training: write OUT/model")
    _add(
        p,
        "freeze-encoders",
        action="store_true",
        help="--train-all: the LISA loop leaves CLIP (and its projector) and SAM's image "
        "encoder as the warm-ups left them and caches their outputs",
    )
    _add(
        p,
        "save-warmed",
        action="store_true",
        help="after the encoder warm-ups, also save checkpoints/warmed (every weight, before "
        "any LISA-loop step), for later runs to start from with --init-from",
    )
    _add(
        p,
        "replay-share",
        type=float,
        default=TrainConfig.replay_share,
        help="fine-tuning: the share (0 to <1) of each epoch's samples drawn from the base "
        "model's own domain, so that it keeps what it knew (0 = none)",
    )
    _add(
        p,
        "replay-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="fine-tuning: a ReasonSeg folder of the base model's domain; DIR/train is replayed "
        "and DIR/val is the retention set (the bundled model needs none: its synthetic scenes "
        "are generated)",
    )
    _add(
        p,
        "replay-scenes",
        type=int,
        default=0,
        help="synthetic replay scenes to generate for the bundled model (0 = as many as the "
        "new data has images)",
    )
    _add(
        p,
        "replay-distill",
        type=float,
        default=TrainConfig.replay_distill,
        metavar="WEIGHT",
        help="fine-tuning with LoRA: an MSE (times WEIGHT) keeps the replay samples' [SEG] "
        "prompts at those of the model before the run (its adapters switched off); 0 = off "
        "(default %(default)g)",
    )
    _add(
        p,
        "retention-margin",
        type=float,
        default=TrainConfig.retention_margin,
        help="gIoU the retention set may lose against the model before the run; the best "
        "checkpoint stays within it when one does, and a run past it ends with a warning",
    )
    _add(
        p,
        "retention-samples",
        type=int,
        default=TrainConfig.retention_samples,
        help="retention images scored at each evaluation (0 = all; the bundled model's "
        "synthetic retention set has this many)",
    )
    _add(
        p,
        "estimate",
        action="store_true",
        help="measure instead of train: time the start-up, one evaluation and a few steps, "
        "print the estimated duration of the run as JSON and save no checkpoint",
    )
    return p


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    cfg = base_model_config(args.preset, args.model, args.llava, args.sam)
    changes: dict[str, object] = {}
    for name in (
        "llava",
        "sam",
        "quantization",
        "precision",
        "use_lora",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "gradient_checkpointing",
        "lean_token_rows",
        "vision_quantization",
        "offload_sam_encoder",
    ):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value  # fmt: skip
    if args.llava or args.sam:
        changes["build_tiny"] = False
        changes["heads"] = cfg.heads if not (args.llava and args.sam) else None
    if args.lora_targets:
        changes["lora_targets"] = args.lora_targets  # ModelConfig makes lists tuples
    if args.train_tokens:
        changes["train_tokens"] = args.train_tokens
    if args.train_projector:
        changes["train_projector"] = True
    if args.train_all:
        changes.update(train_all=True, use_lora=False, quantization="none")
        # The presets' memory savings freeze the encoders; asked for explicitly, they are an
        # error (ModelConfig says so).
        changes.setdefault("vision_quantization", "none")
        changes.setdefault("offload_sam_encoder", False)
    elif "use_lora" not in changes:
        changes["use_lora"] = True  # fine-tuning default: LoRA on the language model
    changes["losses"] = LossWeights(
        args.ce_weight, args.bce_weight, args.dice_weight, args.iou_weight
    )
    return cfg.replace(**changes)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse and validate; raises ConfigError (one clear line) on nonsense."""
    args = build_parser().parse_args(argv)
    check_paths(*path_arguments(args))  # before the model options read any folder
    return TrainConfig(
        output_dir=args.output_dir,
        model=model_config_from_args(args),
        dataset=args.dataset,
        synthetic=args.synthetic,
        synthetic_seed=args.synthetic_seed,
        exclude_concept=args.exclude_concept,
        focus_concept=args.focus_concept,
        synthetic_extra_queries=args.synthetic_extra_queries,
        synthetic_extra_families=tuple(args.synthetic_extra_families),
        look_alikes=tuple(args.look_alikes),
        look_alike_share=args.look_alike_share,
        explanations=args.explanations,
        synthetic_explanations=args.synthetic_explanations,
        explanation_lead=args.explanation_lead,
        epochs=args.epochs,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        schedule_by_time=args.schedule_by_time,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        learning_rate=args.learning_rate,
        mask_lr_scale=args.mask_lr_scale,
        projector_lr_scale=args.projector_lr_scale,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        lr_scheduler=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        max_train_samples=args.max_train_samples,
        max_val_samples=args.max_val_samples,
        queries=args.queries,
        num_workers=args.num_workers,
        eval_every=args.eval_every,
        seg_rate_samples=args.seg_rate_samples,
        log_every=args.log_every,
        patience=args.patience,
        select_metric=args.metric,
        save_best_only=args.save_best_only,
        resume=args.resume,
        init_from=args.init_from,
        seed=args.seed,
        embedding_cache_dir=args.embedding_cache_dir,
        no_embedding_cache=args.no_embedding_cache,
        image_store_size=args.image_store_size,
        export_model=args.export_model,
        freeze_encoders=args.freeze_encoders,
        save_warmed=args.save_warmed,
        pretrain=pretrain.options.from_args(args),
        replay_share=args.replay_share,
        replay_dir=args.replay_dir,
        replay_scenes=args.replay_scenes,
        retention_margin=args.retention_margin,
        replay_distill=args.replay_distill,
        retention_samples=args.retention_samples,
        estimate=args.estimate,
    )


def path_arguments(args: argparse.Namespace) -> list[tuple]:
    """(flag, value, kind) of every path the run reads or writes, for lisa_demo.paths."""
    return [
        ("--output-dir", args.output_dir, OUTPUT_FOLDER),
        ("--dataset", args.dataset, FOLDER, "a folder with train/ and val/ (ReasonSeg layout)"),
        ("--replay-dir", args.replay_dir, FOLDER, "a ReasonSeg folder of the base model's data"),
        ("--explanations", args.explanations, FILE, "a JSON file of explanations"),
        ("--resume", args.resume, CHECKPOINT, "a run folder or a checkpoint folder"),
        ("--init-from", args.init_from, CHECKPOINT, "a checkpoint folder or a run folder"),
        ("--embedding-cache-dir", args.embedding_cache_dir, OUTPUT_FOLDER),
        ("--model", args.model, MODEL),
        ("--llava", args.llava, MODEL),
        ("--sam", args.sam, MODEL),
    ]
