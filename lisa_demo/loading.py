"""The one place that builds or loads weights: LLaVA + SAM + projection, 4-bit, LoRA, checkpoints.

Every entry point (inference CLI, training, evaluation, the app, the benchmark) calls
`load_lisa`. Sources are Hub ids or local folders in the transformers layout; the tiny
architecture is built locally by `lisa_demo.tiny`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lisa_demo import checkpoint as ckpt
from lisa_demo.config import (
    BUNDLED_MODEL_DIR,
    IMAGE_TOKEN,
    QUANTIZATION_SKIP_MODULES,
    SEG_TOKEN,
    ConfigError,
    ModelConfig,
    models_dir,
)
from lisa_demo.inputs import PromptFormat, prompt_format
from lisa_demo.model import LisaModel

log = logging.getLogger("lisa_demo.loading")

PROJECTION_FILE = "projection.safetensors"
SHARDING_ENV_VARS = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model that cannot be fetched or read; the message says what to do instead."""


@dataclass
class LoadedLisa:
    """A ready model with its processors and the facts a checkpoint manifest records."""

    model: LisaModel
    processor: object  # LlavaProcessor: tokenizer + CLIP image processor
    sam_processor: object  # SamProcessor
    config: ModelConfig
    device: torch.device
    base: dict  # {"llava": {...}, "sam": {...}} sources, architectures, fingerprints
    warnings: list[str] = field(default_factory=list)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def seg_token_id(self) -> int:
        return self.model.seg_token_id

    @property
    def prompt_format(self) -> PromptFormat:
        """How this model's prompts are written and tokenized (its manifest says, else the
        processor's chat template)."""
        return prompt_format(self.processor, self.config.prompt_format)

    def manifest(self, **extra: object) -> dict:
        """What a checkpoint of this model must record to be reloaded onto the same base."""
        cfg = self.config
        lora = None
        if cfg.use_lora:
            lora = {
                "r": cfg.lora_r,
                "alpha": cfg.lora_alpha,
                "dropout": cfg.lora_dropout,
                "targets": list(cfg.lora_targets),
                "train_tokens": list(cfg.train_tokens),
            }
        return {
            **self.base,
            "seg_token": SEG_TOKEN,
            "seg_token_id": self.seg_token_id,
            "lora": lora,
            "train_all": cfg.train_all,
            "train_projector": cfg.train_projector,
            "quantization": cfg.quantization,
            "vision_quantization": cfg.vision_quantization,
            "precision": cfg.precision,
            **extra,
        }


# Sources ------------------------------------------------------------------------------------
def resolve_sources(cfg: ModelConfig) -> tuple[str, str]:
    if cfg.build_tiny:
        from lisa_demo.tiny import cached_tiny_models

        root = cached_tiny_models()
        return str(root / "llava"), str(root / "sam")
    return cfg.llava, cfg.sam


def _describe(kind: str, source: str, config: object) -> dict:
    path = Path(source)
    arch = {"model_type": getattr(config, "model_type", "?")}
    if kind == "llava":
        text, vision = config.text_config, config.vision_config
        arch.update(
            hidden=text.hidden_size, layers=text.num_hidden_layers,
            vision_hidden=vision.hidden_size, vision_layers=vision.num_hidden_layers,
        )  # fmt: skip
    else:
        vision = config.vision_config
        arch.update(
            hidden=vision.hidden_size, layers=vision.num_hidden_layers,
            image_size=vision.image_size,
            decoder_hidden=config.mask_decoder_config.hidden_size,
        )  # fmt: skip
    return {
        "source": source,
        "revision": getattr(config, "_commit_hash", None),
        "fingerprint": ckpt.folder_fingerprint(path) if path.is_dir() else None,
        "architecture": arch,
    }


def _fetch_error(kind: str, source: str, err: Exception) -> ModelLoadError:
    flag = "--llava" if kind == "LLaVA" else "--sam"
    path = Path(source)
    if path.is_relative_to(BUNDLED_MODEL_DIR):
        return ModelLoadError(
            f"The bundled tiny model is missing or incomplete ({source}): restore assets/ from "
            f"the repository (git checkout -- assets) or use --preset tiny-random ({err})"
        )
    if path.exists():
        return ModelLoadError(
            f"Could not load the {kind} model: the folder {source} is not a transformers "
            f"{kind} model ({err}). Pass a folder written by save_pretrained, or --preset tiny."
        )
    if path.is_relative_to(models_dir()):  # a LISA preset's converted model, not there yet
        folder = path.parent
        return ModelLoadError(
            f"Could not load the {kind} model: {source} does not exist. Convert the official "
            f"LISA checkpoint into {folder} once (python -m lisa_demo.convert --lisa ID_OR_DIR "
            f"--out {folder}), or use --random-weights to measure the architecture."
        )
    if source.startswith((".", "/", "~")) or "\\" in source:
        return ModelLoadError(
            f"Could not load the {kind} model: the folder {source} does not exist. "
            f"Check {flag}, or use --preset tiny (bundled, offline)."
        )
    return ModelLoadError(
        f"Could not load the {kind} model '{source}': it is not a local folder and could not "
        f"be fetched from the Hugging Face Hub (no network, a typo, or a gated model). Download "
        f"it where you have access (`hf download {source} --local-dir DIR`) and pass {flag} DIR, "
        f"or use --preset tiny (bundled, offline)."
    )


# Processors and the [SEG] token ---------------------------------------------------------------
def load_processors(llava_src: str, sam_src: str) -> tuple[object, object]:
    from transformers import AutoProcessor, SamProcessor

    try:
        processor = AutoProcessor.from_pretrained(llava_src)
    except (OSError, ValueError) as err:
        raise _fetch_error("LLaVA", llava_src, err) from err
    try:
        sam_processor = SamProcessor.from_pretrained(sam_src)
    except (OSError, ValueError) as err:
        raise _fetch_error("SAM", sam_src, err) from err
    return processor, sam_processor


def ensure_seg_token(tokenizer) -> tuple[int, bool]:
    """Add `[SEG]` as an ordinary added token if absent. Returns (id, whether it was added)."""
    if SEG_TOKEN in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(SEG_TOKEN), False
    tokenizer.add_tokens([SEG_TOKEN])
    return tokenizer.convert_tokens_to_ids(SEG_TOKEN), True


def init_seg_rows(llava, seg_id: int, n_known: int) -> None:
    """Make room for `[SEG]` and set its embedding and LM-head rows to the mean of the known
    rows, so a saved adapter reloads to the same logits."""
    if seg_id >= llava.get_input_embeddings().weight.shape[0]:
        llava.resize_token_embeddings(seg_id + 1, pad_to_multiple_of=64, mean_resizing=False)
    with torch.no_grad():
        for matrix in (
            llava.get_input_embeddings().weight,
            llava.get_output_embeddings().weight,
        ):
            matrix[seg_id] = matrix[:n_known].float().mean(dim=0).to(matrix.dtype)


# Models ---------------------------------------------------------------------------------------
def quantization_config(cfg: ModelConfig, dtype: torch.dtype):
    """bitsandbytes settings for the language model only (vision, projector, lm_head skipped)."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    skip = list(QUANTIZATION_SKIP_MODULES)
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    # FSDP and DeepSpeed ZeRO-3 shard parameters by dtype: pack the 4-bit weights in the
    # compute dtype there (accelerate launch sets these variables for those configs).
    sharded = any(os.environ.get(v, "").lower() == "true" for v in SHARDING_ENV_VARS)
    extra = {"bnb_4bit_quant_storage": dtype} if sharded else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=skip,
        **extra,
    )


def _check_bitsandbytes(kind: str, flag: str = "--quantization") -> None:
    if kind == "none":
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"{flag} {kind} needs bitsandbytes: pip install bitsandbytes") from err


def load_llava(
    source: str,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    image_token_id: int | None = None,
):
    """image_token_id: the tokenizer's `<image>` id, used by random-weight models only."""
    from transformers import LlavaForConditionalGeneration

    quant = quantization_config(cfg, dtype)
    kwargs: dict = {"dtype": dtype}
    if quant is not None:
        _check_bitsandbytes(cfg.quantization)
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else device.type}
    if cfg.random_weights:
        model = _random_llava(dtype, device, quant, image_token_id, cfg.architecture)
    else:
        try:
            model = LlavaForConditionalGeneration.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as err:
            raise _fetch_error("LLaVA", source, err) from err
        model = model if quant is not None else model.to(device)
    if cfg.vision_quantization != "none":  # frozen CLIP tower in 8-bit / 4-bit
        from lisa_demo.memory_savings import quantize_linears

        _check_bitsandbytes(cfg.vision_quantization, "--vision-quantization")
        quantize_linears(model.model.vision_tower, cfg.vision_quantization, dtype)
    return model


# Random weights (--random-weights) -------------------------------------------------------------
# The full-size architectures with random values: speed and memory measurements without a
# download. Built on the meta device and filled one tensor at a time, so a 4-bit 7B model never
# exists in full precision (neither on disk nor in memory).
def random_weight_processors(architecture: str = "llava-1.5-7b") -> tuple[object, object]:
    """Processors for random-weight models, with no download: the tiny tokenizer with
    llava-1.5's image-first prompt, the architecture's CLIP preprocessing (llava-1.5: 336 px,
    patch 14, 576 image tokens; LISA: 224 px, 256) and SAM's 1024 px."""
    from transformers import (
        CLIPImageProcessorPil,
        LlavaProcessor,
        SamImageProcessorPil,
        SamProcessor,
    )

    from lisa_demo.architectures import architecture as find_architecture
    from lisa_demo.tiny import CHAT_TEMPLATE, build_tokenizer

    side = find_architecture(architecture).clip_image_size
    clip = CLIPImageProcessorPil(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=clip,
        tokenizer=build_tokenizer(CHAT_TEMPLATE),  # llava-1.5's format
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return processor, SamProcessor(image_processor=SamImageProcessorPil())


def random_llava_skeleton(config, quant=None):
    """The LLaVA architecture without storage: parameters on the meta device, buffers real.

    With a BitsAndBytesConfig `quant`, every Linear outside its skip list is already a
    bitsandbytes Linear4bit / Linear8bitLt (transformers' own replacement, same skip rules as
    from_pretrained), still empty.
    """
    from accelerate import init_empty_weights
    from transformers import LlavaForConditionalGeneration

    with init_empty_weights(include_buffers=False):
        model = LlavaForConditionalGeneration(config)
    if quant is not None:
        from transformers.integrations import replace_with_bnb_linear

        skip = list(quant.llm_int8_skip_modules)
        model = replace_with_bnb_linear(
            model, modules_to_not_convert=skip, quantization_config=quant
        )
    return model


def materialize_random(model: torch.nn.Module, dtype, device: torch.device, std: float) -> None:
    """Give every meta parameter random values on `device`, in place, one tensor at a time.

    Linear / embedding / conv weights ~ N(0, std), norm weights 1, biases 0. bitsandbytes
    weights are drawn in `dtype` and quantized at once; buffers move to `device`.
    """
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            values = torch.empty(param.shape, dtype=dtype, device=device)
            if name == "bias":
                values.zero_()
            elif "Norm" in type(module).__name__:
                values.fill_(1.0)
            else:
                values.normal_(0.0, std)
            module._parameters[name] = _random_parameter(param, values, device)
        for name, buffer in list(module.named_buffers(recurse=False)):
            module._buffers[name] = buffer.to(device)


def _random_parameter(meta: torch.nn.Parameter, values: torch.Tensor, device: torch.device):
    kind = type(meta).__name__
    settings = dict(meta.__dict__)
    if kind == "Params4bit":  # quantized by the move to the device (already there)
        return type(meta)(values, requires_grad=False, **settings).to(device)
    if kind == "Int8Params":  # bitsandbytes quantizes int8 on the way from the CPU only
        settings.pop("SCB", None)
        return type(meta)(values.cpu(), requires_grad=False, **settings).to(device)
    return torch.nn.Parameter(values, requires_grad=meta.requires_grad)


def _random_llava(
    dtype, device: torch.device, quant, image_token_id: int | None, name: str = "llava-1.5-7b"
):
    """The named architecture with random weights; 4-bit/8-bit layers are quantized as they
    are filled."""
    from lisa_demo.architectures import architecture

    config = architecture(name).llava_config(image_token_id)
    model = random_llava_skeleton(config, quant)
    materialize_random(model, dtype, device, std=config.text_config.initializer_range)
    if quant is not None:  # what from_pretrained sets; peft reads it to wrap the bnb layers
        flag = "is_loaded_in_4bit" if quant.load_in_4bit else "is_loaded_in_8bit"
        setattr(model, flag, True)
    return model.eval()


def load_sam(source: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    from transformers import SamModel

    if cfg.random_weights:
        from lisa_demo.architectures import architecture

        with torch.device(device):
            return SamModel(architecture(cfg.architecture).sam_config(source)).to(dtype)
    try:
        return SamModel.from_pretrained(source, dtype=dtype).to(device)
    except (OSError, ValueError) as err:
        raise _fetch_error("SAM", source, err) from err


def train_token_ids(tokenizer, words: tuple[str, ...], seg_id: int) -> list[int]:
    """[SEG]'s id, then the ids of `words` as they appear inside a sentence (after a space),
    without repeats or special tokens."""
    ids = [seg_id]
    special = set(tokenizer.all_special_ids)
    for word in words:
        for token in tokenizer(" " + word.strip(), add_special_tokens=False).input_ids:
            if token not in ids and token not in special:
                ids.append(token)
    return ids


def apply_lora(llava, cfg: ModelConfig, token_ids: list[int]):
    """Wrap the language model's attention projections with LoRA; train the rows of
    `token_ids` ([SEG] and the config's train_tokens) in embed_tokens and lm_head."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_regex(),
        trainable_token_indices={"embed_tokens": token_ids, "lm_head": token_ids},
        bias="none",
    )
    model = get_peft_model(llava, lora)
    if cfg.lean_token_rows:
        from lisa_demo.memory_savings import use_lean_token_rows

        use_lean_token_rows(model)
    return model


def set_trainable(model: LisaModel, cfg: ModelConfig, for_training: bool) -> None:
    """Freeze everything except what LISA trains (or everything, for pretraining)."""
    if not for_training:
        model.requires_grad_(False)
        model.eval()
        return
    if cfg.train_all:
        model.requires_grad_(True)
    else:
        # peft already froze the base and marked LoRA / token rows trainable.
        if not cfg.use_lora:
            model.llava.requires_grad_(False)
        model.sam.requires_grad_(False)
        model.sam.mask_decoder.requires_grad_(True)
        if cfg.train_projector:
            model.base_llava.model.multi_modal_projector.requires_grad_(True)
    model.text_hidden_fcs.requires_grad_(True)
    model.train()


def _apply_checkpoint_settings(cfg: ModelConfig, manifest: dict) -> ModelConfig:
    if manifest.get("train_all"):
        cfg = cfg.replace(train_all=True, use_lora=False)
    if manifest.get("train_projector"):
        cfg = cfg.replace(train_projector=True)
    lora = manifest.get("lora")
    if lora:
        cfg = cfg.replace(
            use_lora=True,
            lora_r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            lora_targets=tuple(lora["targets"]),
            train_tokens=tuple(lora.get("train_tokens", ())),
        )
    return cfg


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_lisa(
    cfg: ModelConfig,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    for_training: bool = False,
    attach: Callable[[LisaModel], None] | None = None,
) -> LoadedLisa:
    """Build the LISA model described by `cfg`, optionally with a fine-tuned checkpoint.

    `attach(model)` may add training-only modules (a training recipe's heads) before the
    checkpoint's weights load, so that they are restored with the rest; they train.
    """
    device = pick_device(device)
    if checkpoint is not None:  # once: the manifest and the weights come from one folder
        checkpoint = ckpt.resolve_checkpoint(checkpoint)
    manifest = ckpt.read_manifest(checkpoint) if checkpoint is not None else None
    if manifest is not None:
        cfg = _apply_checkpoint_settings(cfg, manifest)
    dtype = DTYPES[cfg.precision]
    llava_src, sam_src = resolve_sources(cfg)
    if cfg.random_weights:
        processor, sam_processor = random_weight_processors(cfg.architecture)
    else:
        processor, sam_processor = load_processors(llava_src, sam_src)
    tokenizer = processor.tokenizer
    n_known = len(tokenizer)
    seg_id, added = ensure_seg_token(tokenizer)

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    llava = load_llava(llava_src, cfg, dtype, device, image_token_id=image_token_id)
    sam = load_sam(sam_src, cfg, dtype, device)
    base = {"llava": _describe("llava", llava_src, llava.config)}
    base["sam"] = _describe("sam", sam_src, sam.config)
    if added:
        init_seg_rows(llava, seg_id, n_known)
    if cfg.gradient_checkpointing and for_training:
        llava.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.use_lora:
        llava = apply_lora(llava, cfg, train_token_ids(tokenizer, cfg.train_tokens, seg_id))

    model = LisaModel(
        llava,
        sam,
        seg_token_id=seg_id,
        hidden_size=llava.config.text_config.hidden_size,
        loss_weights=cfg.losses,
        train_sam_encoder=cfg.train_all,
    )
    model.text_hidden_fcs.to(
        device=device, dtype=torch.float32 if dtype == torch.float16 else dtype
    )
    _load_projection(model, None if cfg.random_weights else cfg.heads)
    if attach is not None:
        attach(model)
    set_trainable(model, cfg, for_training=True)  # names of trainable tensors define the format
    loaded = LoadedLisa(model, processor, sam_processor, cfg, device, base)
    if manifest is not None:
        if manifest.get("seg_token_id") != seg_id:
            raise ckpt.CheckpointError(
                f"checkpoint [SEG] id {manifest.get('seg_token_id')} differs from this "
                f"tokenizer's {seg_id}: it was made for another base model"
            )
        loaded.warnings = ckpt.check_same_base(manifest, base)
        for line in loaded.warnings:
            log.warning(line)
        ckpt.load_trainable_state(checkpoint, model)
    set_trainable(model, cfg, for_training)
    return loaded


def _load_projection(model: LisaModel, heads: str | None) -> None:
    if heads is None:
        return
    path = Path(heads) / PROJECTION_FILE
    if not path.exists():
        raise ModelLoadError(f"{path} is missing: the bundled model in assets/ is incomplete")
    state = load_file(str(path))
    model.text_hidden_fcs.load_state_dict(state, strict=True)


def save_full_model(loaded: LoadedLisa, out: Path | str) -> Path:
    """Export a fully trained model as a base: llava/, sam/ (HF layout) and the projection."""
    model = loaded.model
    if loaded.config.use_lora or loaded.config.quantization != "none":
        raise ConfigError("a full export needs an unquantized model without LoRA")

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.llava.save_pretrained(tmp / "llava")
            loaded.processor.save_pretrained(tmp / "llava")
            model.sam.save_pretrained(tmp / "sam")
            loaded.sam_processor.save_pretrained(tmp / "sam")
        state = {
            k: v.detach().cpu().contiguous() for k, v in model.text_hidden_fcs.state_dict().items()
        }
        save_file(state, str(tmp / PROJECTION_FILE))

    return ckpt.write_atomically(Path(out), write)


def quiet_library_output() -> None:
    """No progress bars, deprecation notices or library chatter on a user's terminal: a
    command's own lines (and its one `error:` line) are what it prints."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # Deprecation notices of the libraries (some are attributed to the caller's line, so the
    # module filter alone misses them): nothing a user of a command can act on.
    warnings.simplefilter("ignore", FutureWarning)
    for library in ("transformers", "peft", "accelerate", "huggingface_hub"):
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=library)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


__all__ = [
    "IMAGE_TOKEN",
    "LoadedLisa",
    "ModelLoadError",
    "load_lisa",
    "save_full_model",
]
