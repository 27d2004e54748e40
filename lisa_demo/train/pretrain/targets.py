"""Per-batch inputs of the recipe's terms: a click inside each target, each target's classes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch

from lisa_demo.data.reasonseg import Sample
from lisa_demo.data.synthetic import target_classes


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the target pixel farthest from the target's outline (the centre of an empty
    mask). mask: HxW, 1 = target."""
    target = np.pad((mask == 1).astype(np.uint8), 1)
    if not target.any():
        return (mask.shape[1] - 1) / 2, (mask.shape[0] - 1) / 2
    depth = cv2.distanceTransform(target, cv2.DIST_L2, 3)
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return float(x - 1), float(y - 1)


def click_points(batch: dict) -> list[torch.Tensor]:
    """Per sample [1, 2]: a click inside the target, in SAM's input frame (resized image)."""
    clicks = []
    for mask, (h, w), (height, width) in zip(
        batch["masks"], batch["input_sizes"], batch["original_sizes"], strict=True
    ):
        x, y = interior_point(mask)
        clicks.append(torch.tensor([[x * w / width, y * h / height]], dtype=torch.float32))
    return clicks


class TargetClasses:
    """Each sample's target (kind, colour, size, region) indices from its synthetic
    annotation, read once per annotation file; [-1] * 4 for other data."""

    def __init__(self) -> None:
        self._known: dict[Path, tuple[int, int, int, int] | None] = {}

    def of(self, sample: Sample) -> tuple[int, int, int, int] | None:
        path = Path(sample.record.json_path)
        if path not in self._known:
            try:
                annotation = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                annotation = None
            found = target_classes(annotation) if isinstance(annotation, dict) else None
            self._known[path] = found
        return self._known[path]

    def batch(self, samples: list[Sample]) -> list[torch.Tensor]:
        """Per sample [1, 4] long."""
        rows = [self.of(s) for s in samples]
        return [torch.tensor([list(c) if c else [-1] * 4], dtype=torch.long) for c in rows]
