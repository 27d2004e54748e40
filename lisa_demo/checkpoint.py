"""Fine-tuned state on disk: safetensors weights plus a JSON manifest, written atomically
(lisa_demo.atomic: a kill at any moment leaves a complete folder that readers find).

A checkpoint folder holds:
    trainable.safetensors   every trainable tensor of the LisaModel, by parameter name
                            (LoRA weights, the [SEG] rows, projection, SAM mask decoder)
    manifest.json           base models, their revisions/fingerprints, [SEG] id, LoRA settings
    extra files             whatever the caller adds (optimizer state, training state)
Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lisa_demo.atomic import complete_folder, write_atomically

MANIFEST = "manifest.json"
WEIGHTS = "trainable.safetensors"
# Training-only modules the pretraining recipe attaches to a LisaModel
# (lisa_demo.train.pretrain): saved for resuming, skipped by a model built without them.
TRAINING_ONLY_PREFIX = ("seg_word_head.", "target_head.", "description_prompts.")
FORMAT = "lisa-studio-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed or made for other base models."""


def folder_fingerprint(folder: Path) -> str:
    """Cheap identity of a local model folder: its config, and for each weight file the size
    plus 64 KiB read at 16 places spread through the file (header included)."""
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.exists():
        digest.update(config.read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            for i in range(16):
                handle.seek(size * i // 16)
                digest.update(handle.read(1 << 16))
    return digest.hexdigest()[:16]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that requires grad, detached, contiguous, on the CPU."""
    return {
        name: param.detach().to("cpu").contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def resolve_checkpoint(folder: Path | str) -> Path:
    """complete_folder(folder), or `folder` itself when there is none (for the error message)."""
    return complete_folder(folder) or Path(folder)


def save_checkpoint(
    folder: Path | str,
    model: torch.nn.Module,
    manifest: dict,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write the model's trainable tensors and the manifest (plus `extra(tmp)`) atomically."""
    state = trainable_state(model)

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        body = {"format": FORMAT, "version": 1, **manifest, "tensors": len(state)}
        (tmp / MANIFEST).write_text(json.dumps(body, indent=2))
        if extra is not None:
            extra(tmp)

    return write_atomically(Path(folder), write)


def read_manifest(folder: Path | str) -> dict:
    folder = resolve_checkpoint(folder)
    path = folder / MANIFEST
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} is a file; pass its folder")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not path.exists() or not (folder / WEIGHTS).exists():
        raise CheckpointError(
            f"{folder} is not a LISA Studio checkpoint (expected {MANIFEST} and {WEIGHTS}; "
            "use a checkpoints/best or checkpoints/last folder written by training)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} manifest")
    return manifest


def check_same_base(saved: dict, current: dict) -> list[str]:
    """Raise CheckpointError when `saved` was made for other base models; return warnings."""
    warnings = []
    for part in ("llava", "sam"):
        was, now = saved.get(part, {}), current.get(part, {})
        if was.get("architecture") != now.get("architecture"):
            raise CheckpointError(
                f"this checkpoint was made for {part} base {was.get('source')!r} "
                f"(architecture {was.get('architecture')}), but the loaded {part} is "
                f"{now.get('source')!r} (architecture {now.get('architecture')}); load it "
                f"with --llava/--sam set to the base it was trained on"
            )
        was_fp, now_fp = was.get("fingerprint"), now.get("fingerprint")
        if was_fp and now_fp and was_fp != now_fp:
            raise CheckpointError(
                f"this checkpoint was made for {part} base {was.get('source')!r} "
                f"(weights {was_fp}), but the loaded {part} {now.get('source')!r} has other "
                f"weights ({now_fp}); load it on the base it was trained on"
            )
        if was.get("source") != now.get("source"):
            warnings.append(
                f"{part}: checkpoint base {was.get('source')!r}, loading on {now.get('source')!r}"
            )
    return warnings


def load_trainable_state(folder: Path | str, model: torch.nn.Module) -> None:
    """Copy saved tensors into the model's trainable parameters; names and shapes must match."""
    folder = resolve_checkpoint(folder)
    state = load_file(str(folder / WEIGHTS))
    params = dict(model.named_parameters())
    # Training-only heads: kept for resuming, ignored by a model built without them.
    state = {
        name: tensor
        for name, tensor in state.items()
        if name in params or not name.startswith(TRAINING_ONLY_PREFIX)
    }
    expected = {name for name, p in params.items() if p.requires_grad}
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {folder} does not fit this model: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
            f"{'...' if len(unexpected) > 3 else ''}"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            param = params[name]
            if param.shape != tensor.shape:
                raise CheckpointError(
                    f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                    f"model expects {tuple(param.shape)}"
                )
            param.copy_(tensor.to(param.dtype))
