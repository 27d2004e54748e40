"""A/B of the two CPU training speed-ups (lisa_demo/cpu_speed.py) in one process.

The same model and batches as the benchmark's training figures; the four combinations of
(torch's dropout | CpuDropout) x (AdamW | fused AdamW) take turns, block after block, so a
machine whose speed drifts affects them alike. Prints milliseconds per step (medians).

    PYTHONPATH=. python scripts/ab_cpu_speed.py         # the bench's LoRA: r 8 on q/v, batch 2
    PYTHONPATH=. python scripts/ab_cpu_speed.py --lora-r 16 --batch-size 8 \
        --lora-targets q_proj k_proj v_proj o_proj gate_proj up_proj down_proj   # the tab's
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lisa_demo.bench import train_step, training_batches
from lisa_demo.config import preset
from lisa_demo.cpu_speed import CpuDropout
from lisa_demo.loading import load_lisa
from lisa_demo.train.data import EmbeddingCache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()

    cfg = preset("tiny").replace(
        use_lora=True,
        lora_r=args.lora_r,
        lora_targets=tuple(args.lora_targets),
        lora_dropout=args.lora_dropout,
    )
    loaded = load_lisa(cfg, device="cpu", for_training=True)
    model = loaded.model
    params = [p for p in model.parameters() if p.requires_grad]
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        batches = training_batches(loaded, Path(tmp), args.batch_size, args.steps)
    caches = (EmbeddingCache("ab/sam"), EmbeddingCache("ab/vision"))
    kwargs = {"lr": 1e-6, "betas": (0.9, 0.95), "weight_decay": 0.0}
    optimizers = {
        False: torch.optim.AdamW(params, **kwargs, fused=False),
        True: torch.optim.AdamW(params, **kwargs, fused=True),
    }
    slots = [
        (layer.lora_dropout, name)
        for layer in model.modules()
        if isinstance(getattr(layer, "lora_dropout", None), torch.nn.ModuleDict)
        for name in layer.lora_dropout
    ]

    def use_dropout(cpu: bool) -> None:
        for holder, name in slots:
            kind = CpuDropout if cpu else torch.nn.Dropout
            holder[name] = kind(args.lora_dropout).train()

    for batch in batches:  # fill the caches, warm up
        train_step(model, optimizers[False], params, batch, caches, device, None)
    times: dict[tuple[bool, bool], list[float]] = {}
    for _ in range(args.rounds):
        for cpu_dropout in (False, True):
            for fused in (False, True):
                use_dropout(cpu_dropout)
                start = time.perf_counter()
                for batch in batches:
                    train_step(model, optimizers[fused], params, batch, caches, device, None)
                seconds = (time.perf_counter() - start) / len(batches)
                times.setdefault((cpu_dropout, fused), []).append(seconds)
    print(
        f"LoRA r {args.lora_r} on {' '.join(args.lora_targets)} ({len(slots)} layers), "
        f"dropout {args.lora_dropout}, batch {args.batch_size}, {len(params)} trainable tensors, "
        f"{args.rounds} rounds of {len(batches)} steps, torch threads {torch.get_num_threads()}"
    )
    base = statistics.median(times[(False, False)])
    for (cpu_dropout, fused), values in times.items():
        median = statistics.median(values)
        print(
            f"dropout {'CpuDropout' if cpu_dropout else 'torch':10}  "
            f"AdamW {'fused' if fused else 'default':7}  {median * 1e3:7.1f} ms/step  "
            f"({base / median:.2f}x)"
        )


if __name__ == "__main__":
    main()
