"""Linear probes on CLIP patch states, pooled per object (diagnostic, not a test).

Which of an object's kind, colour, size and column / row (thirds of the image) can a linear
classifier read from the states LLaVA takes (layer -2, raw and after the projector)? Each
object's state is the mean of its patches weighted by how much of each it covers; the first
600 training scenes, objects split 70/30, standardised features, L2-regularised softmax.

    PYTHONPATH=. python scripts/diagnose_patch_probe.py CHECKPOINT DATA
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from lisa_demo.checkpoint import load_trainable_state
from lisa_demo.config import preset
from lisa_demo.data.reasonseg import ReasonSegDataset
from lisa_demo.data.synthetic import COLOURS, SHAPE_KINDS, SIZES
from lisa_demo.loading import load_lisa
from lisa_demo.train.data import SampleBatcher
from lisa_demo.train.warmup import outline_mask, scene_objects

LABELS = ("kind", "colour", "size", "column", "row")


def pooled_states(checkpoint: Path, data: Path, scenes: int = 600):
    loaded = load_lisa(preset("tiny-random").replace(train_all=True), device="cpu")
    load_trainable_state(checkpoint, loaded.model)
    llava = loaded.model.base_llava
    dataset = ReasonSegDataset(data / "train", queries="first", seed=0)
    batcher = SampleBatcher(loaded.processor, loaded.sam_processor)
    states: dict[str, list[torch.Tensor]] = {"raw": [], "projected": []}
    labels = []
    with torch.no_grad():
        for i in range(min(scenes, len(dataset))):
            sample = dataset[i]
            pixels = batcher([sample], training=False)["pixel_values"]
            tower = llava.model.vision_tower(pixels, output_hidden_states=True)
            raw = tower.hidden_states[llava.config.vision_feature_layer][0, 1:]
            projected = llava.model.multi_modal_projector(raw)
            grid = int(round(raw.shape[0] ** 0.5))
            record = sample.record
            for obj in scene_objects(sample):
                mask = outline_mask(obj, record.height, record.width).astype(np.float32)
                cover = cv2.resize(mask, (grid, grid), interpolation=cv2.INTER_AREA).reshape(-1)
                if cover.sum() < 0.3:
                    continue
                weights = torch.tensor(cover / cover.sum(), dtype=torch.float32)[:, None]
                states["raw"].append((weights * raw).sum(0))
                states["projected"].append((weights * projected).sum(0))
                x, y = obj["centre"]
                labels.append((SHAPE_KINDS.index(obj["kind"]), list(COLOURS).index(obj["colour"]),
                               list(SIZES).index(obj["size"]), int(3 * x / record.width),
                               int(3 * y / record.height)))  # fmt: skip
    return {k: torch.stack(v) for k, v in states.items()}, torch.tensor(labels)


def probe(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> tuple[float, float]:
    """Held-out accuracy of a linear classifier, and the majority class's share there."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    split = int(0.7 * len(x))
    weight = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    bias = torch.zeros(int(y.max()) + 1, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        logits = x[:split] @ weight + bias
        loss = F.cross_entropy(logits, y[:split]) + 1e-3 * (weight**2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out = y[split:]
    accuracy = ((x[split:] @ weight + bias).argmax(1) == held_out).float().mean()
    majority = (held_out == held_out.mode().values).float().mean()
    return float(accuracy), float(majority)


def main() -> None:
    torch.set_num_threads(2)
    states, labels = pooled_states(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"{len(labels)} objects")
    for name, x in states.items():
        for column, label in enumerate(LABELS):
            accuracy, majority = probe(x, labels[:, column])
            print(f"{name:9s} {label:6s} {accuracy:.3f} (majority class {majority:.3f})")


if __name__ == "__main__":
    main()
