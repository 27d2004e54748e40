"""Typed configuration: model presets and the constants every layer shares.

Nothing here imports torch or transformers, so the CLI can validate arguments before any
heavy import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

SEG_TOKEN = "[SEG]"
IMAGE_TOKEN = "<image>"

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = PROJECT_ROOT / "assets"
BUNDLED_MODEL_DIR = ASSETS_DIR / "tiny-lisa"
EXAMPLES_DIR = ASSETS_DIR / "examples"

PRECISIONS = ("fp32", "bf16", "fp16")
QUANTIZATIONS = ("none", "8bit", "4bit")

# Regex (peft full-match on the module name) that adapts the language model only. A plain
# ["q_proj", "v_proj"] list would also adapt the CLIP vision tower of LLaVA.
LANGUAGE_MODEL_PREFIX = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\."

# Full module names kept out of 4-bit/8-bit quantization (they match from the start).
QUANTIZATION_SKIP_MODULES = (
    "model.vision_tower",
    "model.multi_modal_projector",
    "lm_head",
)


class ConfigError(ValueError):
    """A configuration a user asked for that cannot work; the message says what to change."""


@dataclass
class LossWeights:
    """Weights of LISA's three loss terms (paper defaults) and of the optional IoU-head term."""

    ce: float = 1.0  # text cross-entropy on the answer tokens
    bce: float = 2.0  # per-pixel sigmoid BCE, mean over pixels then masks
    dice: float = 0.5  # Dice per mask, mean over masks
    iou: float = 0.0  # not in LISA: MSE teaching SAM's IoU head to predict the true IoU

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise ConfigError(f"loss weight {f.name} must be >= 0, got {getattr(self, f.name)}")

    @classmethod
    def from_fields(cls, fields: dict) -> LossWeights:
        """From recorded fields (a run's config or a manifest); terms it does not have, such as
        a pretraining recipe's, are left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})


@dataclass
class ModelConfig:
    """What to load and how. Every entry point builds one of these and hands it to loading."""

    llava: str  # Hub id or local folder of a LLaVA (transformers layout)
    sam: str  # Hub id or local folder of a SAM (transformers layout)
    heads: str | None = None  # folder holding projection.safetensors (the [SEG] projection)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (compute dtype)
    quantization: str = "none"  # none | 8bit | 4bit (language model only)
    use_lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # projections inside LM layers
    # Words whose token rows of embed_tokens and lm_head train with LoRA, besides [SEG]'s (the
    # reference trained both matrices whole). A word the base never learned, such as a new
    # concept's name, needs its own row to mean anything.
    train_tokens: tuple[str, ...] = ()
    # LoRA fine-tunes also train LLaVA's multimodal projector (not in LISA, which keeps it
    # frozen): the image features can then change for what the base never saw.
    train_projector: bool = False
    gradient_checkpointing: bool = False
    train_all: bool = False  # pretraining: every weight trains (vision tower, SAM encoder too)
    random_weights: bool = False  # build the architecture with random weights, no download
    build_tiny: bool = False  # build the random tiny model locally instead of loading
    losses: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        # Lists (JSON, argparse) become tuples, so equal settings compare equal.
        self.lora_targets = tuple(self.lora_targets)
        self.train_tokens = tuple(self.train_tokens)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}"
            )
        if self.lora_r <= 0 or self.lora_alpha <= 0:
            raise ConfigError("--lora-r and --lora-alpha must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError("--lora-dropout must be in [0, 1)")
        if not self.lora_targets:
            raise ConfigError("--lora-targets needs at least one module name, e.g. q_proj v_proj")
        for target in self.lora_targets:
            if not target.replace("_", "").isalnum():
                raise ConfigError(f"LoRA target {target!r} is not a module name like q_proj")
        for word in self.train_tokens:
            if not word.strip():
                raise ConfigError("--train-tokens takes words, got an empty one")
        if self.train_tokens and not self.use_lora:
            raise ConfigError("--train-tokens trains token rows with LoRA; it needs --use-lora")
        if self.train_projector and self.train_all:
            raise ConfigError("--train-projector is for fine-tunes; --train-all trains it anyway")
        if self.train_all and (self.use_lora or self.quantization != "none"):
            raise ConfigError("full training (train_all) needs quantization none and no LoRA")

    def replace(self, **changes: object) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def lora_target_regex(self) -> str:
        names = "|".join(sorted(set(self.lora_targets)))
        return LANGUAGE_MODEL_PREFIX + f"({names})"


def _bundled() -> ModelConfig:
    return ModelConfig(
        llava=str(BUNDLED_MODEL_DIR / "llava"),
        sam=str(BUNDLED_MODEL_DIR / "sam"),
        heads=str(BUNDLED_MODEL_DIR),
    )


def _tiny_random() -> ModelConfig:
    return ModelConfig(llava="tiny-random", sam="tiny-random", build_tiny=True)


def _llava_7b(sam: str) -> ModelConfig:
    return ModelConfig(
        llava="llava-hf/llava-1.5-7b-hf",
        sam=sam,
        precision="bf16",
        quantization="4bit",
        use_lora=True,
        gradient_checkpointing=True,
    )


# Each preset: what it is for, and how to run it.
PRESETS: dict[str, object] = {
    # The bundled tiny LISA in assets/tiny-lisa: CPU, offline, the app's default.
    "tiny": _bundled,
    # The same architecture with fresh random weights, built locally (tests, pretraining).
    "tiny-random": _tiny_random,
    # llava-1.5-7b in 4-bit NF4 + SAM ViT-B: QLoRA fine-tuning on one consumer GPU.
    "llava-1.5-7b": lambda: _llava_7b("facebook/sam-vit-base"),
    # llava-1.5-7b in 4-bit NF4 + SAM ViT-H: the paper's SAM, more memory.
    "llava-1.5-7b-sam-huge": lambda: _llava_7b("facebook/sam-vit-huge"),
}


def preset(name: str) -> ModelConfig:
    """Return a fresh ModelConfig for a named preset; unknown names list the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()  # type: ignore[operator]
