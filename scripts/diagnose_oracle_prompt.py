"""Diagnostic: how fast SAM alone learns when its prompt already names the target.

The LLM is left out: each sample's sparse prompt is the sum of learned embeddings of the words
of its explanation ("It is the small red triangle." -> small + red + triangle), and only SAM
(encoder and decoder, from scratch) and those embeddings train. This is an upper bound on how
fast the mask side of the tiny model can learn; the full model's `[SEG]` prompt must get there.

python scripts/diagnose_oracle_prompt.py DATA_DIR [--lr 1e-3] [--seconds 300] [--scale 1.0]
    DATA_DIR: a synthetic set written with explanations (train/ and train_explanations.json)
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch
from torch import nn

from lisa_demo.config import preset
from lisa_demo.data.reasonseg import ReasonSegDataset
from lisa_demo.loading import load_lisa
from lisa_demo.losses import dice_per_mask, sigmoid_bce_per_mask
from lisa_demo.metrics import intersection_union
from lisa_demo.train.data import SampleBatcher, training_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--scale", type=float, default=1.0, help="prompt scale (1: N(0,1) words)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    loaded = load_lisa(preset("tiny-random").replace(train_all=True), for_training=True)
    model = loaded.model
    entries = json.loads((args.data / "train_explanations.json").read_text())
    explained = {Path(e["image"]).stem: e["outputs"] for e in entries}
    dataset = ReasonSegDataset(args.data / "train", queries="first")
    vocabulary: dict[str, int] = {}
    words = nn.Embedding(64, model.sam.config.mask_decoder_config.hidden_size)

    def prompt(name: str) -> torch.Tensor:
        named = explained[name].rstrip(".").split()[3:]  # drop "It is the"
        ids = torch.tensor([vocabulary.setdefault(w, len(vocabulary)) for w in named])
        return args.scale * words(ids).sum(0, keepdim=True)

    params = [*model.sam.parameters(), *words.parameters()]
    for p in model.sam.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    batcher = SampleBatcher(loaded.processor, loaded.sam_processor)
    ious: list[float] = []
    start, step = time.time(), 0
    while time.time() - start < args.seconds:
        step += 1
        samples = [dataset[i] for i in rng.sample(range(len(dataset)), args.batch_size)]
        batch = batcher(samples, training=False)
        embeddings = model.sam.vision_encoder(batch["sam_pixel_values"]).last_hidden_state
        logits, _ = model.decode_masks(
            [prompt(s.record.name) for s in samples], embeddings,
            batch["input_sizes"], batch["original_sizes"],
        )  # fmt: skip
        targets = training_targets(batch["masks"])
        loss = sum(
            2 * sigmoid_bce_per_mask(lg, t).mean() + dice_per_mask(lg, t).mean()
            for lg, t in zip(logits, targets, strict=True)
        ) / len(samples)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        for lg, t in zip(logits, targets, strict=True):
            inter, union = intersection_union((lg[0] > 0).numpy(), t[0].numpy().astype("uint8"))
            ious.append(inter / max(union, 1))
        if step % 25 == 0:
            recent = ious[-200:]
            mean_iou = sum(recent) / len(recent)
            elapsed = time.time() - start
            print(f"step {step} {elapsed:.0f}s loss {loss.item():.3f} train IoU {mean_iou:.3f}")


if __name__ == "__main__":
    main()
