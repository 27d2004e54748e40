"""Segmentation metrics as LISA reports them: per-mask IoU, gIoU and cIoU.

gIoU is the mean of the per-mask IoUs; cIoU is the total intersection over the total union of a
split. Neither is detection's bounding-box "Generalised IoU": both lie in [0, 1]. Ignore pixels
(255 in the target) are removed from prediction and target before counting. Inputs may be numpy
arrays or torch tensors; they are never modified, and results are plain Python numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = 255


def _to_numpy(array: Any) -> np.ndarray:
    """A numpy view or copy of a numpy array, torch tensor (any device/dtype) or nested list."""
    if hasattr(array, "detach"):
        tensor = array.detach().cpu()
        # numpy has no bfloat16; other float types convert as they are.
        return (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    return np.asarray(array)


def _foreground_masks(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    """Boolean prediction and target foregrounds with ignore pixels removed from both.

    Args:
        pred: [H, W] bool or numeric; non-zero is foreground.
        target: [H, W] uint8; 0 background, 1 (any non-zero but 255) target, 255 ignore.
    """
    pred, target = _to_numpy(pred), _to_numpy(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    valid = target != IGNORE_INDEX
    return (pred != 0) & valid, (target != 0) & valid


def intersection_union(pred: Any, target: Any) -> tuple[int, int]:
    """Foreground intersection and union pixel counts, ignore pixels excluded."""
    pred_fg, target_fg = _foreground_masks(pred, target)
    return int(np.count_nonzero(pred_fg & target_fg)), int(np.count_nonzero(pred_fg | target_fg))


def mask_iou(pred: Any, target: Any) -> float:
    """I / U of one mask; 1.0 when the union is empty (empty prediction, empty target)."""
    intersection, union = intersection_union(pred, target)
    return intersection / union if union else 1.0


def mask_dice(pred: Any, target: Any) -> float:
    """2 I / (|P| + |T|) of one mask, ignore pixels excluded; 1.0 when both are empty."""
    pred_fg, target_fg = _foreground_masks(pred, target)
    total = int(np.count_nonzero(pred_fg)) + int(np.count_nonzero(target_fg))
    return 2 * int(np.count_nonzero(pred_fg & target_fg)) / total if total else 1.0


@dataclass
class IoUAccumulator:
    """Running sums for gIoU and cIoU over a split; sum across processes via as_tensor()."""

    intersection: float = 0.0  # total intersection pixels
    union: float = 0.0  # total union pixels
    iou_sum: float = 0.0  # sum of per-mask IoUs
    count: int = 0  # masks added

    def add(self, pred: Any, target: Any) -> float:
        """Add one mask ([H, W] prediction, [H, W] uint8 0/1/255 target); return its IoU."""
        return self.add_counts(*intersection_union(pred, target))

    def add_counts(self, intersection: float, union: float) -> float:
        """Add one mask from its intersection and union counts; return its IoU."""
        if not 0 <= intersection <= union:
            raise ValueError(f"need 0 <= intersection <= union, got {intersection}, {union}")
        iou = intersection / union if union else 1.0
        self.intersection += intersection
        self.union += union
        self.iou_sum += iou
        self.count += 1
        return iou

    def merge(self, other: IoUAccumulator) -> IoUAccumulator:
        """A new accumulator holding both sets of sums (neither input changes)."""
        return IoUAccumulator(
            intersection=self.intersection + other.intersection,
            union=self.union + other.union,
            iou_sum=self.iou_sum + other.iou_sum,
            count=self.count + other.count,
        )

    def as_tensor(self) -> torch.Tensor:
        """float64 [4]: intersection, union, iou_sum, count, for a sum all-reduce."""
        import torch  # lazily: scoring prediction files needs no torch

        values = [self.intersection, self.union, self.iou_sum, self.count]
        return torch.tensor(values, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: Any) -> IoUAccumulator:
        """Inverse of as_tensor (accepts any 4-element tensor, array or list)."""
        intersection, union, iou_sum, count = _to_numpy(values).astype(np.float64).tolist()
        return cls(intersection=intersection, union=union, iou_sum=iou_sum, count=round(count))

    @property
    def giou(self) -> float:
        """Mean per-mask IoU; 0.0 before any mask is added."""
        return self.iou_sum / self.count if self.count else 0.0

    @property
    def ciou(self) -> float:
        """Total intersection / total union; 1.0 when every union was empty, 0.0 if no mask."""
        if not self.count:
            return 0.0
        return self.intersection / self.union if self.union else 1.0

    def as_dict(self) -> dict[str, float | int]:
        """{"giou": float, "ciou": float, "n": int}."""
        return {"giou": self.giou, "ciou": self.ciou, "n": self.count}
