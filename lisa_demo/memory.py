"""Peak GPU memory of LISA inference and LoRA fine-tuning, estimated from the architecture.

Parameter counts come from the real configs built on the meta device (no weights, no
download); every byte count below is a formula in those counts and the run's shapes.

    python -m lisa_demo.bench --estimate-memory --preset llava-1.5-7b --quantization 4bit

Notation: B batch, L sequence length (image tokens + text), T generated tokens, h hidden size,
I MLP width, n layers, V vocabulary, b bytes of the compute dtype (2 for bf16).

Weights
    4-bit NF4 with double quantization: 4 bits per weight + an 8-bit absmax per block of 64
    + an fp32 absmax per 256 blocks = 4.127 bits, for the language model's Linear layers.
    8-bit: 1 byte per weight + an fp32 scale per output row. Everything else (vision tower,
    projector, embeddings, lm_head, norms, SAM) in the compute dtype.
Training state (trainable = LoRA A/B, the [SEG] rows, the projection, SAM's mask decoder, and
    LLaVA's multimodal projector with --train-projector: its frozen copy is counted in b as well)
    fp32 master weights (the loop upcasts them), fp32 gradients, optimizer state
    (AdamW: two fp32 moments = 8 bytes; paged 8-bit AdamW: two 1-byte moments = 2 bytes).
Activations of one training step (LoRA; the frozen 4-bit base saves no inputs, only
weights are needed to pass gradients through it)
    per token and layer: 8h (the two RMSNorm inputs, kept in fp32)
                       + 3 x (in-features of each LoRA layer) (dropout output b + mask 1 byte)
                       + b x (2h + 2 kv) (q, k, v and the attention output kept by SDPA)
                       + 3 b I (gate, up and SiLU(gate) of the SwiGLU MLP)
    no checkpointing: B L n x that + B L (n + 1) h b (every layer's output, returned because
    LISA asks for hidden states); with checkpointing: the B L (n + 1) h b layer outputs (they are
    also the checkpoints) + one layer recomputed during backward.
    logits: B A V x 10 bytes, A = scored answer tokens (LisaModel computes vocabulary logits only
    where a label is scored; bf16 logits, their fp32 upcast and the fp32 log-softmax kept by
    the cross-entropy). [SEG] rows: peft's trainable tokens build a full copy of lm_head
    (V h b), keep it for backward and compute its full gradient there (V h b more); with
    lean_token_rows neither exists (the embed_tokens copy, made and freed at the start of
    the forward pass, and its dense gradient at the end of the backward pass never meet the
    peak). A 4-bit/8-bit layer dequantizes its weight to b for
    each matmul (the largest such weight, in b). Autocast keeps a b copy of every fp32
    trainable weight for the step. SAM decoder per mask: 24 P g^2 elements in b (the
    two-way transformer's image-side tensors and the upscaling convolutions, P = decoder width,
    g = embedding grid) + 8 fp32 maps of the padded input size (upsampling, BCE, Dice).
Transients that never coexist with the step's activations
    SAM image encoder (no grad, before the LLaVA forward; every step without the embedding
    cache, on cache misses with it): global attention's [heads, N, N] relative-position bias in
    b (SDPA's memory-efficient kernel takes it as a mask and forms no score matrix), + 8 N w b
    for the rest (N = g^2 tokens, w = encoder width).
Memory savings (lisa_demo.memory_savings)
    vision_quantization: CLIP's Linear weights in 8-bit (1 byte + an fp32 scale per row) or NF4
    (4.127 bits) instead of b. offload_sam_encoder (training): every image is encoded before
    the first step, then SAM's image encoder leaves the GPU. Its weights and its transient
    then belong to that encoding phase, when gradients and optimizer state do not exist yet
    (AdamW creates its state at the first step): the plan's transient groups are the encoding
    phase (encoder weights + its transient) and the step (gradients, optimizer state, step
    activations), whichever is larger.
Inference
    weights (heads in the compute dtype, LoRA in fp32), the per-image cache (SAM embeddings +
    LLaVA vision features of `cache_images` images), the prompt-prefix KV caches of the
    `prefix_caches` most recent images 2 n (N + 4) kv b (N image tokens after BOS and "USER: "),
    KV cache 2 n B (L + T) kv b, the hidden
    states generate returns for every step (n + 1) B (L + T) h b, the prefill's largest MLP
    transient 3 B L I b, the largest dequantized weight and, with LoRA, peft's merged lm_head
    copy V h b; or, if larger, the
    SAM image encoder transient of a new image.
Overhead
    the CUDA context (about 0.5 GiB, outside torch.cuda.max_memory_allocated) + 10% of the
    allocated peak for the caching allocator's fragmentation. Cards are compared in GiB
    (an "8 GB" card holds 8 GiB).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import asdict, dataclass

from lisa_demo.config import QUANTIZATION_SKIP_MODULES, ConfigError, ModelConfig

GIB = 2**30
CARDS_GIB = (8, 12, 16, 24)
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # codes + 8-bit absmax per 64 + fp32 absmax per 256 blocks
CUDA_CONTEXT_BYTES = GIB // 2
FRAGMENTATION = 0.10
DEFAULT_TEXT_TOKENS = 64  # prompt template + question + answer, beyond the image tokens
DEFAULT_ANSWER_TOKENS = 16  # scored answer tokens per training sample ("Sure, it is [SEG].")
PREFIX_TEXT_TOKENS = 4  # BOS and "USER: " before the image tokens (the cached prompt prefix)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZER_STATE_BYTES = {"adamw": 8, "paged_adamw_8bit": 2}
SAM_DECODER_ELEMENTS_PER_CELL_AND_CHANNEL = 24
MASK_MAPS_FP32 = 8


@dataclass(frozen=True)
class ArchitectureCounts:
    """Parameter counts and the sizes activations depend on, for one LLaVA + SAM pair."""

    quantizable: int  # language-model Linear weights (4-/8-bit when quantized)
    quantizable_rows: int  # their output rows (8-bit keeps an fp32 scale per row)
    largest_quantizable: int  # weights of the largest one (dequantized for each matmul)
    llava_other: int  # vision tower, projector, embeddings, lm_head, norms, biases
    sam_frozen: int  # SAM image encoder + prompt encoder
    sam_decoder: int  # SAM mask decoder (trained)
    projection: int  # text_hidden_fcs (trained)
    lora: int  # LoRA A and B of the adapted projections (trained); 0 without LoRA
    projector: int  # LLaVA's multimodal projector when it trains (--train-projector), else 0
    seg_rows: int  # the [SEG] rows of embed_tokens and lm_head (trained with LoRA), and those
    # of --train-tokens words (one token each assumed)
    lora_inputs_per_layer: int  # summed in-features of the LoRA layers of one LM layer
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int  # key/value width (heads_kv x head_dim)
    vocab: int
    image_tokens: int  # tokens `<image>` expands into
    sam_width: int  # SAM image encoder width
    sam_heads: int
    sam_grid: int  # side of SAM's image-embedding grid (64 for 1024 px / patch 16)
    sam_image_size: int  # SAM's padded input side (1024)
    sam_embedding_channels: int  # 256
    decoder_width: int  # mask decoder width (256)
    vision_feature_dim: int  # LLaVA's projected vision features per image token (= hidden)
    vision_linear: int = 0  # CLIP tower Linear weights (in llava_other; 8-/4-bit if asked)
    vision_linear_rows: int = 0  # their output rows
    sam_encoder: int = 0  # SAM image encoder parameters (in sam_frozen; offloadable)

    @property
    def trainable(self) -> int:
        return self.lora + self.seg_rows + self.projection + self.sam_decoder + self.projector


@dataclass(frozen=True)
class MemoryTerm:
    """One line of the breakdown."""

    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    """The terms of one path (inference or training) and how they add up.

    resident terms always add; of the transient groups only the largest counts (they run one
    after the other); overhead is outside torch.cuda.max_memory_allocated.
    """

    resident: tuple[MemoryTerm, ...]
    transients: tuple[tuple[str, tuple[MemoryTerm, ...]], ...]  # (group name, its terms)

    @property
    def largest_transient(self) -> tuple[str, int]:
        sizes = [(name, sum(t.bytes for t in terms)) for name, terms in self.transients]
        return max(sizes, key=lambda item: item[1]) if sizes else ("none", 0)

    @property
    def allocated(self) -> int:
        """Peak tensor bytes: comparable to torch.cuda.max_memory_allocated."""
        return sum(t.bytes for t in self.resident) + self.largest_transient[1]

    @property
    def overhead(self) -> int:
        return CUDA_CONTEXT_BYTES + round(FRAGMENTATION * self.allocated)

    @property
    def total(self) -> int:
        """What the card must hold (nvidia-smi's view)."""
        return self.allocated + self.overhead

    @property
    def card(self) -> str:
        return smallest_card(self.total)

    def as_dict(self) -> dict:
        name, size = self.largest_transient
        return {
            "resident": {t.name: t.bytes for t in self.resident},
            "transients": {
                group: {t.name: t.bytes for t in terms} for group, terms in self.transients
            },
            "largest_transient": name,
            "largest_transient_bytes": size,
            "allocated_bytes": self.allocated,
            "overhead_bytes": self.overhead,
            "total_bytes": self.total,
            "allocated_gib": round(self.allocated / GIB, 3),
            "total_gib": round(self.total / GIB, 3),
            "card": self.card,
        }


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak GPU memory of inference and of one training step for one configuration."""

    setting: dict  # what was estimated (preset sources, quantization, batch, ...)
    counts: ArchitectureCounts
    inference: MemoryPlan
    training: MemoryPlan

    def as_dict(self) -> dict:
        return {
            "setting": dict(self.setting),
            "parameters": asdict(self.counts) | {"trainable": self.counts.trainable},
            "inference": self.inference.as_dict(),
            "training": self.training.as_dict(),
        }

    def as_table(self) -> str:
        """A plain-text breakdown in MiB, both paths side by side in sections."""
        settings = ", ".join(f"{k}={v}" for k, v in self.setting.items())
        lines = [f"Estimated peak GPU memory ({settings})"]
        for title, plan in (("Inference", self.inference), ("Training step", self.training)):
            lines += ["", f"{title}:"]
            lines += [_row(t.name, t.bytes, t.note) for t in plan.resident]
            chosen, _ = plan.largest_transient
            for group, terms in plan.transients:
                mark = "counted" if group == chosen else "not counted: smaller"
                lines.append(f"  {group} ({mark}):")
                lines += [_row("  " + t.name, t.bytes, t.note) for t in terms]
            lines += [
                _row("= allocated peak", plan.allocated, "= torch.cuda.max_memory_allocated"),
                _row("+ CUDA context + allocator", plan.overhead, "0.5 GiB + 10% of allocated"),
                _row("= card must hold", plan.total, f"fits: {plan.card}"),
            ]
        return "\n".join(lines)


def _row(name: str, size: int, note: str) -> str:
    return f"  {name:<46}{size / 2**20:>10.1f} MiB  {note}"


def smallest_card(total_bytes: int) -> str:
    """The smallest common card size that holds `total_bytes`, e.g. "12 GB"."""
    for size in CARDS_GIB:
        if total_bytes <= size * GIB:
            return f"{size} GB"
    return f"more than {CARDS_GIB[-1]} GB"


# Parameter counts from meta-device models ----------------------------------------------------
def architecture_configs(cfg: ModelConfig, sam_variant: str | None = None):
    """(LlavaConfig, SamConfig) for a model config, without downloading weights.

    The tiny presets use the tiny architecture; local folders their config.json; otherwise
    cfg.architecture's configs, written out in architectures.py (llava-1.5-7b by name or with
    --random-weights; the LISA presets' folders before conversion), with SAM ViT-B/L/H as the
    SAM source names it (or the architecture's own SAM).
    """
    from pathlib import Path

    from lisa_demo import architectures

    arch = architectures.architecture(cfg.architecture)
    built_in = cfg.random_weights or cfg.architecture != "llava-1.5-7b"

    if cfg.build_tiny:
        from lisa_demo import tiny

        tokenizer = tiny.build_tokenizer()
        llava = tiny.llava_config(
            ((len(tokenizer) + 63) // 64) * 64,
            tokenizer.convert_tokens_to_ids("<image>"),
            tokenizer.pad_token_id,
        )
        return llava, tiny.sam_config()
    if Path(cfg.llava).is_dir():
        from transformers import LlavaConfig

        if not (Path(cfg.llava) / "config.json").is_file():
            raise ConfigError(f"{cfg.llava} is a folder without config.json: not a LLaVA model")
        llava = LlavaConfig.from_pretrained(cfg.llava)
    elif built_in or "llava-1.5-7b" in cfg.llava:
        llava = arch.llava_config()
    else:
        raise ConfigError(
            f"no built-in architecture for LLaVA {cfg.llava!r}: pass a local folder or the "
            "llava-1.5-7b preset"
        )
    if sam_variant is not None:
        return llava, arch.sam_config(sam_variant)
    if Path(cfg.sam).is_dir():
        from transformers import SamConfig

        if not (Path(cfg.sam) / "config.json").is_file():
            raise ConfigError(f"{cfg.sam} is a folder without config.json: not a SAM model")
        return llava, SamConfig.from_pretrained(cfg.sam)
    try:
        architectures.sam_variant(cfg.sam)
    except ValueError as err:
        if not built_in:
            raise ConfigError(str(err)) from err
    return llava, arch.sam_config(cfg.sam)


def count_parameters(cfg: ModelConfig, sam_variant: str | None = None) -> ArchitectureCounts:
    """Build LLaVA and SAM on the meta device and count what each memory term needs."""
    llava_config, sam_config = architecture_configs(cfg, sam_variant)
    rows = 1 + len(cfg.train_tokens)  # [SEG] and each trained word
    lora = (cfg.lora_r, cfg.lora_target_regex(), rows) if cfg.use_lora else None
    counts = _count(llava_config.to_json_string(), sam_config.to_json_string(), lora)
    return counts if cfg.train_projector else dataclasses.replace(counts, projector=0)


@functools.lru_cache(maxsize=8)
def _count(llava_json: str, sam_json: str, lora: tuple[int, str, int] | None) -> ArchitectureCounts:
    import json

    import torch
    from torch import nn
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SamConfig, SamModel
    from transformers.quantizers.quantizers_utils import should_convert_module

    llava_config = LlavaConfig.from_dict(json.loads(llava_json))
    sam_config = SamConfig.from_dict(json.loads(sam_json))
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(llava_config)
        sam = SamModel(sam_config)
    skip = list(QUANTIZATION_SKIP_MODULES)
    quantizable = rows = largest = lora_params = lora_inputs = clip_weights = clip_rows = 0
    for name, module in llava.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.startswith("model.vision_tower."):
            clip_weights += module.weight.numel()
            clip_rows += module.out_features
        if should_convert_module(name, skip):
            quantizable += module.weight.numel()
            rows += module.out_features
            largest = max(largest, module.weight.numel())
        if lora is not None and re.fullmatch(lora[1], name):
            lora_params += lora[0] * (module.in_features + module.out_features)
            lora_inputs += module.in_features
    total_llava = sum(p.numel() for p in llava.parameters())
    text, vision = llava_config.text_config, llava_config.vision_config
    hidden = text.hidden_size
    decoder = sum(p.numel() for p in sam.mask_decoder.parameters())
    prompt_size = sam_config.mask_decoder_config.hidden_size
    sam_vision = sam_config.vision_config
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    image_side = vision.image_size // vision.patch_size
    extra_image_tokens = 0 if llava_config.vision_feature_select_strategy == "default" else 1
    return ArchitectureCounts(
        quantizable=quantizable,
        quantizable_rows=rows,
        largest_quantizable=largest,
        llava_other=total_llava - quantizable,
        sam_frozen=sum(p.numel() for p in sam.parameters()) - decoder,
        sam_decoder=decoder,
        projection=hidden * hidden + hidden + hidden * prompt_size + prompt_size,
        lora=lora_params,
        projector=sum(p.numel() for p in llava.model.multi_modal_projector.parameters()),
        seg_rows=2 * hidden * lora[2] if lora is not None else 0,
        lora_inputs_per_layer=lora_inputs // text.num_hidden_layers,
        hidden=hidden,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        kv_dim=text.num_key_value_heads * head_dim,
        vocab=text.vocab_size,
        image_tokens=image_side * image_side + extra_image_tokens,
        sam_width=sam_vision.hidden_size,
        sam_heads=sam_vision.num_attention_heads,
        sam_grid=sam_vision.image_size // sam_vision.patch_size,
        sam_image_size=sam_vision.image_size,
        sam_embedding_channels=sam_vision.output_channels,
        decoder_width=prompt_size,
        vision_feature_dim=hidden,
        vision_linear=clip_weights,
        vision_linear_rows=clip_rows,
        sam_encoder=sum(p.numel() for p in sam.vision_encoder.parameters()),
    )


# The arithmetic ---------------------------------------------------------------------------------
def estimate_memory(
    cfg: ModelConfig,
    batch_size: int = 1,
    seq_len: int | None = None,
    gradient_checkpointing: bool | None = None,
    sam_variant: str | None = None,
    optimizer: str = "adamw",
    new_tokens: int = 48,
    masks_per_sample: int = 1,
    cache_images: int = 16,
    prefix_caches: int = 2,
) -> MemoryEstimate:
    """Peak GPU memory of inference and of a LoRA training step for `cfg`.

    seq_len: tokens per sample, image tokens included (default: image tokens + the
    architecture's text tokens, 64 for llava-1.5); gradient_checkpointing: default
    cfg.gradient_checkpointing; sam_variant: base / large / huge (default: from cfg.sam);
    optimizer: adamw | paged_adamw_8bit; new_tokens: answer length for inference; cache_images:
    images the pipeline keeps encoded; prefix_caches: images that also keep their prompt
    prefix's KV cache (LisaPipeline's prefix_cache_size). The memory savings (lean_token_rows,
    vision_quantization, offload_sam_encoder) come from cfg.
    """
    from lisa_demo.architectures import architecture

    if cfg.train_all:
        raise ConfigError("the estimator covers LoRA / heads-only training, not --train-all")
    counts = count_parameters(cfg, sam_variant)
    arch = architecture(cfg.architecture)
    text_tokens = DEFAULT_TEXT_TOKENS if cfg.build_tiny else arch.text_tokens
    prefix_text = PREFIX_TEXT_TOKENS if cfg.build_tiny else arch.prefix_text_tokens
    seq_len = seq_len if seq_len is not None else counts.image_tokens + text_tokens
    checkpointing = cfg.gradient_checkpointing if gradient_checkpointing is None else (
        gradient_checkpointing
    )  # fmt: skip
    setting = {
        "llava": cfg.llava,
        "sam": sam_variant or cfg.sam,
        "architecture": cfg.architecture,
        "quantization": cfg.quantization,
        "precision": cfg.precision,
        "lora_r": cfg.lora_r if cfg.use_lora else 0,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "gradient_checkpointing": checkpointing,
        "optimizer": optimizer,
        "lean_token_rows": cfg.lean_token_rows,
        "vision_quantization": cfg.vision_quantization,
        "offload_sam_encoder": cfg.offload_sam_encoder,
    }
    return estimate_from_counts(
        counts,
        setting,
        quantization=cfg.quantization,
        precision=cfg.precision,
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=checkpointing,
        optimizer=optimizer,
        new_tokens=new_tokens,
        masks_per_sample=masks_per_sample,
        cache_images=cache_images,
        prefix_caches=prefix_caches,
        prefix_text_tokens=prefix_text,
        lean_token_rows=cfg.lean_token_rows,
        vision_quantization=cfg.vision_quantization,
        offload_sam_encoder=cfg.offload_sam_encoder,
    )


def estimate_from_counts(
    counts: ArchitectureCounts,
    setting: dict,
    *,
    quantization: str,
    precision: str,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    optimizer: str,
    new_tokens: int,
    masks_per_sample: int,
    cache_images: int,
    prefix_caches: int,
    answer_tokens: int = DEFAULT_ANSWER_TOKENS,
    prefix_text_tokens: int = PREFIX_TEXT_TOKENS,
    lean_token_rows: bool = False,
    vision_quantization: str = "none",
    offload_sam_encoder: bool = False,
) -> MemoryEstimate:
    """The module docstring's formulas, applied to given counts (pure arithmetic)."""
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ConfigError(f"optimizer must be one of {tuple(OPTIMIZER_STATE_BYTES)}")
    if batch_size < 1 or seq_len < 1:
        raise ConfigError("batch size and sequence length must be at least 1")
    c, b = counts, DTYPE_BYTES[precision]
    vision = c.vision_linear if vision_quantization != "none" else 0
    weights = (
        MemoryTerm("language-model linears", _quantized_bytes(c.quantizable, c.quantizable_rows,
                                                              quantization, b),
                   _QUANTIZED_NOTES.get(quantization, f"{b} bytes")),
        MemoryTerm("vision, projector, embeddings, lm_head", (c.llava_other - vision) * b,
                   f"{b} bytes"),
    )  # fmt: skip
    if vision:
        weights += (
            MemoryTerm("CLIP tower linears", _quantized_bytes(
                c.vision_linear, c.vision_linear_rows, vision_quantization, b),
                _QUANTIZED_NOTES[vision_quantization]),
        )  # fmt: skip
    sam = MemoryTerm("SAM image + prompt encoder", c.sam_frozen * b, f"{b} bytes")
    dequantized = c.largest_quantizable * b if quantization != "none" else 0
    merged_head = 0 if lean_token_rows or not c.seg_rows else c.vocab * c.hidden * b
    training = _training_plan(
        c, b, weights, sam, _sam_encoder_terms(c, batch_size, b),
        batch=batch_size, seq_len=seq_len, checkpointing=gradient_checkpointing,
        answer_tokens=min(answer_tokens, seq_len),
        optimizer=optimizer, masks=batch_size * masks_per_sample, dequantized=dequantized,
        autocast_copies=c.trainable * b if precision != "fp32" else 0,
        merged_head=merged_head, offload_sam_encoder=offload_sam_encoder,
    )  # fmt: skip
    inference = _inference_plan(
        c, b, weights + (sam,), prompt_len=seq_len, new_tokens=new_tokens,
        cache_images=cache_images, prefix_caches=prefix_caches,
        prefix_text_tokens=prefix_text_tokens, dequantized=dequantized, merged_head=merged_head,
    )  # fmt: skip
    return MemoryEstimate(setting=setting, counts=counts, inference=inference, training=training)


_QUANTIZED_NOTES = {"4bit": "NF4 + double quant, 4.127 bits", "8bit": "int8 + row scales"}


def _quantized_bytes(weights: int, rows: int, quantization: str, b: int) -> int:
    if quantization == "4bit":
        return round(weights * NF4_BITS / 8)
    if quantization == "8bit":
        return weights + 4 * rows
    return weights * b


def _sam_encoder_terms(c: ArchitectureCounts, images: int, b: int) -> tuple[MemoryTerm, ...]:
    tokens = c.sam_grid**2
    return (
        MemoryTerm("global-attention bias", images * c.sam_heads * tokens**2 * b,
                   "[heads, N, N]"),
        MemoryTerm("encoder tensors", images * 8 * tokens * c.sam_width * b, "8 N w"),
    )  # fmt: skip


def _inference_plan(
    c: ArchitectureCounts,
    b: int,
    shared: tuple[MemoryTerm, ...],
    *,
    prompt_len: int,
    new_tokens: int,
    cache_images: int,
    prefix_caches: int,
    prefix_text_tokens: int,
    dequantized: int,
    merged_head: int,
) -> MemoryPlan:
    steps = prompt_len + new_tokens
    per_image = c.sam_embedding_channels * c.sam_grid**2 + c.image_tokens * c.vision_feature_dim
    prefix = c.image_tokens + prefix_text_tokens
    resident = shared + (
        MemoryTerm("projection + mask decoder", (c.projection + c.sam_decoder) * b, f"{b} bytes"),
        MemoryTerm("LoRA + [SEG] rows", (c.lora + c.seg_rows) * 4, "fp32"),
        MemoryTerm("image cache", cache_images * per_image * b, f"{cache_images} images"),
        MemoryTerm("prompt-prefix KV caches", prefix_caches * 2 * c.layers * prefix * c.kv_dim * b,
                   f"{prefix_caches} images x {prefix} positions"),
    )  # fmt: skip
    generation = (
        MemoryTerm("KV cache", 2 * c.layers * steps * c.kv_dim * b, f"{steps} positions"),
        MemoryTerm("hidden states kept by generate", (c.layers + 1) * steps * c.hidden * b,
                   "output_hidden_states"),
        MemoryTerm("prefill MLP transient", 3 * prompt_len * c.intermediate * b, "3 L I"),
        MemoryTerm("dequantized weight", dequantized, "largest 4-/8-bit layer"),
        MemoryTerm("merged lm_head copy", merged_head, "peft trainable tokens"),
    )  # fmt: skip
    encoder = _sam_encoder_terms(c, 1, b)
    return MemoryPlan(resident, (("generation", generation), ("SAM image encoder", encoder)))


def _training_plan(
    c: ArchitectureCounts,
    b: int,
    weights: tuple[MemoryTerm, ...],
    sam: MemoryTerm,
    sam_encoder: tuple[MemoryTerm, ...],
    *,
    batch: int,
    seq_len: int,
    checkpointing: bool,
    answer_tokens: int,
    optimizer: str,
    masks: int,
    dequantized: int,
    autocast_copies: int,
    merged_head: int,
    offload_sam_encoder: bool,
) -> MemoryPlan:
    trainable = c.trainable  # kept only as fp32 master weights (the loop upcasts them)
    master = MemoryTerm("trainable weights (fp32)", trainable * 4, f"{trainable:,} parameters")
    state = (
        MemoryTerm("gradients (fp32)", trainable * 4),
        MemoryTerm("optimizer state", trainable * OPTIMIZER_STATE_BYTES[optimizer], optimizer),
    )
    tokens = batch * seq_len
    layer = layer_activation_bytes(c, b)
    outputs = (c.layers + 1) * tokens * c.hidden * b
    if c.lora == 0:  # nothing in the LM trains: no backward through it
        stored = MemoryTerm("LM layer activations", 0, "frozen LM, no backward")
    elif checkpointing:
        stored = MemoryTerm("one layer recomputed in backward", tokens * layer, "checkpointing")
    else:
        stored = MemoryTerm("LM layer activations", c.layers * tokens * layer, "n B L per-layer")
    decoder = masks * (
        SAM_DECODER_ELEMENTS_PER_CELL_AND_CHANNEL * c.decoder_width * c.sam_grid**2 * b
        + MASK_MAPS_FP32 * c.sam_image_size**2 * 4
    )
    step = (
        MemoryTerm("layer outputs (hidden states)", outputs, "(n + 1) B L h"),
        stored,
        MemoryTerm("logits + fp32 loss copies", batch * answer_tokens * c.vocab * 10,
                   "B A V x 10 bytes (answer positions only)"),
        MemoryTerm("merged lm_head copy", merged_head, "peft trainable tokens"),
        MemoryTerm("full gradient of that copy", merged_head, "V h, in backward"),
        MemoryTerm("SAM decoder + mask losses", decoder, f"{masks} masks"),
        MemoryTerm("dequantized weight", dequantized, "largest 4-/8-bit layer"),
        MemoryTerm("autocast copies of trainable weights", autocast_copies, f"{b} bytes"),
    )  # fmt: skip
    if not offload_sam_encoder:
        resident = weights + (sam, master) + state
        groups = (("step activations", step), ("SAM image encoder", sam_encoder))
        return MemoryPlan(resident, groups)
    # Every image is encoded before the first step; then the encoder leaves the GPU.
    encoder_weights = c.sam_encoder * b
    prompt = MemoryTerm("SAM prompt encoder", sam.bytes - encoder_weights, f"{b} bytes")
    encoding = (MemoryTerm("SAM image encoder weights", encoder_weights, "before offloading"),)
    return MemoryPlan(
        weights + (prompt, master),
        (("step (encoder offloaded)", state + step),
         ("encoding every image first", encoding + sam_encoder)),
    )  # fmt: skip


def layer_activation_bytes(c: ArchitectureCounts, b: int) -> int:
    """Bytes one LM layer keeps for backward, per token (LoRA on a frozen base)."""
    norms = 2 * 4 * c.hidden
    lora = 3 * c.lora_inputs_per_layer
    attention = b * (2 * c.hidden + 2 * c.kv_dim)
    mlp = 3 * b * c.intermediate
    return norms + lora + attention + mlp
