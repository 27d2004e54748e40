"""Two CPU training costs that do not need to be paid: the dropout mask and AdamW's update.

Both were found by profiling the Training tab's default run on a 2-core CPU (2026-12-02,
commit 5a31094, docs/BENCHMARKS.md):

- torch's dropout draws one random number per element on a CPU, so peft's dropout on the input
  of every LoRA layer cost about a sixth of a step. :class:`CpuDropout` draws 64-bit words and
  uses each 16-bit slice as one element's draw: four elements per draw, the same Bernoulli mask
  (the drop probability rounded to a multiple of 1/65536) and the same scaling.
- ``torch.optim.AdamW`` defaults to one small kernel per tensor on a CPU; ``fused=True`` does the
  same arithmetic in one pass over all of them.

On a GPU neither applies: :class:`CpuDropout` defers to ``nn.Dropout`` and the optimizer keeps
torch's default there. ``LISA_CPU_SPEEDUPS=0`` in the environment turns both off (torch's own
dropout and AdamW), which is how the benchmark measures what they save.
"""

from __future__ import annotations

import os

import torch


def enabled() -> bool:
    """False when LISA_CPU_SPEEDUPS=0 (or false / no / off) is set."""
    return os.environ.get("LISA_CPU_SPEEDUPS", "1").strip().lower() not in {
        "0",
        "false",
        "no",
        "off",
    }


_LEVELS = 1 << 16  # 16-bit draws


class _MaskedScale(torch.autograd.Function):
    """x * keep * scale, keeping only the boolean mask for the backward pass (as dropout does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return (x * keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None, None


def bernoulli_keep(shape: torch.Size, drop_levels: int) -> torch.Tensor:
    """Boolean mask, each element False with probability drop_levels / 65536, independently."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64)
    # The whole int64 range: every bit of the word is random (random_() alone leaves the sign
    # bit at 0).
    words.random_(-(1 << 63), (1 << 63) - 1)
    draws = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    return draws >= drop_levels - (_LEVELS // 2)


class CpuDropout(torch.nn.Dropout):
    """``nn.Dropout`` with a cheaper random mask for tensors on a CPU (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drop_levels = round(self.p * _LEVELS)
        if (
            not self.training
            or self.inplace
            or x.device.type != "cpu"
            or not x.is_floating_point()
            or not 0 < drop_levels < _LEVELS
        ):
            return super().forward(x)
        keep = bernoulli_keep(x.shape, drop_levels)
        return _MaskedScale.apply(x, keep, _LEVELS / (_LEVELS - drop_levels))


def use_cpu_dropout(model: torch.nn.Module) -> int:
    """Swap the plain ``nn.Dropout`` of peft's LoRA layers for :class:`CpuDropout`; returns how
    many were swapped. The modules hold no weights, so saved adapters are unchanged."""
    swapped = 0
    if not enabled():
        return swapped
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if type(dropout) is torch.nn.Dropout:
                dropouts[name] = CpuDropout(dropout.p, dropout.inplace).train(dropout.training)
                swapped += 1
    return swapped


def adamw_options(params: list[torch.nn.Parameter]) -> dict:
    """Extra ``torch.optim.AdamW`` arguments: the fused kernel when every weight is on a CPU."""
    if not enabled():
        return {}
    if params and all(p.device.type == "cpu" and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}
