"""The real-size path measured in one prepared run: what `bash scripts/gpu_check.sh` executes.

    python -m lisa_demo.gpu_check --out gpu_check        # a GPU if there is one, else --cpu
    python -m lisa_demo.gpu_check --cpu --out gpu_check  # the tiny presets on this CPU

On a GPU, two configurations at real size with random weights (no download), each in its own
`python -m lisa_demo.bench ... --json` process (a fresh CUDA context, a time limit, and a
failure that does not stop the other):

- llava-1.5-7b in 4-bit with SAM ViT-B, and the LISA-7B architecture (CLIP-224, SAM ViT-H) in
  4-bit; both with the presets' memory savings, LoRA, gradient checkpointing, training batch 1;
- per run: the first question's latency per stage, a second question on the same image, a
  32-token answer with and without the KV cache and LISA's own way, the peak memory of
  inference and of a QLoRA step (with the step time), the estimator's figure beside each
  peak, and the parity of the cached and uncached paths (bf16 logits and masks).

Without CUDA (or with --cpu) the same runs use the tiny model with the same options, so the
whole path is known to work before a GPU is lent. The result is one JSON file
(`gpu_check.json`: every run's bench JSON, the fields it lacks, the commit) and a short text
summary (`gpu_check.txt`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lisa_demo.config import PROJECT_ROOT

# Memory savings, LoRA, checkpointing and batch 1: the QLoRA target's setting.
QLORA = ["--batch-size", "1", "--gradient-checkpointing", "--lean-token-rows",
         "--vision-quantization", "8bit", "--offload-sam-encoder"]  # fmt: skip
GPU_RUNS: dict[str, list[str]] = {
    "llava-1.5-7b-4bit-sam-base": ["--preset", "llava-1.5-7b", "--random-weights", "--sam",
                                   "base", "--quantization", "4bit", *QLORA],
    "lisa-7b-4bit-sam-huge": ["--preset", "lisa-7b-v1", "--random-weights", "--quantization",
                              "4bit", *QLORA],
}  # fmt: skip
# The same code paths on the tiny model (bitsandbytes' CPU kernels): a rehearsal. One thread:
# on a shared CPU, more threads than free cores make a tiny model tens of times slower.
CPU_RUNS: dict[str, list[str]] = {
    "tiny-random-4bit": ["--preset", "tiny-random", "--quantization", "4bit", "--lora-r", "8",
                         "--flush-denormal", "--threads", "1", *QLORA],
    "tiny-4bit": ["--preset", "tiny", "--quantization", "4bit", "--lora-r", "8", "--threads",
                  "1", *QLORA],
}  # fmt: skip

# Dotted paths every run's JSON must hold (values may be null where only a GPU measures).
REQUIRED_FIELDS = (
    "model.architecture", "model.quantization", "device", "elapsed_s",
    *(f"inference.first_query_s.{k}"
      for k in ("image_encoding", "generation", "mask_decoding", "total")),
    "inference.second_query_s.total", "inference.second_over_first",
    "generation.kv_cache_s", "generation.no_cache_s", "generation.kv_cache_speedup",
    "generation.same_tokens",
    "lisa_way.new_tokens", "lisa_way.first_question_s", "lisa_way.second_question_s",
    "lisa_way.lisa_way_s", "lisa_way.second_over_first", "lisa_way.lisa_way_over_ours",
    "lisa_way.lisa_way_over_ours_same_image",
    "lisa_way.parity.dtype", "lisa_way.parity.max_abs_logit_diff",
    "lisa_way.parity.max_rel_logit_diff", "lisa_way.parity.greedy_agreement",
    "lisa_way.parity.mask_iou",
    "training.batch_size", "training.gradient_checkpointing", "training.step_s",
    "training.lean_token_rows", "training.vision_quantization", "training.offload_sam_encoder",
    "memory.inference_peak_mib", "memory.inference_estimate_mib",
    "memory.inference_estimate_error", "memory.training_peak_mib",
    "memory.training_estimate_mib", "memory.training_estimate_error",
    "targets.qlora_training_peak_gib", "targets.estimator_error",
)  # fmt: skip


def missing_fields(run: dict) -> list[str]:
    """The REQUIRED_FIELDS absent from one run's bench JSON."""
    missing = []
    for path in REQUIRED_FIELDS:
        node: object = run
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                missing.append(path)
                break
            node = node[key]
    return missing


def bench_command(args: list[str], device: str, repeats: int, train_steps: int) -> list[str]:
    return [sys.executable, "-m", "lisa_demo.bench", *args, "--device", device, "--json",
            "--repeats", str(repeats), "--train-steps", str(train_steps)]  # fmt: skip


def run_bench(command: list[str], timeout: float) -> dict:
    """One bench process: its JSON, or {"error": ...} with the end of its output."""
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        )  # fmt: skip
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"error": f"timed out after {timeout:.0f} s", "stderr_tail": tail}
    seconds = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        return {"error": f"exit status {done.returncode} after {seconds} s",
                "stderr_tail": done.stderr[-4000:]}  # fmt: skip
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"error": "the bench printed no JSON", "stdout_tail": done.stdout[-2000:]}
    result["wall_s"] = seconds
    return result


def commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def check(
    runs: dict[str, list[str]], device: str, repeats: int, train_steps: int, timeout: float
) -> dict:
    """Every run, one after the other; the report gpu_check.json holds."""
    started = time.perf_counter()
    report: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "device": device,
        "repeats": repeats,
        "train_steps": train_steps,
        "runs": {},
        "commands": {},
        "missing_fields": {},
    }
    for name, args in runs.items():
        command = bench_command(args, device, repeats, train_steps)
        report["commands"][name] = " ".join(command[1:])
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        result = run_bench(command, timeout)
        report["runs"][name] = result
        report["missing_fields"][name] = [] if "error" in result else missing_fields(result)
    report["ok"] = all(
        "error" not in r and not report["missing_fields"][n] for n, r in report["runs"].items()
    )
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    return report


def summary(report: dict) -> str:
    """A few lines per run: latencies, ratios, peaks against estimates, parity."""
    lines = [f"LISA Studio GPU check, {report['date']}, commit {report['commit']}, "
             f"device {report['device']}, {report['elapsed_s']} s: "
             f"{'complete' if report['ok'] else 'INCOMPLETE'}"]  # fmt: skip
    for name, run in report["runs"].items():
        if "error" in run:
            lines.append(f"{name}: FAILED, {run['error']}")
            continue
        inf, way, gen, mem = run["inference"], run["lisa_way"], run["generation"], run["memory"]
        first = {k: round(v * 1000) for k, v in inf["first_query_s"].items()}
        second = round(inf["second_query_s"]["total"] * 1000)
        answer = {k: round(way[k] * 1000)
                  for k in ("first_question_s", "second_question_s", "lisa_way_s")}  # fmt: skip
        parity = way["parity"]
        gpu = run["machine"].get("gpu", "no GPU")
        lines += [
            f"{name} ({run['device']}, {gpu}, {run['wall_s']} s):",
            f"  first question {first['total']} ms (image {first['image_encoding']} / "
            f"generation {first['generation']} / masks {first['mask_decoding']}); second "
            f"{second} ms ({inf['second_over_first']:.2f}x)",
            f"  {way['new_tokens']}-token answer: generate with KV cache "
            f"{gen['kv_cache_s'] * 1000:.0f} ms, without {gen['no_cache_s'] * 1000:.0f} ms; "
            f"pipeline new image {answer['first_question_s']} ms, same image "
            f"{answer['second_question_s']} ms; LISA's way {answer['lisa_way_s']} ms "
            f"({way['lisa_way_over_ours']:.1f}x)",
            f"  peak inference {_mib(mem['inference_peak_mib'])} (estimate "
            f"{_mib(mem['inference_estimate_mib'])}{_error(mem['inference_estimate_error'])}); "
            f"QLoRA step {_mib(mem['training_peak_mib'])} (estimate "
            f"{_mib(mem['training_estimate_mib'])}{_error(mem['training_estimate_error'])}), "
            f"{run['training']['step_s']:.2f} s/step",
            f"  parity ({parity['dtype']}): max |logit diff| {parity['max_abs_logit_diff']:.3g} "
            f"(relative {parity['max_rel_logit_diff']:.3g}), greedy agreement "
            f"{parity['greedy_agreement']:.3f}, mask IoU {parity['mask_iou']}",
        ]
        if report["missing_fields"].get(name):
            lines.append(f"  missing fields: {', '.join(report['missing_fields'][name])}")
    return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MiB"


def _error(value: float | None) -> str:
    return "" if value is None else f", off by {value:.1%}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lisa_demo.gpu_check", description=__doc__.split(
        "\n")[0])  # fmt: skip
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "gpu_check", help="output folder")
    p.add_argument("--cpu", action="store_true", help="the tiny presets on the CPU")
    p.add_argument("--repeats", type=int, help="bench repeats (GPU 2, CPU 1)")
    p.add_argument("--train-steps", type=int, help="training steps per block (GPU 2, CPU 1)")
    p.add_argument("--timeout", type=float, default=360.0, help="seconds per run")
    args = p.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    if not gpu and not args.cpu:
        print("gpu_check: no CUDA device, so the tiny presets on the CPU", file=sys.stderr)
    runs, device = (GPU_RUNS, "cuda") if gpu else (CPU_RUNS, "cpu")
    default = 2 if gpu else 1
    report = check(runs, device, args.repeats or default, args.train_steps or default,
                   args.timeout)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    text = summary(report)
    (args.out / "gpu_check.txt").write_text(text + "\n")
    print(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
