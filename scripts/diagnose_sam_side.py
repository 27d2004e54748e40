"""Diagnostic: train only SAM against the prompts of a frozen, trained LLaVA + projection.

    PYTHONPATH=. python scripts/diagnose_sam_side.py runs/pretrain/model keep 170
    PYTHONPATH=. python scripts/diagnose_sam_side.py runs/pretrain/model fresh 230
    STANDARDISE=1 PYTHONPATH=. python scripts/diagnose_sam_side.py runs/pretrain/model fresh 230

MODEL is a run's --export-model folder; "keep" continues its SAM, "fresh" starts SAM from the
tiny-random initialisation; SECONDS bounds the run; an optional fourth argument is the learning
rate (default 1e-3). STANDARDISE=1 centres and scales the prompts with statistics of 400
validation prompts; FAMILY=attribute (or another family) trains on that query family alone;
TRAIN_PROJECTION=1 trains the projection with SAM.
Batches of 8 first queries from runs/pretrain/data/train, BCE x 2 + Dice, AdamW, clipping 1.0,
as the pretraining. Prints the training IoU (last 200 masks) and its recent value per query
family every 50 steps. Compare with scripts/diagnose_oracle_prompt.py, where the prompt is
learned from the true target's words.
"""

from __future__ import annotations

import os
import random
import sys
import time

import torch

from lisa_demo.config import preset
from lisa_demo.data.reasonseg import ReasonSegDataset
from lisa_demo.loading import load_lisa
from lisa_demo.losses import dice_per_mask, sigmoid_bce_per_mask
from lisa_demo.train.data import SampleBatcher, training_targets


def main() -> None:
    torch.manual_seed(0)
    random.seed(0)
    model_dir, mode, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    lr = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-3
    cfg = preset("tiny").replace(
        llava=f"{model_dir}/llava", sam=f"{model_dir}/sam", heads=model_dir
    )
    loaded = load_lisa(cfg, device="cpu")
    model = loaded.model.eval()
    if mode == "fresh":
        model.sam.load_state_dict(
            load_lisa(preset("tiny-random"), device="cpu").model.sam.state_dict()
        )
    model.requires_grad_(False)
    model.sam.requires_grad_(True)
    params = list(model.sam.parameters())
    train_projection = bool(os.environ.get("TRAIN_PROJECTION"))
    if train_projection:  # the projection learns with SAM, as in the full model
        model.text_hidden_fcs.requires_grad_(True)
        params += list(model.text_hidden_fcs.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    data = ReasonSegDataset("runs/pretrain/data/train", queries="first")
    families = [r.family for r in data.records]
    only = os.environ.get("FAMILY")  # e.g. FAMILY=attribute: train on that family alone
    pool = [i for i, f in enumerate(families) if only is None or f == only]
    batcher = SampleBatcher(loaded.processor, loaded.sam_processor)

    def prompts(batch: dict) -> torch.Tensor:
        with torch.no_grad():
            states = model.mask_query_states(
                batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
            )
        with torch.set_grad_enabled(train_projection):
            return model.project(states)

    shift, scale = 0.0, 1.0
    if os.environ.get("STANDARDISE"):
        val = ReasonSegDataset("runs/pretrain/data/val", queries="first")
        seen = torch.cat(
            [prompts(batcher([val[i] for i in range(k, k + 16)], training=False))
             for k in range(0, 400, 16)]
        )  # fmt: skip
        shift, scale = seen.mean(0), seen.std(0) + 1e-6
        print(f"prompt mean norm {seen.mean(0).norm():.2f}, mean std {seen.std(0).mean():.2f}")

    start, ious, by_family = time.time(), [], {}
    for step in range(1, 1_000_000):
        chosen = random.sample(pool, 8)
        batch = batcher([data[i] for i in chosen], training=False)
        prompt = (prompts(batch) - shift) / scale
        model.sam.train()
        embeddings = model.sam.vision_encoder(batch["sam_pixel_values"]).last_hidden_state
        logits, _ = model.decode_masks(
            [prompt[i : i + 1] for i in range(8)],
            embeddings,
            batch["input_sizes"],
            batch["original_sizes"],
        )
        targets = training_targets(batch["masks"])
        loss = sum(
            2 * sigmoid_bce_per_mask(x, t).mean() + dice_per_mask(x, t).mean()
            for x, t in zip(logits, targets, strict=True)
        ) / len(chosen)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        for index, x, t in zip(chosen, logits, targets, strict=True):
            pred, truth = x[0] > 0, t[0] > 0.5
            union = (pred | truth).sum().item()
            iou = (pred & truth).sum().item() / union if union else 1.0
            ious.append(iou)
            by_family.setdefault(families[index], []).append(iou)
        if step % 50 == 0:
            recent = {k: round(sum(v[-60:]) / len(v[-60:]), 2) for k, v in by_family.items()}
            print(
                f"step {step} {time.time() - start:.0f}s train IoU (last 200) "
                f"{sum(ious[-200:]) / len(ious[-200:]):.3f} {recent}",
                flush=True,
            )
        if time.time() - start > seconds:
            break


if __name__ == "__main__":
    main()
