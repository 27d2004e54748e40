"""Resumable training state without pickle: optimizer tensors in safetensors, the rest in JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer_state.json"
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """AdamW state tensors by '<param index>.<name>'; param groups (hyperparameters) in JSON."""
    state = optimizer.state_dict()
    tensors = {}
    for index, slots in state["state"].items():
        for name, value in _flat(slots):
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            # A copy: bitsandbytes shares one quantization map between parameters, and
            # safetensors refuses tensors that share memory.
            tensors[f"{index}.{name}"] = tensor.detach().to("cpu", copy=True).contiguous()
    save_file(tensors, str(folder / OPTIMIZER_FILE))
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
        for g in state["param_groups"]
    ]
    (folder / "optimizer_groups.json").write_text(json.dumps(groups))


def _flat(slots: dict, prefix: str = ""):
    """(dotted name, value) pairs of a parameter's state; nested dicts (bitsandbytes'
    __bnb_optimizer_quant_state__) become "outer.inner"."""
    for name, value in slots.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    tensors = load_file(str(folder / OPTIMIZER_FILE))
    groups = json.loads((folder / "optimizer_groups.json").read_text())
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    state: dict[int, dict] = {}
    for key, tensor in tensors.items():
        index, *names = key.split(".")
        slot = state.setdefault(int(index), {})
        for name in names[:-1]:  # bitsandbytes nests its 8-bit state one level down
            slot = slot.setdefault(name, {})
        slot[names[-1]] = tensor
    current = optimizer.state_dict()
    if len(groups) != len(current["param_groups"]) or any(
        len(g["params"]) != len(c["params"])
        for g, c in zip(groups, current["param_groups"], strict=True)
    ):
        raise ValueError("the saved optimizer state does not match this model's trainable weights")
    for group, now in zip(groups, current["param_groups"], strict=True):
        # Hyperparameters come from the checkpoint; how the update runs (fused, foreach) is
        # this process's choice, so a run resumes on other hardware and on checkpoints saved
        # with a fused optimizer.
        for key in _IMPLEMENTATION_KEYS:
            group.pop(key, None)
            if key in now:
                group[key] = now[key]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_trainer_state(folder: Path, payload: dict) -> None:
    (folder / TRAINER_FILE).write_text(json.dumps(payload, indent=2))


def load_trainer_state(folder: Path) -> dict:
    path = folder / TRAINER_FILE
    if not path.exists():
        raise ValueError(f"{folder} has no {TRAINER_FILE}: it cannot be resumed")
    return json.loads(path.read_text())
