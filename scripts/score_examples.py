"""IoU of each bundled example (assets/examples) through the inference pipeline the app uses.

    PYTHONPATH=. python scripts/score_examples.py                     # the bundled model
    PYTHONPATH=. python scripts/score_examples.py --checkpoint runs/heart-finetune/checkpoints/best

One line per example (its IoU with the ground truth at the default threshold, probability
0.5, and the answer), then whether every example passed (IoU > 0.7).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from lisa_demo.config import EXAMPLES_DIR, preset
from lisa_demo.infer.pipeline import LisaPipeline, load_image
from lisa_demo.metrics import mask_iou

PASS_IOU = 0.7


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--examples", type=Path, default=EXAMPLES_DIR)
    args = parser.parse_args()
    pipeline = LisaPipeline.from_config(preset("tiny"), checkpoint=args.checkpoint, device="cpu")
    passed = True
    for spec_path in sorted(args.examples.glob("example_*.json")):
        spec = json.loads(spec_path.read_text())
        image = load_image(spec_path.with_suffix(".jpg"))
        truth = np.asarray(Image.open(spec_path.parent / spec["mask"]).convert("L")) > 0
        result = pipeline.segment(image, spec["query"])
        iou = mask_iou(result.masks[0].mask, truth) if result.masks else 0.0
        passed &= iou > PASS_IOU
        held = f" (held-out {spec['held_out']})" if spec.get("held_out") else ""
        print(f"{spec_path.stem}{held}: IoU {iou:.3f}  answer: {result.answer!r}")
    print(f"every example above IoU {PASS_IOU}: {'yes' if passed else 'no'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
