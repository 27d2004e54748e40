"""LISA's mask losses as pure functions (inputs are never modified).

The text cross-entropy comes from the language model itself (labels of -100 outside the answer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_bce_per_mask(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-pixel sigmoid BCE averaged over the pixels of each mask.

    logits, targets: [n, H, W]; targets in {0, 1} (float). Returns [n].
    """
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return loss.flatten(1).mean(dim=1)


def dice_per_mask(
    logits: torch.Tensor,
    targets: torch.Tensor,
    scale: float = 1000.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Soft Dice loss per mask, as the LISA reference computes it.

    Probabilities and targets are divided by `scale` inside the sums (the reference's 1000),
    which makes `eps` relatively larger. logits, targets: [n, H, W]. Returns [n].
    """
    probs = logits.float().sigmoid().flatten(1)
    targets = targets.float().flatten(1)
    numerator = 2 * (probs / scale * targets).sum(dim=1)
    denominator = (probs / scale).sum(dim=1) + (targets / scale).sum(dim=1)
    return 1 - (numerator + eps) / (denominator + eps)
