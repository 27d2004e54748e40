"""Speed and memory of LISA inference and training, measured in one run; the memory estimator.

    python -m lisa_demo.bench                              # the bundled tiny model, this machine
    python -m lisa_demo.bench --preset tiny-random --json --repeats 3
    python -m lisa_demo.bench --flush-denormal       # CPU: subnormal floats count as zero
    python -m lisa_demo.bench --preset llava-1.5-7b --random-weights --sam base --batch-size 1
    python -m lisa_demo.bench --estimate-memory --preset llava-1.5-7b --quantization 4bit

One run measures, after a warm-up and as medians over --repeats:
  - a first query on a new image (per stage) and a second query on the same image (cached);
  - a batch of 4 queries on one image against 4 single queries;
  - 32-token greedy generation with the KV cache against without it (the reference's way);
  - training samples/s with the embedding caches (SAM image embeddings, LLaVA vision features)
    against running both frozen image encoders every step;
  - peak memory (ru_maxrss on a CPU, torch.cuda.max_memory_allocated on a GPU).
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
    tiny-random."""
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
            raise ConfigError("--random-weights is for the llava-1.5-7b presets")
        changes["random_weights"] = True
    if args.sam:
        if cfg.build_tiny or name == "tiny":
            raise ConfigError("--sam picks a full-size SAM: use it with a llava-1.5-7b preset")
        changes["sam"] = f"facebook/sam-vit-{args.sam}"
    for field in ("quantization", "precision", "gradient_checkpointing"):
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


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def scene(seed: int):
    """A synthetic scene (HxWx3 uint8) drawn from a fixed seed."""
    from lisa_demo.data.synthetic import generate_scene

    return generate_scene(random.Random(seed))[0]


class ForcedAnswer:
    """Logits processor for one generate call: writes `token_ids`, then EOS, whatever the
    model prefers. Only the choice of token is forced; every forward pass is the model's own."""

    def __init__(self, token_ids: list[int], eos_id: int) -> None:
        self.script = [*token_ids, eos_id]
        self.start: int | None = None

    def __call__(self, input_ids, scores):
        import torch

        if self.start is None:
            self.start = input_ids.shape[1]
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
    run(pipeline.segment_batch, warm, list(QUESTIONS))  # warm-up: every code path once
    run(pipeline.segment, warm, QUESTIONS[0])
    first, second, batched, singles = [], [], [], []
    for _ in range(repeats):
        pipeline.clear_cache()
        _, cold = run(pipeline.segment, image, QUESTIONS[0])
        _, warm_result = run(pipeline.segment, image, QUESTIONS[1])
        if cold.cache_hit or not warm_result.cache_hit:
            raise RuntimeError("the image cache did not behave: first query hit or second missed")
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

    def generate(use_cache: bool) -> torch.Tensor:
        with torch.inference_mode():
            return llava.generate(
                **inputs,
                do_sample=False,
                use_cache=use_cache,
                min_new_tokens=new_tokens,
                max_new_tokens=new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )

    generate(True)  # warm-up
    generate(False)
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
    losses = [train_step(model, optimizer, params, b, caches, device, autocast) for b in batches]
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
    result = {
        "batch_size": batch_size,
        "steps_per_block": len(batches),
        "seq_len": max(lengths),
        "lora": train_cfg.use_lora,
        "lora_r": train_cfg.lora_r,
        "lora_targets": list(train_cfg.lora_targets),
        "lora_dropout": train_cfg.lora_dropout,
        "gradient_checkpointing": train_cfg.gradient_checkpointing,
        "cached_samples_per_s": median(with_cache),
        "uncached_samples_per_s": median(without_cache),
        "cache_speedup": median(with_cache) / median(without_cache),
        "losses_finite": all(math.isfinite(x) for x in losses),
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
        "feature_cache_hits": feature_cache.hits,
        "feature_cache_misses": feature_cache.misses,
    }
    if device.type == "cuda":
        result["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
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
        estimate = qlora_estimate(training["seq_len"], batch_size).training.allocated
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
) -> dict:
    """Every measurement of the module docstring, in one process; returns the JSON object."""
    import torch

    from lisa_demo.loading import load_lisa, pick_device
    from lisa_demo.train.loop import peak_memory_mb

    if repeats < 1 or train_steps < 1 or batch_size < 1:
        raise ConfigError("--repeats, --train-steps and --batch-size must be at least 1")
    device = pick_device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA GPU is available; use --device cpu")
    started = time.perf_counter()
    info = machine()
    loaded = load_lisa(cfg, device=device)
    reset_peak(device)
    inference = measure_inference(loaded, repeats)
    generation = measure_generation(loaded, repeats)
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
    result = {
        "model": {
            "llava": cfg.llava,
            "sam": cfg.sam,
            "quantization": cfg.quantization,
            "precision": cfg.precision,
            "random_weights": cfg.random_weights,
        },
        "device": str(device),
        "machine": info,
        "repeats": repeats,
        "inference": inference,
        "generation": generation,
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
        f"Training (batch {tr['batch_size']}, LoRA, {tr['steps_per_block']} steps per block): "
        f"{tr['cached_samples_per_s']:.2f} samples/s with the embedding caches, "
        f"{tr['uncached_samples_per_s']:.2f} without ({tr['cache_speedup']:.2f}x)",
        f"Peak memory: {result['memory']['after_training_mib']:.0f} MiB "
        f"({result['memory']['measure']})",
        "Targets:",
    ]
    for name, entry in result["targets"].items():
        value = "n/a" if entry["value"] is None else f"{entry['value']:.3f}"
        met = {True: "met", False: "MISSED", None: "not measured"}[entry["met"]]
        extra = f" (estimated {entry['estimated']:.2f})" if "estimated" in entry else ""
        lines.append(f"  {name:<26} {value:>8} {entry['target']:<7} {met}{extra}")
    lines.append(f"Elapsed: {result['elapsed_s']} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lisa_demo.bench",
        description="Measure LISA's inference and training speed and memory, or estimate the "
        "peak GPU memory of a configuration (--estimate-memory).",
    )
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--model", metavar="DIR", help="full-model folder (a converted LISA)")
    p.add_argument("--random-weights", action="store_true", help="llava-1.5-7b, no download")
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
    p.add_argument("--batch-size", type=int, help="training batch (bench: 2, estimate: 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--flush-denormal", action="store_true",
        help="CPU: subnormal floats count as zero (the tiny-random SAM computes in subnormals)",
    )  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (medians)")
    p.add_argument("--train-steps", type=int, default=3, help="training steps per timed block")
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
            cfg, args.device, args.repeats, args.train_steps, args.batch_size or 2, notes
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
