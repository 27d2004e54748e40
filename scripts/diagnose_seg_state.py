"""Diagnostic: how much the [SEG]-predicting state and the projected prompt depend on the question.

python scripts/diagnose_seg_state.py runs/pretrain/checkpoints/best   (a train_all checkpoint)
"""

import sys
from dataclasses import replace

import torch

from lisa_demo.checkpoint import load_trainable_state
from lisa_demo.config import preset
from lisa_demo.data.reasonseg import ReasonSegDataset
from lisa_demo.loading import load_lisa
from lisa_demo.train.data import SampleBatcher

torch.set_num_threads(2)
L = load_lisa(preset("tiny-random").replace(train_all=True), for_training=True)
load_trainable_state(sys.argv[1], L.model)
m = L.model.eval()
ds = ReasonSegDataset("runs/pretrain/data/train", queries="first")
b = SampleBatcher(L.processor, L.sam_processor)
samples = [ds[i] for i in range(8)]
fakes = [replace(s, query=ds[i + 20].query) for i, s in enumerate(samples)]
batch = b(samples + fakes, training=False)
with torch.no_grad():
    # One [SEG] per answer, so one state per sample, in order.
    h = m.mask_query_states(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    pr = m.project(h)
    alive = (torch.relu(m.text_hidden_fcs[0](h)) > 0).any(0).sum().item()
    rel = ((pr[:8] - pr[8:]).norm(dim=1) / pr[:8].norm(dim=1)).mean().item()
    hrel = ((h[:8] - h[8:]).norm(dim=1) / h[:8].norm(dim=1)).mean().item()
    real = pr[:8]
    spread = ((real - real.mean(0)).norm(dim=1).mean() / real.mean(0).norm()).item()
    norm = real.norm(dim=1).mean().item()
print(f"alive units {alive}/256  prompt rel diff {rel:.3f}  hidden rel diff {hrel:.3f}")
# A prompt that is one large constant vector with a small per-sample part carries little.
print(f"prompt norm {norm:.2f}  prompt spread across samples / mean {spread:.3f}")
