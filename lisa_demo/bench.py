"""Speed and memory of LISA inference and training, measured in one run; the memory estimator.

    python -m lisa_demo.bench                              # the bundled tiny model, this machine
    python -m lisa_demo.bench --preset tiny-random --json --repeats 3
    python -m lisa_demo.bench --flush-denormal       # CPU: subnormal floats count as zero
    python -m lisa_demo.bench --preset llava-1.5-7b --random-weights --sam base --batch-size 1
    python -m lisa_demo.bench --preset lisa-7b-v1 --random-weights --batch-size 1
    python -m lisa_demo.bench --estimate-memory --preset llava-1.5-7b --quantization 4bit

One run measures, after a warm-up and as medians over --repeats:
  - a first query on a new image (per stage) and a second query on the same image (cached);
  - a batch of 4 queries on one image against 4 single queries;
  - 32-token greedy generation with the KV cache against without it (the reference's way);
  - a 32-token answer through the pipeline (a new image, then a second question on it) against
    LISA's own way: no KV cache (each new token re-runs the whole sequence, and with it CLIP),
    both image encoders run for every question; and the parity of the two paths' logits and
    masks on the same forced answer (bf16 for the real-size presets);
  - training samples/s with the embedding caches (SAM image embeddings, LLaVA vision features)
    against running both frozen image encoders every step, and the time of one step;
  - peak memory (ru_maxrss on a CPU, torch.cuda.max_memory_allocated on a GPU), with the memory
    estimator's figure for the same setting beside each GPU peak.
Answers in the inference measurements are forced to FORCED_ANSWER (a logits processor picks
the tokens, the model still runs every forward pass), so every model, random weights included,
does the same work: one short LISA answer with one [SEG] and one mask.
Speed and memory goals live here (TARGETS), never in timed unit tests.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lisa_demo.config import (
    BUNDLED_MODEL_DIR,
    PRECISIONS,
    PRESETS,
    QUANTIZATIONS,
    ConfigError,
    ModelConfig,
    base_model_config,
    preset,
)
from lisa_demo.paths import MODEL, check_cli_paths

FORCED_ANSWER = "Sure, [SEG]."
# Words after FORCED_ANSWER in the 32-token answers (an explanation, as LISA's models give).
EXPLANATION = " It is the shape on the left of the image, next to the other one."
QUESTIONS = (
    "Can you segment the red square in this image?",
    "Please segment the blue circle in this image.",
    "What is the largest shape in this image? Please output segmentation mask.",
    "Which object is nearest to the left edge? Please respond with segmentation mask.",
)
KV_TOKENS = 32
TRAIN_IMAGES = 4
SAM_CHOICES = ("base", "large", "huge")
GPU_COMMAND = (
    "python -m lisa_demo.bench --preset llava-1.5-7b --random-weights --sam base "
    "--batch-size 1 --device cuda --json"
)

# name -> (comparison, goal, what it is)
TARGETS: dict[str, tuple[str, float, str]] = {
    "second_query_over_first": ("<=", 0.4, "second query on the same image / first query"),
    "training_cache_speedup": (">=", 1.5, "training samples/s with / without embedding cache"),
    "kv_cache_speedup": (">=", 2.0, "32-token generation time without / with the KV cache"),
    "qlora_training_peak_gib": (
        "<=",
        5.0,
        "llava-1.5-7b 4-bit QLoRA step, SAM base, batch 1, checkpointing: peak GiB (GPU)",
    ),
    "estimator_error": ("<=", 0.15, "|estimate - measured| / measured of that peak (GPU)"),
}


# Model configuration ------------------------------------------------------------------------
def bundled_model_available() -> bool:
    return (BUNDLED_MODEL_DIR / "llava" / "config.json").exists()


def model_config(args: argparse.Namespace, notes: list[str]) -> ModelConfig:
    """The preset (or --model folder) with the command line's overrides; "tiny" falls back to
    tiny-random. --random-weights builds the preset's architecture (llava-1.5-7b, lisa-7b,
    lisa-13b)."""
    name = args.preset
    if args.model is not None:
        if args.random_weights or args.sam:
            raise ConfigError("--model loads a full-model folder: drop --random-weights and --sam")
        name = None
    elif name == "tiny" and not bundled_model_available():
        notes.append(
            f"the bundled model ({BUNDLED_MODEL_DIR}) is not there yet: using --preset tiny-random"
        )
        name = "tiny-random"
    cfg = base_model_config(name, args.model) if args.model is not None else preset(name)
    changes: dict[str, object] = {}
    if args.random_weights:
        if cfg.build_tiny or name == "tiny":
            raise ConfigError(
                "--random-weights is for the full-size presets (llava-1.5-7b, lisa-*)"
            )
        changes["random_weights"] = True
        if cfg.prompt_format == "llava_v1":
            # The tiny tokenizer would spell LISA's system prompt in characters (98 tokens,
            # LLaMA's has about 40): llava-1.5's image-first prompt, 4 tokens before the image.
            changes["prompt_format"] = None
            notes.append("random weights: llava-1.5's prompt instead of LISA's llava_v1")
    if args.sam:
        if cfg.build_tiny or name == "tiny":
            raise ConfigError("--sam picks a full-size SAM: use it with a full-size preset")
        changes["sam"] = f"facebook/sam-vit-{args.sam}"
    for field in ("quantization", "precision", "gradient_checkpointing", "lean_token_rows",
                  "vision_quantization", "offload_sam_encoder"):  # fmt: skip
        if getattr(args, field) is not None:
            changes[field] = getattr(args, field)
    if args.lora_r is not None:
        changes.update(lora_r=args.lora_r, use_lora=True)
    if args.lora_targets:
        changes.update(lora_targets=tuple(args.lora_targets), use_lora=True)
    if args.lora_dropout is not None:
        changes["lora_dropout"] = args.lora_dropout
    return cfg.replace(**changes) if changes else cfg


def sam_variant_of(cfg: ModelConfig) -> str | None:
    from lisa_demo.architectures import sam_variant

    try:
        return sam_variant(cfg.sam)
    except ValueError:
        return None


# Timing and memory ---------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device) -> tuple[float, object]:
    """(seconds, result) of one call, with the device's queue drained on both sides."""
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_allocated_mib(device) -> float | None:
    """torch.cuda.max_memory_allocated since the last reset_peak, in MiB; None on a CPU."""
    import torch

    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def scene(seed: int):
    """A synthetic scene (HxWx3 uint8) drawn from a fixed seed."""
    from lisa_demo.data.synthetic import generate_scene

    return generate_scene(random.Random(seed))[0]


class ForcedAnswer:
    """Logits processor for one generate call: writes `token_ids`, then EOS, whatever the
    model prefers. Only the choice of token is forced; every forward pass is the model's own."""

    def __init__(self, token_ids: list[int], eos_id: int, record: bool = False) -> None:
        self.script = [*token_ids, eos_id]
        self.start: int | None = None
        self.scores: list = []  # with record: each step's own scores [V] (first row), on the CPU
        self.record = record

    def __call__(self, input_ids, scores):
        import torch

        if self.start is None:
            self.start = input_ids.shape[1]
        if self.record:
            self.scores.append(scores[0].detach().float().cpu())
        step = min(input_ids.shape[1] - self.start, len(self.script) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.script[step]] = 0.0
        return forced


# Inference -----------------------------------------------------------------------------------
def measure_inference(loaded, repeats: int) -> dict:
    """First and second query on one image (per stage), 4 batched vs 4 single queries."""
    from transformers import LogitsProcessorList

    from lisa_demo.infer.pipeline import LisaPipeline

    pipeline = LisaPipeline(loaded, cache_size=16)
    tokenizer = loaded.tokenizer
    answer_ids = tokenizer(" " + FORCED_ANSWER, add_special_tokens=False).input_ids

    def run(call: Callable, *args):
        processor = ForcedAnswer(answer_ids, tokenizer.eos_token_id)
        pipeline.logits_processor = LogitsProcessorList([processor])
        return timed(lambda: call(*args), loaded.device)

    device, image, warm = loaded.device, scene(11), scene(12)
    run(pipeline.segment, warm, QUESTIONS[0])  # warm-up: every code path once
    peak = None
    first, second, batched, singles = [], [], [], []
    for _ in range(repeats):
        pipeline.clear_cache()
        _, cold = run(pipeline.segment, image, QUESTIONS[0])
        _, warm_result = run(pipeline.segment, image, QUESTIONS[1])
        if cold.cache_hit or not warm_result.cache_hit:
            raise RuntimeError("the image cache did not behave: first query hit or second missed")
        if peak is None:  # single questions only: what the estimator's inference plan is
            peak = peak_allocated_mib(device)
            run(pipeline.segment_batch, warm, list(QUESTIONS))  # warm-up of the batched path
        first.append(cold.timings)
        second.append(warm_result.timings)
        pipeline.clear_cache()
        batched.append(run(pipeline.segment_batch, image, list(QUESTIONS))[0])
        pipeline.clear_cache()
        _sync(device)
        start = time.perf_counter()
        for question in QUESTIONS:
            run(pipeline.segment, image, question)
        singles.append(time.perf_counter() - start)
    stages = ("image_encoding", "generation", "mask_decoding", "total")
    first_s = {k: median([t[k] for t in first]) for k in stages}
    second_s = {k: median([t[k] for t in second]) for k in stages}
    batch_s, singles_s = median(batched), median(singles)
    return {
        "image_size": list(image.shape[:2]),
        "answer": cold.answer,
        "answer_tokens": len(answer_ids),
        "masks": len(cold.masks),
        "first_query_s": first_s,
        "second_query_s": second_s,
        "second_over_first": second_s["total"] / first_s["total"],
        "batch_of_4_s": batch_s,
        "four_single_queries_s": singles_s,
        "singles_over_batch": singles_s / batch_s,
        "prompt_tokens": len(pipeline._prompt_ids([QUESTIONS[0]])[0]),
        # torch.cuda.max_memory_allocated over a warm-up and the first new-image and
        # same-image questions (None on a CPU)
        "peak_allocated_mib": peak,
    }


def measure_generation(loaded, repeats: int, new_tokens: int = KV_TOKENS) -> dict:
    """Greedy generation of exactly `new_tokens` tokens with and without the KV cache."""
    import torch

    from lisa_demo.inputs import (
        collate_text,
        encode_image,
        encode_text,
        image_token_count,
    )

    llava = loaded.model.base_llava
    tokenizer = loaded.tokenizer
    encoded = encode_image(scene(11), loaded.processor, loaded.sam_processor)
    n_image = image_token_count(loaded.processor)
    ids, _ = encode_text(tokenizer, QUESTIONS[0], None, n_image, loaded.prompt_format)
    batch = collate_text([ids], None, tokenizer.pad_token_id)
    vision_dtype = next(llava.model.vision_tower.parameters()).dtype
    inputs = {name: tensor.to(loaded.device) for name, tensor in batch.items()}
    inputs["pixel_values"] = encoded.pixel_values[None].to(loaded.device, vision_dtype)

    def generate(use_cache: bool, tokens: int = new_tokens) -> torch.Tensor:
        with torch.inference_mode():
            return llava.generate(
                **inputs,
                do_sample=False,
                use_cache=use_cache,
                min_new_tokens=tokens,
                max_new_tokens=tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )

    generate(True, 4)  # warm-up: every path once, with a short answer
    generate(False, 4)
    cached, uncached = [], []
    for _ in range(repeats):
        seconds, with_cache = timed(lambda: generate(True), loaded.device)
        cached.append(seconds)
        seconds, without_cache = timed(lambda: generate(False), loaded.device)
        uncached.append(seconds)
    prompt = inputs["input_ids"].shape[1]
    return {
        "prompt_tokens": prompt,
        "new_tokens": int(with_cache.shape[1] - prompt),
        "kv_cache_s": median(cached),
        "no_cache_s": median(uncached),
        "kv_cache_speedup": median(uncached) / median(cached),
        "same_tokens": bool(torch.equal(with_cache, without_cache)),
    }


# LISA's own way ----------------------------------------------------------------------------------
def long_answer_ids(tokenizer, tokens: int) -> list[int]:
    """`tokens - 1` ids of "Sure, [SEG]." and an explanation (EOS makes `tokens`)."""
    ids = tokenizer(" " + FORCED_ANSWER + EXPLANATION, add_special_tokens=False).input_ids
    filler = tokenizer(EXPLANATION, add_special_tokens=False).input_ids
    while len(ids) < tokens - 1:
        ids += filler
    return ids[: tokens - 1]


def lisa_way_segment(loaded, image, question: str, processor) -> dict:
    """One question answered as LISA's code does it: both image encoders run for this
    question, then greedy decoding without a KV cache (every step re-runs the whole sequence
    through LLaVA, CLIP included), then the `[SEG]` states of the last pass become masks.

    `processor` chooses the tokens (a ForcedAnswer). Returns the new ids, the last step's
    mask logits [n, H, W] and the number of steps.
    """
    import torch

    from lisa_demo.inputs import encode_image, encode_text, image_token_count
    from lisa_demo.model import seg_query_mask

    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    llava = model.base_llava
    encoded = encode_image(image, loaded.processor, loaded.sam_processor)
    n_image = image_token_count(loaded.processor)
    prompt = encode_text(tokenizer, question, None, n_image, loaded.prompt_format)[0]
    vision_dtype = next(llava.model.vision_tower.parameters()).dtype
    with torch.inference_mode():
        embeddings = model.encode_images(encoded.sam_pixel_values[None].to(device))
        pixels = encoded.pixel_values[None].to(device, vision_dtype)
        sequence = torch.tensor([prompt], device=device)
        eos, steps = tokenizer.eos_token_id, 0
        while True:
            out = llava(input_ids=sequence, pixel_values=pixels, use_cache=False,
                        output_hidden_states=True, logits_to_keep=1)  # fmt: skip
            steps += 1
            chosen = processor(sequence, out.logits[:, -1].float()).argmax(-1)
            sequence = torch.cat([sequence, chosen[:, None]], dim=1)
            if int(chosen[0]) == eos or steps >= len(processor.script):
                break
        states = out.hidden_states[-1][0]  # the last pass: every position but the new token
        query = seg_query_mask(sequence, model.seg_token_id)[0, : states.shape[0]]
        logits, _ = model.decode_masks(
            [model.project(states[query])], embeddings, [encoded.input_size],
            [encoded.original_size],
        )  # fmt: skip
    return {"ids": sequence[0, len(prompt) :].tolist(), "mask_logits": logits[0], "steps": steps}


def measure_lisa_way(loaded, repeats: int, new_tokens: int = KV_TOKENS) -> dict:
    """A `new_tokens`-token answer (one [SEG]) three ways, medians over `repeats`: the
    pipeline on a new image (both encoders, prefill, cached decoding), the pipeline's second
    question on that image (encodings and prompt prefix cached), and LISA's own way
    (lisa_way_segment). Also the parity of the pipeline and LISA's way on the same forced
    answer: per-step logits and the mask."""
    from transformers import LogitsProcessorList

    from lisa_demo.infer.pipeline import LisaPipeline

    tokenizer, device = loaded.tokenizer, loaded.device
    script = long_answer_ids(tokenizer, new_tokens)
    eos = tokenizer.eos_token_id
    pipeline = LisaPipeline(loaded, cache_size=16, max_new_tokens=new_tokens)

    def ours(question: str, record: bool = False, answer: list[int] = script):
        processor = ForcedAnswer(answer, eos, record=record)
        pipeline.logits_processor = LogitsProcessorList([processor])
        seconds, result = timed(lambda: pipeline.segment(image, question, keep_logits=True),
                                device)  # fmt: skip
        return seconds, result, processor

    def lisa(question: str, record: bool = False, answer: list[int] = script):
        processor = ForcedAnswer(answer, eos, record=record)
        seconds, result = timed(lambda: lisa_way_segment(loaded, image, question, processor),
                                device)  # fmt: skip
        return seconds, result, processor

    image = scene(12)  # warm-up on another image: every path once, with a short answer
    ours(QUESTIONS[2], answer=script[:3])
    lisa(QUESTIONS[2], answer=script[:3])
    image = scene(11)
    first, second, lisa_s = [], [], []
    for _ in range(repeats):
        pipeline.clear_cache()
        seconds, cold, _ = ours(QUESTIONS[0])
        first.append(seconds)
        seconds, warm, _ = ours(QUESTIONS[1])
        if cold.cache_hit or not warm.cache_hit:
            raise RuntimeError("the image cache did not behave: first question hit, second missed")
        second.append(seconds)
        lisa_s.append(lisa(QUESTIONS[0])[0])
    # Parity, untimed (recording each step's scores copies them to the CPU): the same question
    # on the new image both ways, the same forced tokens.
    pipeline.clear_cache()
    _, cold, ours_scores = ours(QUESTIONS[0], record=True)
    _, theirs, lisa_scores = lisa(QUESTIONS[0], record=True)
    parity = answer_parity(ours_scores.scores, lisa_scores.scores, cold, theirs)
    first_s, second_s, lisa_way_s = median(first), median(second), median(lisa_s)
    return {
        "new_tokens": len(script) + 1,
        "answer_tokens_generated": {
            "ours": len(ours_scores.scores),
            "lisa_way": theirs["steps"],
        },  # fmt: skip
        "first_question_s": first_s,
        "second_question_s": second_s,
        "lisa_way_s": lisa_way_s,
        "second_over_first": second_s / first_s,
        "lisa_way_over_ours": lisa_way_s / first_s,
        "lisa_way_over_ours_same_image": lisa_way_s / second_s,
        "parity": parity,
    }


def answer_parity(ours: list, theirs: list, result, lisa: dict) -> dict:
    """How far the pipeline's cached path and LISA's uncached way are apart on one forced
    answer: per-step vocabulary logits (max |difference|, relative to the largest |logit|,
    and how often the unforced greedy choice agrees) and the mask (IoU, logits)."""
    import numpy as np
    import torch

    steps = min(len(ours), len(theirs))
    a, b = torch.stack(ours[:steps]), torch.stack(theirs[:steps])
    diff = (a - b).abs()
    mask_ours = result.masks[0].logits if result.masks else None
    mask_lisa = lisa["mask_logits"].float().cpu().numpy()
    parity = {
        "dtype": str(a.dtype),
        "steps": steps,
        "max_abs_logit_diff": float(diff.max()),
        "max_rel_logit_diff": float(diff.max() / b.abs().max().clamp(min=1e-12)),
        "greedy_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "masks": [len(result.masks), int(mask_lisa.shape[0])],
        "mask_iou": None,
        "max_abs_mask_logit_diff": None,
    }
    if mask_ours is not None and mask_lisa.shape[0]:
        x, y = mask_ours > 0, mask_lisa[0] > 0
        union = np.logical_or(x, y).sum()
        parity["mask_iou"] = float(np.logical_and(x, y).sum() / union) if union else 1.0
        parity["max_abs_mask_logit_diff"] = float(np.abs(mask_ours - mask_lisa[0]).max())
    return parity


# Training ------------------------------------------------------------------------------------
def training_batches(loaded, folder: Path, batch_size: int, count: int) -> list[dict]:
    """`count` batches of synthetic samples, as the training loop builds them."""
    from lisa_demo.data.reasonseg import ReasonSegDataset
    from lisa_demo.data.synthetic import generate_dataset
    from lisa_demo.train.data import SampleBatcher

    generate_dataset(folder, {"train": TRAIN_IMAGES}, seed=0)
    dataset = ReasonSegDataset(folder / "train", queries="all", seed=0)
    batcher = SampleBatcher(
        loaded.processor, loaded.sam_processor, seed=0, fmt=loaded.prompt_format
    )
    batches = []
    for n in range(count):
        indices = [(n * batch_size + i) % len(dataset) for i in range(batch_size)]
        samples = [dataset[i] for i in indices]
        batches.append(batcher(samples, training=True, indices=indices))
    return batches


def train_step(model, optimizer, params, batch: dict, caches, device, autocast_dtype) -> float:
    """One forward/backward/AdamW step like the loop's. `caches`: (SAM embeddings, LLaVA
    vision features) caches, or None to run both image encoders, as the reference does."""
    import torch

    from lisa_demo.train.data import training_inputs

    sam_cache, feature_cache = caches or (None, None)
    inputs = training_inputs(batch, device, sam_cache, model.encode_images, feature_cache,
                             model.encode_image_features)  # fmt: skip
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(**inputs)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def measure_training(cfg: ModelConfig, device, batch_size: int, steps: int, repeats: int) -> dict:
    """Samples/s of LoRA fine-tuning steps with the embedding caches and without them.

    Same model, same batches. With the caches (SAM image embeddings and LLaVA's vision
    features, both encoders frozen) is their steady state (every image already encoded: the
    other paraphrases of an image, epochs after the first); without them, both image
    encoders run on every step, as in the reference.
    """
    import torch

    from lisa_demo.loading import load_lisa
    from lisa_demo.memory_savings import encode_all, offload
    from lisa_demo.train.data import EmbeddingCache

    train_cfg = cfg if cfg.use_lora else cfg.replace(use_lora=True)
    loaded = load_lisa(train_cfg, device=device, for_training=True)
    model = loaded.model
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # fp32 master weights, as in the loop
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train_cfg.precision)
    with tempfile.TemporaryDirectory() as tmp:
        batches = training_batches(loaded, Path(tmp), batch_size, steps)
    cache, feature_cache = EmbeddingCache("bench"), EmbeddingCache("bench/vision")
    caches = (cache, feature_cache)
    reset_peak(device)
    # The training loop's way: with offload_sam_encoder every image is encoded first and the
    # encoder leaves the GPU; without, the first steps fill the caches on their misses.
    offloaded = train_cfg.offload_sam_encoder
    if offloaded:
        encode_all(batches, cache, model.encode_images, device)
        offload(model.sam.vision_encoder)
    start = time.perf_counter()
    losses = [train_step(model, optimizer, params, b, caches, device, autocast) for b in batches]
    _sync(device)
    first_pass_s = time.perf_counter() - start
    steady_peak = peak_allocated_mib(device)  # the loop's peak: weights, steps, cache fills
    if offloaded:  # the uncached comparison runs the encoder on every step, on the device
        model.sam.vision_encoder.to(device)
    train_step(model, optimizer, params, batches[0], None, device, autocast)  # warm-up

    def block(use_cache: bool) -> float:
        seconds, _ = timed(
            lambda: [
                train_step(model, optimizer, params, b, caches if use_cache else None, device,
                           autocast)
                for b in batches
            ],
            device,
        )  # fmt: skip
        return len(batches) * batch_size / seconds

    with_cache, without_cache = [], []
    for _ in range(repeats):
        with_cache.append(block(True))
        without_cache.append(block(False))
    lengths = [int(b["attention_mask"].sum(1).max()) for b in batches]
    savings = {
        name: getattr(train_cfg, name)
        for name in ("lean_token_rows", "vision_quantization", "offload_sam_encoder")
    }
    result = {
        "batch_size": batch_size,
        "steps_per_block": len(batches),
        "seq_len": max(lengths),
        "lora": train_cfg.use_lora,
        "lora_r": train_cfg.lora_r,
        "lora_targets": list(train_cfg.lora_targets),
        "lora_dropout": train_cfg.lora_dropout,
        "gradient_checkpointing": train_cfg.gradient_checkpointing,
        **savings,
        "cached_samples_per_s": median(with_cache),
        "uncached_samples_per_s": median(without_cache),
        # one optimizer step with the caches (steady state), and the first pass's mean step
        "step_s": batch_size / median(with_cache),
        "first_pass_step_s": first_pass_s / len(batches),
        "cache_speedup": median(with_cache) / median(without_cache),
        "losses_finite": all(math.isfinite(x) for x in losses),
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
        "feature_cache_hits": feature_cache.hits,
        "feature_cache_misses": feature_cache.misses,
    }
    # torch.cuda.max_memory_allocated (None on a CPU): over the loop's way (encoding, the first
    # pass of steps), and over the whole section (the uncached blocks run SAM's encoder too)
    result["peak_allocated_mib"] = steady_peak
    result["peak_allocated_all_mib"] = peak_allocated_mib(device)
    return result


# The run -------------------------------------------------------------------------------------
def _target(name: str, value: float | None, note: str | None = None) -> dict:
    op, goal, what = TARGETS[name]
    met = None if value is None else (value <= goal if op == "<=" else value >= goal)
    entry = {"value": value, "target": f"{op} {goal}", "met": met, "what": what}
    if note:
        entry["note"] = note
    return entry


def _is_qlora_target(cfg: ModelConfig, device, batch_size: int) -> bool:
    return (
        device.type == "cuda"
        and cfg.architecture == "llava-1.5-7b"
        and "llava-1.5-7b" in cfg.llava
        and cfg.quantization == "4bit"
        and cfg.use_lora
        and cfg.gradient_checkpointing
        and sam_variant_of(cfg) == "base"
        and batch_size == 1
    )


def qlora_estimate(seq_len: int | None = None, batch_size: int = 1):
    """The estimator's figure for the GPU target's configuration."""
    from lisa_demo.memory import estimate_memory

    cfg = preset("llava-1.5-7b")
    return estimate_memory(
        cfg, batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=True,
        sam_variant="base",
    )  # fmt: skip


def targets(result: dict, cfg: ModelConfig, device, batch_size: int) -> dict:
    from lisa_demo.memory import GIB

    training = result["training"]
    out = {
        "second_query_over_first": _target(
            "second_query_over_first", result["inference"]["second_over_first"]
        ),
        "training_cache_speedup": _target("training_cache_speedup", training["cache_speedup"]),
        "kv_cache_speedup": _target("kv_cache_speedup", result["generation"]["kv_cache_speedup"]),
    }
    if _is_qlora_target(cfg, device, batch_size):
        estimate = result["memory"]["training_estimate_mib"] * 2**20
        measured = training["peak_allocated_mib"] * 2**20
        out["qlora_training_peak_gib"] = _target("qlora_training_peak_gib", measured / GIB)
        out["qlora_training_peak_gib"]["estimated"] = estimate / GIB
        out["estimator_error"] = _target("estimator_error", abs(estimate - measured) / measured)
    else:
        estimate = qlora_estimate().training.allocated
        note = f"needs a GPU; run: {GPU_COMMAND}"
        out["qlora_training_peak_gib"] = _target("qlora_training_peak_gib", None, note)
        out["qlora_training_peak_gib"]["estimated"] = estimate / GIB
        out["estimator_error"] = _target("estimator_error", None, note)
    return out


def memory_estimates(cfg: ModelConfig, inference: dict, training: dict, batch_size: int) -> dict:
    """The estimator's allocated peaks for what was measured (same sequence lengths, batch,
    images kept), beside the measured GPU peaks, and |estimate - measured| / measured."""
    from lisa_demo.memory import estimate_memory

    out: dict = {"inference_peak_mib": inference["peak_allocated_mib"],
                 "training_peak_mib": training["peak_allocated_mib"]}  # fmt: skip
    try:
        inf = estimate_memory(
            cfg, batch_size=1, seq_len=inference["prompt_tokens"],
            new_tokens=inference["answer_tokens"] + 1, cache_images=2, prefix_caches=2,
        ).inference  # fmt: skip
        train = estimate_memory(
            cfg if cfg.use_lora else cfg.replace(use_lora=True), batch_size=batch_size,
            seq_len=training["seq_len"],
        ).training  # fmt: skip
    except ConfigError as err:
        note = f"no estimate: {err}"
        return out | {"inference_estimate_mib": None, "training_estimate_mib": None,
                      "inference_estimate_error": None, "training_estimate_error": None,
                      "estimate_note": note}  # fmt: skip
    for name, plan in (("inference", inf), ("training", train)):
        estimate = round(plan.allocated / 2**20, 1)
        measured = out[f"{name}_peak_mib"]
        out[f"{name}_estimate_mib"] = estimate
        out[f"{name}_estimate_error"] = (
            None if not measured else round(abs(estimate - measured) / measured, 4)
        )
    return out


def machine() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_benchmark(
    cfg: ModelConfig,
    device=None,
    repeats: int = 3,
    train_steps: int = 3,
    batch_size: int = 2,
    notes: list[str] | None = None,
    answer_tokens: int = KV_TOKENS,
) -> dict:
    """Every measurement of the module docstring, in one process; returns the JSON object.
    answer_tokens: length of the long answers (generation, LISA's own way)."""
    import torch

    from lisa_demo.loading import load_lisa, pick_device
    from lisa_demo.train.loop import peak_memory_mb

    if repeats < 1 or train_steps < 1 or batch_size < 1:
        raise ConfigError("--repeats, --train-steps and --batch-size must be at least 1")
    if answer_tokens < 4:
        raise ConfigError("--answer-tokens must be at least 4 (the forced answer and EOS)")
    device = pick_device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA GPU is available; use --device cpu")
    started = time.perf_counter()
    info = machine()
    loaded = load_lisa(cfg, device=device)
    reset_peak(device)
    inference = measure_inference(loaded, repeats)
    generation = measure_generation(loaded, repeats, answer_tokens)
    lisa_way = measure_lisa_way(loaded, repeats, answer_tokens)
    memory = {"after_inference_mib": round(peak_memory_mb(device), 1)}
    del loaded
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    training = measure_training(cfg, device, batch_size, train_steps, repeats)
    memory["after_training_mib"] = round(peak_memory_mb(device), 1)
    memory["measure"] = (
        "torch.cuda.max_memory_allocated per section"
        if device.type == "cuda"
        else "ru_maxrss of the whole process so far (Python, libraries and both models)"
    )
    memory.update(memory_estimates(cfg, inference, training, batch_size))
    result = {
        "model": {
            "llava": cfg.llava,
            "sam": cfg.sam,
            "architecture": cfg.architecture,
            "quantization": cfg.quantization,
            "precision": cfg.precision,
            "random_weights": cfg.random_weights,
            "lean_token_rows": cfg.lean_token_rows,
            "vision_quantization": cfg.vision_quantization,
            "offload_sam_encoder": cfg.offload_sam_encoder,
            "gradient_checkpointing": cfg.gradient_checkpointing,
        },
        "device": str(device),
        "machine": info,
        "repeats": repeats,
        "inference": inference,
        "generation": generation,
        "lisa_way": lisa_way,
        "training": training,
        "memory": memory,
        "notes": list(notes or []),
    }
    result["targets"] = targets(result, cfg, device, batch_size)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    return result


# Output --------------------------------------------------------------------------------------
def format_report(result: dict) -> str:
    inf, gen, tr = result["inference"], result["generation"], result["training"]
    way, mem = result["lisa_way"], result["memory"]
    parity = way["parity"]
    ms = 1000.0
    lines = [
        f"LISA benchmark on {result['device']} ({result['machine']['torch_threads']} threads), "
        f"model {result['model']['llava']}, medians of {result['repeats']}",
        *(f"note: {n}" for n in result["notes"]),
        f"Inference (answer forced to {inf['answer']!r}, image {inf['image_size']}):",
    ]
    stages = (("first query (new image)", "first_query_s"), ("second query", "second_query_s"))
    for label, key in stages:
        t = inf[key]
        lines.append(
            f"  {label:<24} total {t['total'] * ms:8.1f} ms = image {t['image_encoding'] * ms:.1f}"
            f" + generation {t['generation'] * ms:.1f} + masks {t['mask_decoding'] * ms:.1f}"
        )
    lines += [
        f"  batch of 4 queries       {inf['batch_of_4_s'] * ms:8.1f} ms; 4 single queries "
        f"{inf['four_single_queries_s'] * ms:.1f} ms ({inf['singles_over_batch']:.2f}x)",
        f"Generation of {gen['new_tokens']} tokens after a {gen['prompt_tokens']}-token prompt: "
        f"KV cache {gen['kv_cache_s'] * ms:.1f} ms, without {gen['no_cache_s'] * ms:.1f} ms "
        f"({gen['kv_cache_speedup']:.2f}x), same tokens: {gen['same_tokens']}",
        f"A {way['new_tokens']}-token answer: new image {way['first_question_s'] * ms:.1f} ms, "
        f"second question on it {way['second_question_s'] * ms:.1f} ms "
        f"({way['second_over_first']:.2f}x), LISA's own way {way['lisa_way_s'] * ms:.1f} ms "
        f"({way['lisa_way_over_ours']:.2f}x the new image's, "
        f"{way['lisa_way_over_ours_same_image']:.2f}x the second's)",
        f"  parity with LISA's way ({parity['dtype']}): max |logit diff| "
        f"{parity['max_abs_logit_diff']:.3g} (relative {parity['max_rel_logit_diff']:.3g}), "
        f"greedy agreement {parity['greedy_agreement']:.3f}, mask IoU {parity['mask_iou']}",
        f"Training (batch {tr['batch_size']}, LoRA, {tr['steps_per_block']} steps per block): "
        f"{tr['cached_samples_per_s']:.2f} samples/s with the embedding caches, "
        f"{tr['uncached_samples_per_s']:.2f} without ({tr['cache_speedup']:.2f}x)",
        f"  one step {tr['step_s'] * ms:.1f} ms with the caches",
        f"Peak memory: {result['memory']['after_training_mib']:.0f} MiB "
        f"({result['memory']['measure']})",
        *(
            f"  {name}: measured {_mib(mem[f'{name}_peak_mib'])}, estimated "
            f"{_mib(mem[f'{name}_estimate_mib'])}"
            for name in ("inference", "training")
        ),
        "Targets:",
    ]
    for name, entry in result["targets"].items():
        value = "n/a" if entry["value"] is None else f"{entry['value']:.3f}"
        met = {True: "met", False: "MISSED", None: "not measured"}[entry["met"]]
        extra = f" (estimated {entry['estimated']:.2f})" if "estimated" in entry else ""
        lines.append(f"  {name:<26} {value:>8} {entry['target']:<7} {met}{extra}")
    lines.append(f"Elapsed: {result['elapsed_s']} s")
    return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MiB"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lisa_demo.bench",
        description="Measure LISA's inference and training speed and memory, or estimate the "
        "peak GPU memory of a configuration (--estimate-memory).",
    )
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--model", metavar="DIR", help="full-model folder (a converted LISA)")
    p.add_argument(
        "--random-weights", action="store_true",
        help="the preset's real-size architecture with random weights (llava-1.5-7b, lisa-7b, "
        "lisa-13b), no download",
    )  # fmt: skip
    p.add_argument("--sam", choices=SAM_CHOICES, help="SAM ViT size (llava-1.5-7b presets)")
    p.add_argument("--quantization", choices=QUANTIZATIONS)
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--lora-r", type=int, help="LoRA rank (turns LoRA on)")
    p.add_argument(
        "--lora-targets", nargs="+", metavar="PROJ",
        help="LoRA targets of the training figures (default: the preset's, q_proj v_proj)",
    )  # fmt: skip
    p.add_argument(
        "--lora-dropout", type=float,
        help="LoRA dropout of the training figures (default: the preset's, 0.05)",
    )  # fmt: skip
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction)
    p.add_argument(
        "--lean-token-rows", action=argparse.BooleanOptionalAction,
        help="[SEG] rows without peft's merged lm_head copy (default: the preset's)",
    )  # fmt: skip
    p.add_argument(
        "--vision-quantization", choices=QUANTIZATIONS,
        help="CLIP's frozen tower in 8-bit / 4-bit (default: the preset's)",
    )  # fmt: skip
    p.add_argument(
        "--offload-sam-encoder", action=argparse.BooleanOptionalAction,
        help="training: SAM's image encoder off the GPU once every image is encoded "
        "(default: the preset's)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, help="training batch (bench: 2, estimate: 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--flush-denormal", action="store_true",
        help="CPU: subnormal floats count as zero (the tiny-random SAM computes in subnormals)",
    )  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (medians)")
    p.add_argument("--train-steps", type=int, default=3, help="training steps per timed block")
    p.add_argument(
        "--answer-tokens", type=int, default=KV_TOKENS,
        help=f"length of the long answers: generation, LISA's own way (default {KV_TOKENS})",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--estimate-memory", action="store_true", help="estimate, measure nothing")
    p.add_argument("--seq-len", type=int, help="estimate: tokens per sample (576 image + text)")
    p.add_argument(
        "--optimizer", choices=("adamw", "paged_adamw_8bit"), default="adamw",
        help="estimate: optimizer state size",
    )  # fmt: skip
    return p


def estimate_command(args: argparse.Namespace, cfg: ModelConfig) -> int:
    from lisa_demo.memory import estimate_memory

    estimate = estimate_memory(
        cfg,
        batch_size=args.batch_size or 1,
        seq_len=args.seq_len,
        gradient_checkpointing=args.gradient_checkpointing,
        sam_variant=args.sam,
        optimizer=args.optimizer,
    )
    print(json.dumps(estimate.as_dict(), indent=2) if args.json else estimate.as_table())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if check_cli_paths(("--model", args.model, MODEL)):
        return 2
    from lisa_demo.loading import quiet_library_output

    quiet_library_output()
    notes: list[str] = []
    try:
        cfg = model_config(args, notes)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        if args.estimate_memory:
            return estimate_command(args, cfg)
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.flush_denormal:
            torch.set_flush_denormal(True)
            notes.append("subnormal floats flushed to zero (--flush-denormal)")
        result = run_benchmark(
            cfg, args.device, args.repeats, args.train_steps, args.batch_size or 2, notes,
            args.answer_tokens,
        )  # fmt: skip
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
