"""How fast does the language model learn to point at the target? (diagnostic, not a test)

Loads a pretraining checkpoint for its warmed-up CLIP (frozen, features cached), gives the
language model fresh weights (unless KEEP_LM=1) and trains it on the pointing loss alone
(plus text CE with CE=1), then reports pointing accuracy on val scenes by query family: the
share of queries whose most-attended image patch is covered at least half by the target.

    PYTHONPATH=. python scripts/diagnose_pointing.py runs/pretrain/checkpoints/last \
        runs/pretrain/data SECONDS

Knobs (environment): LR (1e-3), BATCH (8), CE (0), TRAIN_PROJECTOR (0), KEEP_LM (0),
THREADS (2), SEED (0), TRAIN_IMAGES (4000), IMAGE_FIRST (0: the tiny models' prompt, the
question before the image; 1: llava-1.5's, the image first, to see how the order affects
learning).
"""

from __future__ import annotations

import collections
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from lisa_demo.checkpoint import load_trainable_state
from lisa_demo.config import LossWeights, preset
from lisa_demo.data.reasonseg import ReasonSegDataset
from lisa_demo.loading import load_lisa
from lisa_demo.model import pointing_cross_entropy
from lisa_demo.train.data import SampleBatcher, training_targets


def main() -> None:
    checkpoint, data, seconds = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    env = os.environ.get
    torch.set_num_threads(int(env("THREADS", "2")))
    torch.manual_seed(int(env("SEED", "0")))
    cfg = preset("tiny-random").replace(train_all=True, losses=LossWeights(pointing=1.0))
    loaded = load_lisa(cfg, device="cpu")
    if env("IMAGE_FIRST", "0") == "1":
        from lisa_demo.tiny import CHAT_TEMPLATE

        loaded.processor.chat_template = CHAT_TEMPLATE  # llava-1.5's prompt
    model = loaded.model
    load_trainable_state(checkpoint, model)
    llava = model.base_llava
    lm = llava.model.language_model
    if env("KEEP_LM", "0") != "1":
        fresh = load_lisa(cfg, device="cpu").model.base_llava.model.language_model
        lm.load_state_dict(fresh.state_dict())
    params = list(lm.parameters()) + list(llava.lm_head.parameters())
    if env("TRAIN_PROJECTOR", "0") == "1":
        params += list(llava.model.multi_modal_projector.parameters())
    else:
        for p in llava.model.multi_modal_projector.parameters():
            p.requires_grad_(False)
    for p in llava.model.vision_tower.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    train = ReasonSegDataset(data / "train", queries="random", seed=0)
    val = ReasonSegDataset(data / "val", queries="first", seed=0)
    n_train = min(len(train), int(env("TRAIN_IMAGES", "4000")))
    batcher = SampleBatcher(loaded.processor, loaded.sam_processor, seed=0)
    feats: dict[str, torch.Tensor] = {}
    tower = llava.model.vision_tower

    def features(batch) -> torch.Tensor:
        keys = batch["image_keys"]
        missing = [i for i, k in enumerate(keys) if k not in feats]
        if missing:
            with torch.no_grad():
                pv = batch["pixel_values"][missing]
                states = tower(pv, output_hidden_states=True).hidden_states
                vision = states[llava.config.vision_feature_layer][:, 1:]
            for i, f in zip(missing, vision, strict=True):
                feats[keys[i]] = f
        raw = torch.stack([feats[k] for k in keys])
        return llava.model.multi_modal_projector(raw)

    from transformers.modeling_outputs import BaseModelOutputWithPooling

    def forward(batch):
        captured: dict = {}
        hook = model._capture_last_attention_inputs(captured)
        f = features(batch)
        scored = batch["labels"][:, 1:] != -100
        keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
        keep[:, :-1] = scored
        image = BaseModelOutputWithPooling(pooler_output=list(f.unbind(0)))
        out = llava(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            mm_encoder_outputs={"image": image}, return_dict=True, logits_to_keep=keep,
        )  # fmt: skip
        hook.remove()
        found = model.pointing_attention(captured, batch["input_ids"], batch["attention_mask"],
                                         training_targets(batch["masks"]))  # fmt: skip
        log_image, cover = found
        point = pointing_cross_entropy(log_image, cover)
        targets = batch["labels"][:, 1:][scored]
        ce = torch.nn.functional.cross_entropy(out.logits.float(), targets)
        hit = cover.gather(1, log_image.argmax(1, keepdim=True))[:, 0] >= 0.5
        return point, ce, hit

    optimizer = torch.optim.AdamW(params, lr=float(env("LR", "1e-3")), betas=(0.9, 0.95),
                                  weight_decay=0.0)  # fmt: skip
    batch_size = int(env("BATCH", "8"))
    ce_weight = float(env("CE", "0"))
    rng = random.Random(0)
    start, step = time.monotonic(), 0
    recent = collections.deque(maxlen=50)
    model.train()
    while time.monotonic() - start < seconds:
        idx = rng.sample(range(n_train), batch_size)
        batch = batcher([train[i] for i in idx], training=True, epoch=step, indices=idx)
        point, ce, hit = forward(batch)
        loss = point + ce_weight * ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        recent.append((float(point.detach()), float(hit.float().mean())))
        if step % 100 == 0:
            p = sum(r[0] for r in recent) / len(recent)
            h = sum(r[1] for r in recent) / len(recent)
            print(f"step {step} t {time.monotonic() - start:.0f}s point {p:.3f} hit {h:.3f}",
                  flush=True)  # fmt: skip
    model.eval()
    by_family = collections.defaultdict(list)
    with torch.no_grad():
        samples = [val[i] for i in range(len(val))][:200]
        for i in range(0, len(samples), 16):
            chunk = samples[i : i + 16]
            batch = batcher(chunk, training=False)
            _, _, hit = forward(batch)
            for s, h in zip(chunk, hit.tolist(), strict=True):
                fam = json.loads(s.record.json_path.read_text())["family"]
                by_family[fam].append(h)
    total = [h for v in by_family.values() for h in v]
    print(f"steps {step}; val pointing accuracy {sum(total) / len(total):.3f} (n {len(total)})")
    for fam, v in sorted(by_family.items()):
        print(f"  {fam}: {sum(v) / len(v):.3f} (n {len(v)})")


if __name__ == "__main__":
    main()
