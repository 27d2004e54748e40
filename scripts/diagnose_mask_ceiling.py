"""Diagnostic: the best mask IoU SAM's low-resolution logits could give on a split.

SAM's mask decoder predicts logits on a grid of a quarter of its padded input side (64 x 64 at
256 px); the pipeline upsamples them to the padded input, crops the padding and upsamples to
the image (LISA's post-processing). Here each ground-truth mask is resized into SAM's frame,
area-averaged onto that grid (the ideal soft mask), put through the same upsampling and
thresholded at 0.5: the mean IoU is what a perfect decoder at that resolution would score.

    PYTHONPATH=. python scripts/diagnose_mask_ceiling.py runs/heldout/val [256 320 ...]
"""

from __future__ import annotations

import sys

import cv2
import numpy as np
import torch

from lisa_demo.data.reasonseg import ReasonSegDataset
from lisa_demo.metrics import mask_iou
from lisa_demo.model import upsample_mask_logits


def ceiling_iou(mask: np.ndarray, pad: int) -> float:
    height, width = mask.shape
    scale = pad / max(height, width)
    h, w = int(height * scale + 0.5), int(width * scale + 0.5)
    target = (mask == 1).astype(np.float32)
    framed = np.zeros((pad, pad), np.float32)
    framed[:h, :w] = cv2.resize(target, (w, h), interpolation=cv2.INTER_AREA)
    grid = pad // 4
    soft = cv2.resize(framed, (grid, grid), interpolation=cv2.INTER_AREA)
    logits = upsample_mask_logits(torch.from_numpy(soft - 0.5)[None], pad, (h, w), (height, width))
    return mask_iou(logits[0].numpy() > 0, mask)


def main() -> None:
    data = ReasonSegDataset(sys.argv[1], queries="first")
    for pad in [int(a) for a in sys.argv[2:]] or [256]:
        ious = [ceiling_iou(data[i].record.load_mask(), pad) for i in range(len(data))]
        print(
            f"SAM input {pad} px: ceiling IoU mean {np.mean(ious):.3f}, "
            f"min {np.min(ious):.3f} ({len(ious)} masks)"
        )


if __name__ == "__main__":
    main()
