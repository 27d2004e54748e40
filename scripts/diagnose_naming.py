"""Diagnostic: where a trained tiny LISA loses the target (language side or mask side).

    PYTHONPATH=. python scripts/diagnose_naming.py bundled              # assets/tiny-lisa
    PYTHONPATH=. python scripts/diagnose_naming.py runs/pretrain/model  # an --export-model folder

1. Naming: on the first N held-out scenes (runs/heldout/val, see scripts/tiny_model.sh), the
   generated explanation after [SEG] is compared with the scene's target (size, colour, kind),
   per query family, and the mask IoU is split by whether the explanation named the target.
2. Probe: on attribute queries of runs/pretrain/data/val, a linear classifier is fitted on 70%
   of the mask query states (and of the projected prompts) and scored on the rest: does the
   state the mask decoder receives encode the target's colour and kind?
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from lisa_demo.config import preset
from lisa_demo.data.reasonseg import ReasonSegDataset
from lisa_demo.infer.pipeline import LisaPipeline
from lisa_demo.train.data import SampleBatcher

SIZE_WORDS = {"small": "small", "medium": "medium", "large": "large"}


def target_of(record) -> dict:
    return next(o for o in json.loads(record.json_path.read_text())["objects"] if o["target"])


def naming(pipeline: LisaPipeline, n: int) -> None:
    data = ReasonSegDataset("runs/heldout/val", queries="first")
    named: dict[str, list[int]] = {}
    ious: dict[bool, list[float]] = {True: [], False: []}
    for i in range(min(n, len(data))):
        sample = data[i]
        target = target_of(sample.record)
        result = pipeline.segment(sample.record.image_path, sample.query)
        tail = result.answer.lower().split("[seg]")[-1]
        right = all(
            word in tail for word in (target["colour"], target["kind"], SIZE_WORDS[target["size"]])
        )
        truth = sample.record.load_mask() == 1
        pred = result.masks[0].mask if result.masks else np.zeros_like(truth)
        union = (pred | truth).sum()
        ious[right].append(float((pred & truth).sum() / union) if union else 1.0)
        named.setdefault(sample.record.family or "?", []).append(int(right))
    print("explanation names the target (size, colour and kind), per family:")
    for family, hits in sorted(named.items()):
        print(f"  {family:12s} {sum(hits)}/{len(hits)}")
    for right in (True, False):
        values = ious[right]
        mean = f"{np.mean(values):.3f}" if values else "-"
        print(f"mask IoU when the target is named {'right' if right else 'wrong'}: {mean} "
              f"(n {len(values)})")  # fmt: skip


def probe(features: torch.Tensor, labels: list[str]) -> tuple[float, float]:
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    cut = int(len(y) * 0.7)
    x = (features - features[:cut].mean(0)) / (features[:cut].std(0) + 1e-6)
    weight = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.01)
    for _ in range(500):
        loss = torch.nn.functional.cross_entropy(x[:cut] @ weight + bias, y[:cut])
        loss = loss + 1e-3 * (weight**2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = ((x[cut:] @ weight + bias).argmax(1) == y[cut:]).float().mean().item()
    majority = max((y[cut:] == k).float().mean().item() for k in range(len(classes)))
    return accuracy, majority


def probes(pipeline: LisaPipeline, n: int) -> None:
    loaded = pipeline.loaded
    model = loaded.model.eval()
    data = ReasonSegDataset("runs/pretrain/data/val", queries="first")
    chosen = [i for i, r in enumerate(data.records) if r.family == "attribute"][:n]
    batcher = SampleBatcher(loaded.processor, loaded.sam_processor)
    states, prompts, colours, kinds = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(chosen), 16):
            samples = [data[i] for i in chosen[start : start + 16]]
            batch = batcher(samples, training=False)
            state = model.mask_query_states(
                batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
            )
            states.append(state)
            prompts.append(model.project(state))
            for sample in samples:
                target = target_of(sample.record)
                colours.append(target["colour"])
                kinds.append(target["kind"])
    print(f"linear probes on {len(chosen)} attribute queries (70/30 split):")
    for name, features in (("state", torch.cat(states)), ("prompt", torch.cat(prompts))):
        for what, labels in (("colour", colours), ("kind", kinds)):
            accuracy, majority = probe(features, labels)
            print(f"  {name:6s} -> {what:6s} accuracy {accuracy:.2f} (majority {majority:.2f})")


def main() -> None:
    torch.set_num_threads(2)
    source = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    cfg = preset("tiny")
    if source != "bundled":
        cfg = cfg.replace(llava=f"{source}/llava", sam=f"{source}/sam", heads=source)
    pipeline = LisaPipeline.from_config(cfg, device="cpu")
    naming(pipeline, n)
    probes(pipeline, 400)


if __name__ == "__main__":
    main()
