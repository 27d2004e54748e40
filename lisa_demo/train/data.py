"""Training and validation batches: ReasonSeg samples -> tokenized prompts, pixels, masks.

Also the SAM image-embedding cache: the frozen encoder runs once per image and its output is
reused across the queries of that image and across epochs (in memory, optionally on disk).
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lisa_demo.data.prompts import EVAL_ANSWER, eval_question, training_answer, training_question
from lisa_demo.data.reasonseg import ReasonSegDataset, Sample
from lisa_demo.inputs import (
    EncodedImage,
    PromptFormat,
    collate_text,
    encode_image,
    encode_text,
    image_token_count,
    prompt_format,
)


@dataclass
class PreparedImage:
    encoded: EncodedImage
    mask: np.ndarray  # HxW uint8, 0 / 1 / 255


IMAGE_STORE_SIZE = 4096  # default number of preprocessed images kept in memory


def file_identity(path: Path) -> tuple:
    """The same key for every hard link to one file (and a new one when it is rewritten)."""
    try:
        st = path.stat()
    except OSError:
        return (str(path),)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ImageStore:
    """Decoded, preprocessed images and rasterised masks, bounded LRU by count.

    Images are kept per file (hard links to one image, as in synthetic sets with extra queries,
    are decoded once), masks per annotation.
    """

    def __init__(self, processor, sam_processor, capacity: int = IMAGE_STORE_SIZE) -> None:
        self.processor = processor
        self.sam_processor = sam_processor
        self.capacity = capacity
        self._images: OrderedDict[tuple, EncodedImage] = OrderedDict()
        self._masks: OrderedDict[Path, np.ndarray] = OrderedDict()

    def _lookup(self, items: OrderedDict, key, make):
        item = items.get(key)
        if item is None:
            item = items[key] = make()
            if len(items) > self.capacity:
                items.popitem(last=False)
        else:
            items.move_to_end(key)
        return item

    def get(self, sample: Sample) -> PreparedImage:
        record = sample.record
        encoded = self._lookup(
            self._images,
            file_identity(Path(record.image_path)),
            lambda: encode_image(record.load_image(), self.processor, self.sam_processor),
        )
        mask = self._lookup(self._masks, record.json_path, record.load_mask)
        return PreparedImage(encoded, mask)


class TextEncoder:
    """Questions and answers to token ids, with LISA's templates."""

    def __init__(
        self, processor, explanation_lead: float = 0.0, fmt: PromptFormat | None = None
    ) -> None:
        """fmt: the model's prompt format (LoadedLisa.prompt_format); default: the
        processor's chat template."""
        self.tokenizer = processor.tokenizer
        self.n_image_tokens = image_token_count(processor)
        self.template = fmt or prompt_format(processor)
        self.explanation_lead = explanation_lead

    def _encode(self, question: str, answer: str | None) -> tuple[list[int], list[int]]:
        return encode_text(self.tokenizer, question, answer, self.n_image_tokens, self.template)

    def training(self, sample: Sample, rng: random.Random) -> tuple[list[int], list[int]]:
        question = training_question(sample.query, sample.record.is_sentence, rng)
        return self._encode(
            question, training_answer(rng, sample.explanation, self.explanation_lead)
        )

    def prompt(self, sample: Sample) -> list[int]:
        """The evaluation question alone, for generation."""
        return self._encode(eval_question(sample.query, sample.record.is_sentence), None)[0]

    def evaluation(self, sample: Sample) -> tuple[list[int], list[int]]:
        return self._encode(eval_question(sample.query, sample.record.is_sentence), EVAL_ANSWER)


class SampleBatcher:
    """Turns a list of Samples into the keyword arguments of LisaModel.forward."""

    def __init__(
        self,
        processor,
        sam_processor,
        seed: int = 0,
        explanation_lead: float = 0.0,
        image_capacity: int = IMAGE_STORE_SIZE,
        fmt: PromptFormat | None = None,
    ) -> None:
        self.images = ImageStore(processor, sam_processor, capacity=image_capacity)
        self.text = TextEncoder(processor, explanation_lead, fmt)
        self.pad_id = processor.tokenizer.pad_token_id
        self.seed = seed

    def __call__(
        self,
        samples: list[Sample],
        training: bool,
        epoch: int = 0,
        indices: list[int] | None = None,
    ) -> dict:
        ids, labels, prepared = [], [], []
        for n, sample in enumerate(samples):
            if training:
                # Template choice depends only on (seed, epoch, index): resumable and stable.
                index = indices[n] if indices is not None else n
                rng = random.Random(f"{self.seed}/{epoch}/{index}")
                seq, lab = self.text.training(sample, rng)
            else:
                seq, lab = self.text.evaluation(sample)
            ids.append(seq)
            labels.append(lab)
            prepared.append(self.images.get(sample))
        batch = collate_text(ids, labels, self.pad_id)
        encoded = [p.encoded for p in prepared]
        batch.update(
            pixel_values=torch.stack([e.pixel_values for e in encoded]),
            sam_pixel_values=torch.stack([e.sam_pixel_values for e in encoded]),
            input_sizes=[e.input_size for e in encoded],
            original_sizes=[e.original_size for e in encoded],
            image_keys=[e.key for e in encoded],
            masks=[p.mask for p in prepared],
        )
        return batch


def training_targets(masks: list[np.ndarray]) -> list[torch.Tensor]:
    """Ignore pixels count as background in training (LISA). Each -> [1, H, W] float."""
    return [torch.from_numpy((m == 1).astype(np.float32))[None] for m in masks]


def training_inputs(
    batch: dict, device, cache, encode, feature_cache=None, encode_features=None
) -> dict:
    """LisaModel.forward keyword arguments for a training batch on `device`.

    With `cache`, SAM embeddings come from it (`encode` fills misses) instead of SAM pixels;
    with `feature_cache`, LLaVA's projected vision features come from it (`encode_features`
    fills misses) instead of CLIP pixels. Both are only valid for frozen encoders.
    """
    inputs = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "labels": batch["labels"].to(device),
        "input_sizes": batch["input_sizes"],
        "original_sizes": batch["original_sizes"],
        "gt_masks": training_targets(batch["masks"]),
    }
    if cache is not None:
        inputs["image_embeddings"] = cache.embeddings(batch, encode, device)
    else:
        inputs["sam_pixel_values"] = batch["sam_pixel_values"].to(device)
    if feature_cache is not None:
        inputs["image_features"] = feature_cache.embeddings(
            batch, encode_features, device, pixels="pixel_values"
        )
        inputs["pixel_values"] = None
    else:
        inputs["pixel_values"] = batch["pixel_values"].to(device)
    return inputs


class EmbeddingCache:
    """Image encodings (SAM image embeddings, or LLaVA's vision features) by image content and
    encoder identity; memory LRU + optional disk."""

    def __init__(self, encoder_id: str, capacity: int = 8192, disk_dir: Path | None = None):
        self.encoder_id = encoder_id
        self.capacity = capacity
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _key(self, image_key: str) -> str:
        return hashlib.sha1(f"{self.encoder_id}/{image_key}".encode()).hexdigest()

    def get(self, image_key: str) -> torch.Tensor | None:
        key = self._key(image_key)
        found = self._memory.get(key)
        if found is None and self.disk_dir is not None:
            path = self.disk_dir / f"{key}.safetensors"
            if path.exists():
                found = load_file(str(path))["embedding"]
                self._remember(key, found)
        if found is not None:
            self._memory.move_to_end(key)
        return found

    def put(self, image_key: str, embedding: torch.Tensor) -> None:
        key = self._key(image_key)
        embedding = embedding.detach().to("cpu").contiguous()
        self._remember(key, embedding)
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.disk_dir / f".{key}.tmp"
            save_file({"embedding": embedding}, str(tmp))
            tmp.replace(self.disk_dir / f"{key}.safetensors")

    def _remember(self, key: str, embedding: torch.Tensor) -> None:
        self._memory[key] = embedding
        if len(self._memory) > self.capacity:
            self._memory.popitem(last=False)

    def embeddings(
        self, batch: dict, encode, device: torch.device, pixels: str = "sam_pixel_values"
    ) -> torch.Tensor:
        """[B, ...] for the batch: cached ones reused, the rest encoded from batch[pixels]
        and stored."""
        keys = batch["image_keys"]
        found = [self.get(k) for k in keys]
        missing = [i for i, e in enumerate(found) if e is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                fresh = encode(batch[pixels][missing].to(device))
            for i, emb in zip(missing, fresh, strict=True):
                self.put(keys[i], emb)
                found[i] = emb
        return torch.stack([e.to(device) for e in found])


def limit(dataset: ReasonSegDataset, max_samples: int) -> list[int]:
    """Indices of the dataset, truncated to max_samples (0 = all)."""
    n = len(dataset)
    return list(range(min(n, max_samples) if max_samples else n))
