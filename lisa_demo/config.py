"""Typed configuration: model presets and the constants every layer shares.

Nothing here imports torch or transformers, so the CLI can validate arguments before any
heavy import.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

SEG_TOKEN = "[SEG]"
IMAGE_TOKEN = "<image>"

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = PROJECT_ROOT / "assets"
BUNDLED_MODEL_DIR = ASSETS_DIR / "tiny-lisa"
EXAMPLES_DIR = ASSETS_DIR / "examples"

# A full model is a folder: llava/ and sam/ (transformers layout), projection.safetensors and
# manifest.json (this format name, the prompt format, where the weights came from).
FULL_MODEL_FORMAT = "lisa-studio-bundle"
FULL_MODEL_PARTS = ("llava", "sam", "projection.safetensors", "manifest.json")
# Where the app looks for full models (converted LISA checkpoints), one folder each.
MODELS_DIR_ENV = "LISA_MODELS_DIR"
DEFAULT_MODELS_DIR = Path("models")

PRECISIONS = ("fp32", "bf16", "fp16")
QUANTIZATIONS = ("none", "8bit", "4bit")
# The real-size architectures `random_weights` builds (lisa_demo.architectures.ARCHITECTURES).
ARCHITECTURE_NAMES = ("llava-1.5-7b", "lisa-7b", "lisa-13b")

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
    # The real-size architecture of this model: what random_weights builds and what the memory
    # estimator counts when the sources are not local folders (one of ARCHITECTURE_NAMES).
    architecture: str = "llava-1.5-7b"
    # Memory savings (lisa_demo.memory_savings); none changes what is computed beyond rounding.
    # The [SEG] (and train_tokens) rows of embed_tokens and lm_head train without peft's merged
    # full copies of those matrices (and the full-size gradient of lm_head's copy).
    lean_token_rows: bool = False
    # CLIP's frozen vision tower in 8-bit or 4-bit (bitsandbytes) instead of the compute dtype.
    vision_quantization: str = "none"
    # Training: once every training and validation image's SAM embedding is cached, SAM's
    # image encoder leaves the GPU (moves to the CPU, where any later new image is encoded).
    offload_sam_encoder: bool = False
    build_tiny: bool = False  # build the random tiny model locally instead of loading
    # How prompts are written and tokenized: None (the processor's chat template), or a full
    # model's manifest's "question-first" | "llava-1.5" | "llava_v1" (LISA's, piecewise).
    prompt_format: str | None = None
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
        if self.vision_quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"vision quantization must be one of {QUANTIZATIONS}, "
                f"got {self.vision_quantization!r}"
            )
        if self.architecture not in ARCHITECTURE_NAMES:
            raise ConfigError(
                f"architecture must be one of {ARCHITECTURE_NAMES}, got {self.architecture!r}"
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
        if self.train_all and (self.vision_quantization != "none" or self.offload_sam_encoder):
            raise ConfigError(
                "full training (train_all) trains the encoders: no --vision-quantization and "
                "no --offload-sam-encoder"
            )

    def replace(self, **changes: object) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def lora_target_regex(self) -> str:
        names = "|".join(sorted(set(self.lora_targets)))
        return LANGUAGE_MODEL_PREFIX + f"({names})"


def read_full_model_manifest(folder: str | Path) -> dict:
    """The manifest of a full-model folder; ConfigError (one line) if `folder` is not one."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise ConfigError(f"model folder not found: {path}")
    if not path.is_dir():
        raise ConfigError(f"--model takes a folder, but {path} is a file")
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        manifest = None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{manifest_path} is unreadable ({err})") from err
    if isinstance(manifest, dict) and manifest.get("format") == "lisa-studio-checkpoint":
        raise ConfigError(
            f"{path} is a fine-tuned checkpoint, not a full model: pass it with --checkpoint "
            "(on top of the --model it was trained from)"
        )
    missing = [part for part in FULL_MODEL_PARTS if not (path / part).exists()]
    if missing or not isinstance(manifest, dict) or manifest.get("format") != FULL_MODEL_FORMAT:
        what = f"it lacks {', '.join(missing)}" if missing else "its manifest.json is not one"
        raise ConfigError(
            f"{path} is not a full model folder ({what}); a full model holds llava/, sam/, "
            "projection.safetensors and manifest.json (python -m lisa_demo.convert writes one "
            "from a LISA checkpoint)"
        )
    return manifest


def resolve_model_dir(name: str | Path) -> Path:
    """A full-model folder as given, or a Hub model repo ("USER/NAME") holding one, downloaded
    once into the Hub cache (a converted LISA uploaded with `hf upload`)."""
    path = Path(name).expanduser()
    text = str(name)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text))
    except Exception as err:  # offline, private, unknown: the same advice
        raise ConfigError(
            f"model folder not found: {text} is not a local folder and could not be downloaded "
            f"from the Hugging Face Hub ({type(err).__name__}); download it where you have "
            f"network access (`hf download {text} --local-dir DIR`) and pass --model DIR"
        ) from err


def full_model_config(folder: str | Path) -> ModelConfig:
    """The ModelConfig of a full-model folder (the bundled model, a converted LISA), or of a Hub
    repo holding one."""
    path = resolve_model_dir(folder)
    manifest = read_full_model_manifest(path)
    precision = manifest.get("precision", "fp32")
    return ModelConfig(
        llava=str(path / "llava"),
        sam=str(path / "sam"),
        heads=str(path),
        precision=precision if precision in PRECISIONS else "fp32",
        prompt_format=manifest.get("prompt_format"),
    )


def models_dir(environ: dict | None = None) -> Path:
    """The folder the app lists full models from (LISA_MODELS_DIR, default ./models)."""
    env = os.environ if environ is None else environ
    return Path(env.get(MODELS_DIR_ENV) or DEFAULT_MODELS_DIR).expanduser()


def find_full_models(folder: Path) -> list[Path]:
    """Every full-model folder directly inside `folder`, by name."""
    if not folder.is_dir():
        return []
    found = []
    for child in sorted(folder.iterdir()):
        try:
            read_full_model_manifest(child)
        except ConfigError:
            continue
        found.append(child)
    return found


def _bundled() -> ModelConfig:
    return ModelConfig(
        llava=str(BUNDLED_MODEL_DIR / "llava"),
        sam=str(BUNDLED_MODEL_DIR / "sam"),
        heads=str(BUNDLED_MODEL_DIR),
        prompt_format="question-first",
    )


def _tiny_random() -> ModelConfig:
    return ModelConfig(llava="tiny-random", sam="tiny-random", build_tiny=True)


def _qlora(**sources: object) -> ModelConfig:
    """bf16 compute, 4-bit NF4 language model, LoRA, gradient checkpointing, and the three
    memory savings: the [SEG] rows without peft's merged lm_head, CLIP's frozen tower in 8-bit
    (the bundled model's vision features move by 1.0% in L2 norm; 4-bit: 5.7%) and SAM's image
    encoder off the GPU once every image is encoded. Estimated llava-1.5-7b QLoRA step (SAM
    ViT-B, batch 1): 5.72 GiB without them, 4.78 GiB with them."""
    return ModelConfig(
        precision="bf16",
        quantization="4bit",
        use_lora=True,
        gradient_checkpointing=True,
        lean_token_rows=True,
        vision_quantization="8bit",
        offload_sam_encoder=True,
        **sources,  # type: ignore[arg-type]
    )


def _llava_7b(sam: str) -> ModelConfig:
    return _qlora(llava="llava-hf/llava-1.5-7b-hf", sam=sam)


def _lisa(name: str, architecture: str) -> ModelConfig:
    """An official LISA checkpoint converted into the models folder (models/<name> unless
    LISA_MODELS_DIR says otherwise) by python -m lisa_demo.convert; LISA's llava_v1 prompt."""
    folder = models_dir() / name
    return _qlora(
        llava=str(folder / "llava"), sam=str(folder / "sam"), heads=str(folder),
        architecture=architecture, prompt_format="llava_v1",
    )  # fmt: skip


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
    # The official LISA checkpoints, converted once into models/<preset name>/ with
    # `python -m lisa_demo.convert --lisa xinlai/LISA-7B-v1 --out models/lisa-7b-v1`; 4-bit
    # QLoRA like llava-1.5-7b. LLaMA-1 7B, CLIP-224 (256 image tokens), SAM ViT-H.
    "lisa-7b-v1": lambda: _lisa("lisa-7b-v1", "lisa-7b"),
    # The same, trained to explain its answer after the [SEG] token.
    "lisa-7b-v1-explanatory": lambda: _lisa("lisa-7b-v1-explanatory", "lisa-7b"),
    # LISA on LLaMA-2 13B (xinlai/LISA-13B-llama2-v1), same conventions.
    "lisa-13b-llama2-v1": lambda: _lisa("lisa-13b-llama2-v1", "lisa-13b"),
    "lisa-13b-llama2-v1-explanatory": lambda: _lisa("lisa-13b-llama2-v1-explanatory", "lisa-13b"),
}


def checkpoint_base_model(checkpoint: str | Path | None) -> Path | None:
    """The full-model folder a fine-tuned checkpoint was trained on, when its manifest names
    one that is still there (its LLaVA is that folder's llava/), else None."""
    if checkpoint is None:
        return None
    try:
        manifest = json.loads((Path(checkpoint) / "manifest.json").read_text())
        folder = Path(manifest["llava"]["source"]).parent
        read_full_model_manifest(folder)
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
        return None
    return folder


def base_model_config(
    preset_name: str | None,
    model_dir: str | Path | None = None,
    llava: str | None = None,
    sam: str | None = None,
    checkpoint: str | Path | None = None,
) -> ModelConfig:
    """What a CLI's model options name: `--model DIR` (a full-model folder), else the preset
    (default "tiny", the bundled model). `--model` excludes `--preset`, `--llava` and `--sam`.
    With none of them, a `checkpoint` trained on a full-model folder loads on that folder."""
    if model_dir is None and preset_name is None and not (llava or sam):
        model_dir = checkpoint_base_model(checkpoint)
    if model_dir is None:
        return preset(preset_name or "tiny")
    if preset_name is not None or llava or sam:
        raise ConfigError("--model names the whole model: drop --preset, --llava and --sam")
    return full_model_config(model_dir)


# The presets that load an official LISA checkpoint converted into the models folder (where the
# app lists it as a full model once it is there).
CONVERTED_PRESETS = tuple(name for name in PRESETS if name.startswith("lisa-"))


def preset(name: str) -> ModelConfig:
    """Return a fresh ModelConfig for a named preset; unknown names list the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()  # type: ignore[operator]
