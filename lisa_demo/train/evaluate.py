"""Validation with the LISA protocol, shared by training and `python -m lisa_demo.eval`.

Teacher-forced: the fixed question plus the answer "[SEG]." in one forward pass; the first
query of each image; masks thresholded at logit 0 and compared at original resolution with
ignore pixels excluded. Accumulators are summed across processes before dividing.
"""

from __future__ import annotations

import torch

from lisa_demo.data.reasonseg import Sample
from lisa_demo.inputs import collate_text
from lisa_demo.metrics import IoUAccumulator, intersection_union
from lisa_demo.model import LisaModel
from lisa_demo.train.data import SampleBatcher


def _shard(items: list, rank: int, world: int) -> list:
    return items[rank::world]


@torch.no_grad()
def evaluate_samples(
    model: LisaModel,
    batcher: SampleBatcher,
    samples: list[Sample],
    batch_size: int,
    device: torch.device,
    embeddings=None,  # EmbeddingCache or None
    accelerator=None,
) -> tuple[IoUAccumulator, list[dict]]:
    """gIoU / cIoU over `samples` (already one per image for LISA's protocol)."""
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    local = _shard(samples, rank, world)
    acc = IoUAccumulator()
    per_sample: list[dict] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(local), batch_size):
        chunk = local[start : start + batch_size]
        batch = batcher(chunk, training=False)
        if embeddings is not None:
            image_embeddings = embeddings.embeddings(batch, model.encode_images, device)
        else:
            image_embeddings = model.encode_images(batch["sam_pixel_values"].to(device))
        out = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            pixel_values=batch["pixel_values"].to(device),
            input_sizes=batch["input_sizes"],
            original_sizes=batch["original_sizes"],
            image_embeddings=image_embeddings,
        )
        for sample, logits, target in zip(chunk, out.mask_logits, batch["masks"], strict=True):
            pred = (logits[0] > 0).cpu().numpy() if logits.shape[0] else target * 0
            inter, union = intersection_union(pred, target)
            iou = acc.add_counts(inter, union)
            per_sample.append(
                {"image": sample.record.name, "query": sample.query, "iou": iou,
                 "intersection": inter, "union": union, "family": sample.record.family}
            )  # fmt: skip
    if accelerator is not None and world > 1:
        total = accelerator.reduce(acc.as_tensor().to(device), reduction="sum")
        acc = IoUAccumulator.from_tensor(total.cpu())
    if was_training:
        model.train()
    return acc, per_sample


@torch.no_grad()
def seg_rate(
    model: LisaModel,
    batcher: SampleBatcher,
    samples: list[Sample],
    device: torch.device,
    max_new_tokens: int = 16,
) -> float:
    """Share of greedy answers (evaluation question) that contain `[SEG]`."""
    if not samples:
        return float("nan")
    was_training = model.training
    model.eval()
    ids = [batcher.text.prompt(sample) for sample in samples]
    batch = collate_text(ids, None, batcher.pad_id, left=True)
    pixels = torch.stack([batcher.images.get(s).encoded.pixel_values for s in samples])
    llava = model.llava
    dtype = llava.get_input_embeddings().weight.dtype
    generated = llava.generate(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        pixel_values=pixels.to(device, dtype),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=batcher.pad_id,
    )
    new_tokens = generated[:, batch["input_ids"].shape[1] :]
    hits = (new_tokens == model.seg_token_id).any(dim=1).float().mean().item()
    if was_training:
        model.train()
    return hits


def family_breakdown(per_sample: list[dict]) -> dict[str, dict]:
    """gIoU / cIoU / n per query family (synthetic data); samples without one are skipped."""
    groups: dict[str, IoUAccumulator] = {}
    for row in per_sample:
        if row.get("family"):
            groups.setdefault(row["family"], IoUAccumulator()).add_counts(
                row["intersection"], row["union"]
            )
    return {name: acc.as_dict() for name, acc in sorted(groups.items())}


def score_model(
    loaded,  # LoadedLisa
    samples: list[Sample],
    batch_size: int = 4,
    seg_rate_samples: int = 0,
) -> dict:
    """LISA-protocol scores of a loaded model on `samples` (one process)."""
    batcher = SampleBatcher(loaded.processor, loaded.sam_processor, fmt=loaded.prompt_format)
    model = loaded.model
    acc, per_sample = evaluate_samples(model, batcher, samples, batch_size, loaded.device)
    result = {**acc.as_dict(), "families": family_breakdown(per_sample)}
    if seg_rate_samples:
        chosen = samples[:seg_rate_samples]
        hits = 0.0
        for i in range(0, len(chosen), batch_size):
            chunk = chosen[i : i + batch_size]
            hits += seg_rate(model, batcher, chunk, loaded.device) * len(chunk)
        result["seg_rate"] = hits / len(chosen)
        result["seg_rate_n"] = len(chosen)
    result["per_sample"] = per_sample
    return result
