"""Encoder warm-ups for pretraining the tiny model from scratch (not part of LISA).

LISA starts from a pretrained CLIP and a pretrained SAM. The tiny model has neither, and the
LISA losses alone teach both encoders too slowly on a CPU. So a `--train-all` run may first
give each encoder a short supervised stage of its own on the synthetic scenes, whose
annotations list every object ("objects": kind, colour, size, visible outline):

- **vision**: CLIP's patch states at the layer LLaVA reads (-2) predict, through a temporary
  linear head, the kind, colour and size of the object covering most of each patch ("none"
  where no object covers a quarter of it), and the patch's own row and column. Afterwards
  the language model sees patches that already say what is where.
- **sam**: SAM segments one object per image from a click inside it (its own prompt
  encoding of a positive point, the form `objectives.click_prompts` gives) and, with
  `--target-weight`, also from a learned *description prompt* of it (kind + colour + size +
  region vectors, `objectives.DescriptionPrompts`), BCE + Dice as in LISA. The LISA loop's
  target loss then pulls each `[SEG]` prompt towards its target's description prompt, so
  the language model only has to work out *which* object is meant; SAM already knows how
  to find an object so described.

The patch head and the prompts are training-only: an exported model keeps the encoder and
mask decoder weights and nothing else. Both stages run for a wall-clock budget (part of
`--max-minutes`) and report to the run's event log ("warmup", "warmup_done").
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from lisa_demo.data.reasonseg import Sample
from lisa_demo.data.synthetic import COLOURS, SHAPE_KINDS, SIZES, object_classes
from lisa_demo.losses import dice_per_mask, sigmoid_bce_per_mask
from lisa_demo.model import LisaModel
from lisa_demo.train.data import SampleBatcher, file_identity, training_targets
from lisa_demo.train.pretrain.objectives import click_prompts, description_prompts
from lisa_demo.train.pretrain.targets import click_points

VOCABULARIES = (tuple(SHAPE_KINDS), tuple(COLOURS), tuple(SIZES))
MIN_COVER = 0.25  # share of a patch an object must cover to label it


class WarmupError(ValueError):
    """The data cannot drive a warm-up (no object annotations)."""


def patch_labels(objects: Sequence[dict], height: int, width: int, grid: int) -> torch.Tensor:
    """[3, grid * grid] class indices (kind, colour, size) of the object covering each patch.

    Patches are the cells of a grid x grid split of the image (row-major, as CLIP's patch
    tokens). Each object's visible outline is painted, its covered share of every cell taken
    (area-averaged), and a cell gets the object with the largest share when that share is at
    least MIN_COVER; otherwise it gets "none", index len(vocabulary) in each row.
    """
    labels = torch.tensor([len(v) for v in VOCABULARIES]).repeat(grid * grid, 1).T.clone()
    if not objects:
        return labels
    cover = [
        cv2.resize(
            outline_mask(obj, height, width).astype(np.float32), (grid, grid),
            interpolation=cv2.INTER_AREA,
        )
        for obj in objects
    ]  # fmt: skip
    shares = np.stack(cover).reshape(len(objects), -1)
    best = shares.argmax(0)
    for cell in np.flatnonzero(shares.max(0) >= MIN_COVER):
        obj = objects[best[cell]]
        values = (obj["kind"], obj["colour"], obj["size"])
        for row, (vocab, value) in enumerate(zip(VOCABULARIES, values, strict=True)):
            if value in vocab:
                labels[row, cell] = vocab.index(value)
    return labels


def outline_mask(obj: dict, height: int, width: int) -> np.ndarray:
    """HxW uint8, 1 inside an annotation object's visible outline polygons."""
    mask = np.zeros((height, width), np.uint8)
    for polygon in obj["outline"]:
        cv2.fillPoly(mask, [np.asarray(polygon, np.int32)], 1)
    return mask


def scene_objects(sample: Sample) -> list[dict]:
    """The "objects" list of a synthetic annotation (empty for other ReasonSeg data)."""
    annotation = json.loads(sample.record.json_path.read_text())
    objects = annotation.get("objects") or []
    return [o for o in objects if isinstance(o, dict) and "outline" in o and "kind" in o]


def _ignore(*args, **kwargs) -> None:
    return None


def _never() -> bool:
    return False


def _cosine(step_lr: float, elapsed: float, budget: float, step: int, warmup: int) -> float:
    return (
        step_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
    )


def _run_stage(
    name: str,
    params: list[torch.nn.Parameter],
    loss_fn: Callable[[list[Sample]], tuple[torch.Tensor, float]],
    samples: Sequence[Sample],
    minutes: float,
    batch_size: int,
    learning_rate: float,
    seed: int,
    emit: Callable[..., None],
    should_stop: Callable[[], bool],
    log_every: int = 50,
) -> dict:
    """A wall-clock-budgeted AdamW loop (linear warm-up, cosine decay over the budget)."""
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(f"warmup/{name}/{seed}")
    samples = list(samples)
    budget = minutes * 60.0
    start = time.monotonic()
    step, recent_loss, recent_metric = 0, [], []
    while (elapsed := time.monotonic() - start) < budget and not should_stop():
        for group in optimizer.param_groups:
            group["lr"] = _cosine(learning_rate, elapsed, budget, step, warmup=100)
        loss, metric = loss_fn(rng.sample(samples, min(batch_size, len(samples))))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        recent_loss.append(float(loss.detach()))
        recent_metric.append(metric)
        if step % log_every == 0:
            emit("warmup", stage=name, step=step, seconds=round(time.monotonic() - start, 1),
                 loss=float(np.mean(recent_loss)),
                 metric=float(np.mean(recent_metric)))  # fmt: skip
            recent_loss, recent_metric = [], []
    summary = {"stage": name, "steps": step, "seconds": round(time.monotonic() - start, 1)}
    emit("warmup_done", **summary)
    return summary


def warm_up_vision(
    model: LisaModel, batcher: SampleBatcher, samples: Sequence[Sample], minutes: float,
    batch_size: int = 32, learning_rate: float = 1e-3, seed: int = 0,
    emit: Callable[..., None] = _ignore, should_stop: Callable[[], bool] = _never,
) -> dict:  # fmt: skip
    """Train CLIP's vision tower to label its patches (see the module docstring).

    The metric logged is the share of object-covered patches whose kind is right.
    """
    usable = [s for s in samples if scene_objects(s)]
    if not usable:
        raise WarmupError("the vision warm-up needs synthetic scenes (annotations with 'objects')")
    tower = model.base_llava.model.vision_tower
    layer = model.base_llava.config.vision_feature_layer
    n_patches = (tower.config.image_size // tower.config.patch_size) ** 2
    grid = int(round(math.sqrt(n_patches)))
    # kind, colour, size (+ "none") of the covering object, then the patch's own row and
    # column: without them the states keep no trace of where a patch is (a linear probe on
    # them found rows and columns no better than chance), and the language model then cannot
    # tell where its target is.
    sizes = [len(v) + 1 for v in VOCABULARIES] + [grid, grid]
    cells = torch.arange(grid * grid)
    where = torch.stack([cells // grid, cells % grid])  # [2, N] row, column
    head = torch.nn.Linear(tower.config.hidden_size, sum(sizes))
    labels_of: dict[str, torch.Tensor] = {}

    def labels(sample: Sample) -> torch.Tensor:
        key = str(sample.record.json_path)
        if key not in labels_of:
            record = sample.record
            labels_of[key] = patch_labels(scene_objects(sample), record.height, record.width, grid)
        return labels_of[key]

    def loss_fn(batch_samples: list[Sample]) -> tuple[torch.Tensor, float]:
        pixels = torch.stack([batcher.images.get(s).encoded.pixel_values for s in batch_samples])
        target = torch.stack([torch.cat([labels(s), where]) for s in batch_samples])  # [B, 5, N]
        states = tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
        logits = head(states).split(sizes, dim=-1)
        loss = sum(
            F.cross_entropy(part.flatten(0, 1), target[:, row].flatten())
            for row, part in enumerate(logits)
        )
        covered = target[:, 0] < len(VOCABULARIES[0])
        right = (logits[0].argmax(-1) == target[:, 0])[covered]
        return loss, float(right.float().mean()) if right.numel() else 0.0

    params = list(tower.parameters()) + list(head.parameters())
    return _run_stage("vision", params, loss_fn, usable, minutes, batch_size, learning_rate,
                      seed, emit, should_stop)  # fmt: skip


def object_masks(sample: Sample) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """(description classes, HxW uint8 mask) of every object of a synthetic scene whose
    kind, colour and size no other object there shares (so the description names it even
    without its region)."""
    record = sample.record
    objects = scene_objects(sample)
    triples = [(o["kind"], o["colour"], o["size"]) for o in objects]
    out = []
    for obj, triple in zip(objects, triples, strict=True):
        if triples.count(triple) != 1:
            continue
        mask = outline_mask(obj, record.height, record.width)
        try:
            classes = object_classes(obj, record.width, record.height)
        except ValueError:
            continue
        if mask.any():
            out.append((classes, mask))
    return out


def warm_up_sam(
    model: LisaModel, batcher: SampleBatcher, samples: Sequence[Sample], minutes: float,
    batch_size: int = 8, learning_rate: float = 1e-3, seed: int = 0,
    bce_weight: float = 2.0, dice_weight: float = 1.0,
    emit: Callable[..., None] = _ignore, should_stop: Callable[[], bool] = _never,
) -> dict:  # fmt: skip
    """Train SAM (encoder, prompt encoder, mask decoder) to segment objects from prompts.

    Each step takes one object per image: on synthetic scenes a random object with a unique
    description, else the target. SAM segments it from a click inside it and, when the model
    has description prompts (--target-weight), also from its description prompt (which
    trains with it). BCE + Dice, as in LISA. The metric logged is the mean IoU of the
    thresholded masks (clicks and descriptions together).
    """
    sam = model.sam
    describe = description_prompts(model)
    objects_of: dict[str, list] = {}
    rng = random.Random(f"warmup/sam-objects/{seed}")

    def pick(sample: Sample, target: np.ndarray):
        key = str(sample.record.json_path)
        if key not in objects_of:
            objects_of[key] = object_masks(sample)
        found = objects_of[key]
        return rng.choice(found) if found else (None, (target == 1).astype(np.uint8))

    def loss_fn(batch_samples: list[Sample]) -> tuple[torch.Tensor, float]:
        batch = batcher(batch_samples, training=False)
        chosen = [pick(s, m) for s, m in zip(batch_samples, batch["masks"], strict=True)]
        masks = [mask for _, mask in chosen]
        embeddings = sam.vision_encoder(batch["sam_pixel_values"]).last_hidden_state
        sizes = (batch["input_sizes"], batch["original_sizes"])
        clicks = click_points({**batch, "masks": masks})
        prompts = [click_prompts(model, c) for c in clicks]
        if describe is not None:
            for row, (classes, _) in enumerate(chosen):
                if classes is not None:
                    prompts[row] = torch.cat([prompts[row], describe(torch.tensor([classes]))])
        logits, _ = model.decode_masks(prompts, embeddings, *sizes)
        targets = [t.expand(lg.shape[0], -1, -1) for lg, t in
                   zip(logits, training_targets(masks), strict=True)]  # fmt: skip
        loss = torch.cat([
            bce_weight * sigmoid_bce_per_mask(lg, t) + dice_weight * dice_per_mask(lg, t)
            for lg, t in zip(logits, targets, strict=True)
        ]).mean()  # fmt: skip
        with torch.no_grad():
            ious = [
                float(((lg > 0) & (t > 0.5)).sum() / ((lg > 0) | (t > 0.5)).sum().clamp(min=1))
                for lgs, ts in zip(logits, targets, strict=True)
                for lg, t in zip(lgs, ts, strict=True)
            ]
        return loss, float(np.mean(ious))

    params = list(sam.parameters()) + (list(describe.parameters()) if describe else [])
    return _run_stage("sam", params, loss_fn, samples, minutes, batch_size, learning_rate,
                      seed, emit, should_stop)  # fmt: skip


def warmup_samples(train_set, n_train: int, images: int = 0) -> list[Sample]:
    """The training samples of the first `images` distinct images (all when 0; hard links to
    one image file count once)."""
    samples = [train_set[i] for i in range(n_train)]
    if not images:
        return samples
    kept: set = set()
    chosen = []
    for sample in samples:
        image = file_identity(Path(sample.record.image_path))
        if image not in kept and len(kept) >= images:
            continue
        kept.add(image)
        chosen.append(sample)
    return chosen
