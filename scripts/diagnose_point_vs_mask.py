"""Does the language model point where the mask lands? (diagnostic, not a test)

For each query of a split scored with `python -m lisa_demo.eval ... --per-sample FILE`, takes
the attention of head 0 of the language model's last layer from the state that predicts
`[SEG]` (what the pointing loss trains) and asks whether its most-attended image patch is
covered at least half by the target; then counts it against whether the mask was right (IoU
above 0.5 in FILE). Misses that also point elsewhere are the language model's choice; misses
that point right are lost between the `[SEG]` state and SAM.

    PYTHONPATH=. python scripts/diagnose_point_vs_mask.py runs/heldout/val \
        runs/heldout-per-sample.json

Model: the bundled one (--preset tiny); PRESET=... picks another preset.
"""

from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from lisa_demo.config import preset
from lisa_demo.data.reasonseg import ReasonSegDataset
from lisa_demo.loading import load_lisa
from lisa_demo.train.data import SampleBatcher, training_targets


def main() -> None:
    split, per_sample = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(2)
    loaded = load_lisa(preset(os.environ.get("PRESET", "tiny")), device="cpu")
    model = loaded.model.eval()
    llava = model.base_llava
    scored = {row["image"]: row for row in json.loads(per_sample.read_text())["per_sample"]}
    data = ReasonSegDataset(split, queries="first", seed=0)
    batcher = SampleBatcher(loaded.processor, loaded.sam_processor, seed=0)
    samples = [data[i] for i in range(len(data))]
    counts: collections.Counter = collections.Counter()
    by_family = collections.defaultdict(list)
    with torch.no_grad():
        for start in range(0, len(samples), 16):
            chunk = samples[start : start + 16]
            batch = batcher(chunk, training=False)
            features = model.encode_image_features(batch["pixel_values"])
            captured: dict = {}
            hook = model._capture_last_attention_inputs(captured)
            image = BaseModelOutputWithPooling(pooler_output=list(features.unbind(0)))
            llava(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                mm_encoder_outputs={"image": image}, return_dict=True, logits_to_keep=1,
            )  # fmt: skip
            hook.remove()
            log_image, cover = model.pointing_attention(
                captured, batch["input_ids"], batch["attention_mask"],
                training_targets(batch["masks"]),
            )  # fmt: skip
            points = cover.gather(1, log_image.argmax(1, keepdim=True))[:, 0] >= 0.5
            for sample, point in zip(chunk, points.tolist(), strict=True):
                row = scored[sample.record.json_path.stem]
                mask = row["iou"] > 0.5
                counts[(point, mask)] += 1
                by_family[row["family"]].append((point, mask))
    n = sum(counts.values())
    print(f"{n} queries: pointing at the target {counts[True, True] + counts[True, False]}, "
          f"right masks {counts[True, True] + counts[False, True]}")  # fmt: skip
    print(f"  right mask, pointing right {counts[True, True]}; right mask, pointing elsewhere "
          f"{counts[False, True]}")  # fmt: skip
    print(f"  miss, pointing right {counts[True, False]}; miss, pointing elsewhere "
          f"{counts[False, False]}")  # fmt: skip
    for family, rows in sorted(by_family.items()):
        point = sum(p for p, _ in rows) / len(rows)
        mask = sum(m for _, m in rows) / len(rows)
        print(f"  {family}: pointing {point:.3f}, right masks {mask:.3f} (n {len(rows)})")


if __name__ == "__main__":
    main()
