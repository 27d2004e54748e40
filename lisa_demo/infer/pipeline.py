"""The numpy/PIL-facing segmentation API: image + question -> answer, masks, scores, timings.

One `LisaPipeline` holds a loaded model, a lock the app serialises calls with, and an LRU cache
of per-image encodings (SAM image embeddings and LLaVA's projected vision features), so a
second question about the same image runs neither image encoder. When the model's prompt puts
the image first (llava-1.5), the most recent images also keep the KV cache of the prompt's
question-independent prefix (BOS, "USER: " and the image tokens: the tokenizer splits around
the special `<image>` token, so these ids never depend on the question), so a further question
prefills only itself and " ASSISTANT:". When the question comes first (the bundled tiny
model), the image tokens' states depend on the question and the whole prompt is prefilled.

Generation is greedy with the KV cache on, and always in two parts, cached or not: the prefix
(image first) or all of the prompt but its last token (question first) in one forward pass,
then a greedy loop from there (the loop `generate` runs, without its per-call set-up). Every
path therefore does the same arithmetic, and a cache hit gives bit-identical answers and
masks. The `[SEG]` queries come out of the generation itself: the last-layer (post-norm)
state that predicted a generated `[SEG]` is exactly LISA's "state just before `[SEG]`", so no
second forward pass is needed.
"""

from __future__ import annotations

import copy
import io
import math
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from lisa_demo.config import IMAGE_TOKEN, SEG_TOKEN, ModelConfig
from lisa_demo.inputs import (
    added_token_strings,
    collate_text,
    encode_image,
    encode_text,
    image_key,
    image_token_count,
)
from lisa_demo.loading import LoadedLisa, load_lisa

MAX_IMAGE_PIXELS = 40_000_000
MAX_QUERY_CHARS = 1000
_RESIZE_HINT = f"downscale it to at most {MAX_IMAGE_PIXELS // 1_000_000} megapixels and try again"
NO_SEG_MESSAGE = f"The model found nothing to segment: its answer has no {SEG_TOKEN} token."
# More [SEG] tokens than this in one answer are degenerate output (the model repeating the
# token), not objects: a message says so instead of advising another threshold.
MANY_MASKS = 4
_WHITE = (255, 255, 255, 255)
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")

ImageSource = str | Path | bytes | np.ndarray | Image.Image


class InputError(ValueError):
    """Bad user input (image or query); the message says what was wrong and what to do."""


# Images -------------------------------------------------------------------------------------
def load_image(source: ImageSource) -> np.ndarray:
    """Any supported image source -> HxWx3 uint8 RGB (a new array; the input is not modified).

    Accepts a file path, encoded bytes, a PIL image or a numpy array (HxW, HxWx1, HxWx3 or
    HxWx4, uint8 or bool). Grayscale, palette and 16-bit images are converted to RGB, images
    with transparency are composited on white, and EXIF orientation is applied.

    Raises:
        InputError: missing or unreadable file, not an image, a damaged image, zero size, or
            more than MAX_IMAGE_PIXELS pixels (checked from the header, before decoding).
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    if isinstance(source, Image.Image):
        _check_size(source.size, "the image")
        return _pil_to_rgb(source)
    if isinstance(source, bytes | bytearray | memoryview):
        return _decode(io.BytesIO(bytes(source)), "the uploaded data")
    if isinstance(source, str | Path):
        path = Path(source).expanduser()
        if path.is_dir():
            raise InputError(f"{path} is a folder, not an image file; pass the path of an image")
        if not path.is_file():
            raise InputError(f"image file not found: {path}; check the path")
        try:
            with path.open("rb") as handle:
                return _decode(handle, str(path))
        except PermissionError as err:
            raise InputError(f"cannot read {path}: permission denied") from err
    raise InputError(
        f"unsupported image type {type(source).__name__}; pass a file path, encoded bytes, "
        "a numpy array or a PIL image"
    )


def _decode(stream, name: str) -> np.ndarray:
    """Open lazily, check the header's size, then decode."""
    try:
        with warnings.catch_warnings():
            # PIL warns (or raises, above twice its limit) on huge headers; our own, lower
            # limit below turns both into an InputError.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                _check_size(image.size, name)
                image.load()
                return _pil_to_rgb(image)
    except InputError:
        raise
    except Image.DecompressionBombError as err:
        raise InputError(f"{name} is far too large to open ({err}); {_RESIZE_HINT}") from err
    except UnidentifiedImageError as err:
        raise InputError(
            f"{name} is not an image this app can read; use a PNG, JPEG, WebP, BMP, GIF or TIFF "
            "file"
        ) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InputError(
            f"{name} is damaged or truncated and cannot be decoded ({err}); re-save or "
            "re-export the image and try again"
        ) from err


def _check_size(size: tuple[int, int], name: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InputError(f"{name} has zero size ({width}x{height}); use a non-empty image")
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(
            f"{name} is {width}x{height} ({width * height / 1e6:.0f} megapixels), more than the "
            f"{MAX_IMAGE_PIXELS // 1_000_000} megapixel limit; {_RESIZE_HINT}"
        )


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    image = ImageOps.exif_transpose(image)  # a new image: the caller's is left alone
    if image.mode in _HIGH_DEPTH_MODES:
        # PIL's own conversion clips 16-bit values at 255; rescale to 8 bits instead.
        gray = np.asarray(image, dtype=np.float64)
        if image.mode != "F":
            gray = gray / 257.0
        gray8 = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        return np.repeat(gray8[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        image = Image.alpha_composite(background, rgba)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        height, width, channels = array.shape
    elif array.ndim == 2:
        (height, width), channels = array.shape, 1
    else:
        raise InputError(
            f"an image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}"
        )
    _check_size((width, height), "the image")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        raise InputError(
            f"an image array must be uint8 with values in [0, 255], got {array.dtype}; "
            "convert it first (e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1])"
        )
    array = array.reshape(height, width, channels)
    if channels == 1:
        return np.repeat(array, 3, axis=2)
    if channels == 4:
        alpha = array[:, :, 3:].astype(np.float32) / 255.0
        rgb = array[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return np.array(array, dtype=np.uint8)  # a copy


def check_query(query: str) -> str:
    """The query as the model will see it (surrounding whitespace removed)."""
    if not isinstance(query, str):
        raise InputError(f"the query must be text, got {type(query).__name__}")
    text = query.strip()
    if not text:
        raise InputError("the query is empty; ask about something in the image")
    if len(text) > MAX_QUERY_CHARS:
        raise InputError(
            f"the query is {len(text)} characters long; the limit is {MAX_QUERY_CHARS}, "
            "so shorten it"
        )
    if IMAGE_TOKEN in text:
        raise InputError(f"the query must not contain {IMAGE_TOKEN!r}; remove it")
    return text


# Results ------------------------------------------------------------------------------------
@dataclass
class MaskResult:
    """One mask per `[SEG]` token of the answer, at the original image size."""

    mask: np.ndarray  # HxW bool
    score: float  # SAM's predicted IoU for this mask (the confidence), about [0, 1]
    area_fraction: float  # share of the image's pixels inside the mask, [0, 1]
    logits: np.ndarray | None = None  # HxW float32 mask logits (kept on request)


@dataclass
class SegmentationResult:
    """The answer to one query on one image."""

    answer: str  # generated text, special tokens removed, "[SEG]" kept
    masks: list[MaskResult]  # in the order of the answer's [SEG] tokens
    timings: dict[str, float]  # seconds: image_encoding, generation, mask_decoding, total
    cache_hit: bool  # whether the image encodings came from the cache
    message: str | None = None  # why there is no (or an empty) mask, when that happens
    token_ids: list[int] | None = None  # the generated tokens (EOS excluded)


@dataclass
class _PromptPrefix:
    """The question-independent start of the prompt and its KV cache, for one image."""

    ids: tuple[int, ...]  # BOS, "USER: ", then every image token
    cache: DynamicCache  # batch 1; decoding extends caches in place, so it only gets copies


@dataclass
class _ImageEncoding:
    """What one image costs to encode, kept in the cache."""

    sam_embeddings: torch.Tensor  # [1, C, h, w] SAM image embeddings
    image_features: torch.Tensor  # [N, D] LLaVA's projected vision features
    input_size: tuple[int, int]  # resized image inside SAM's padded square
    original_size: tuple[int, int]  # (H, W)
    prefix: _PromptPrefix | None = None  # kept for the prefix_cache_size most recent images


@dataclass
class _Answer:
    """One generated answer and the hidden states that predicted its `[SEG]` tokens."""

    text: str
    seg_states: torch.Tensor  # [n, H], last layer after the final norm
    truncated: bool  # stopped at max_new_tokens rather than at EOS
    tokens: list[int]  # generated ids, EOS excluded


# The pipeline -------------------------------------------------------------------------------
class LisaPipeline:
    """Image + question -> answer text and one mask per `[SEG]`.

    Not re-entrant: callers that share one pipeline between threads hold `lock` around calls
    (the app does).
    """

    def __init__(
        self,
        loaded: LoadedLisa,
        cache_size: int = 16,
        max_new_tokens: int = 48,
        prefix_cache_size: int = 2,
    ):
        """cache_size: images whose encodings are kept; prefix_cache_size: how many of the
        most recent of them also keep their prompt prefix's KV cache (2 x layers x prefix
        tokens x KV width values: 290 MiB for llava-1.5-7b in bf16, 0.8 MiB for tiny)."""
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        if prefix_cache_size < 0:
            raise ValueError(f"prefix_cache_size must be >= 0, got {prefix_cache_size}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.loaded = loaded
        self.cache_size = cache_size
        self.prefix_cache_size = prefix_cache_size
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()
        self._cache: OrderedDict[str, _ImageEncoding] = OrderedDict()
        self._n_image_tokens = image_token_count(loaded.processor)
        self._format = loaded.prompt_format
        self._image_first = self._format.image_first
        # LISA's tokenization splits a query around added tokens: refuse them in queries.
        self._reserved = added_token_strings(loaded.tokenizer) if self._format.piecewise else []
        # Tokens the model must never generate (an `<image>` placeholder added by conversion).
        suppress = getattr(loaded.model.base_llava.generation_config, "suppress_tokens", None)
        self._suppress = list(suppress or [])
        # Called as processor(sequence, scores) before each greedy choice (the benchmark forces
        # an answer with one); None in normal use.
        self.logits_processor = None

    @classmethod
    def from_config(
        cls,
        cfg: ModelConfig,
        checkpoint: str | Path | None = None,
        device: str | torch.device | None = None,
        **kw,
    ) -> LisaPipeline:
        """Load the model described by `cfg` (plus an optional checkpoint) for inference."""
        return cls(load_lisa(cfg, checkpoint=checkpoint, device=device), **kw)

    def clear_cache(self) -> None:
        self._cache.clear()

    def segment(
        self,
        image: ImageSource,
        query: str,
        threshold: float = 0.0,
        *,
        keep_logits: bool = False,
    ) -> SegmentationResult:
        """Answer `query` about `image`; a mask is the pixels whose logit exceeds `threshold`.

        keep_logits: also return each mask's HxW float32 logits (for re-thresholding).
        """
        return self.segment_batch(image, [query], threshold, keep_logits=keep_logits)[0]

    def segment_batch(
        self,
        image: ImageSource,
        queries: Sequence[str],
        threshold: float = 0.0,
        *,
        keep_logits: bool = False,
    ) -> list[SegmentationResult]:
        """Several queries on one image as one batched (left-padded) generation.

        Every result carries the batch's timings.
        """
        start = time.perf_counter()
        if isinstance(queries, str) or not queries:
            raise InputError("pass a non-empty list of queries")
        questions = [self._check_query(q) for q in queries]
        threshold = _check_threshold(threshold)
        pixels = load_image(image)
        with torch.inference_mode():
            t0 = time.perf_counter()
            encoding, cache_hit = self._encode_image(pixels)
            t1 = time.perf_counter()
            answers = self._generate(encoding, questions)
            t2 = time.perf_counter()
            masks = self._decode_masks(encoding, answers, threshold, keep_logits)
            t3 = time.perf_counter()
        timings = {
            "image_encoding": t1 - t0,
            "generation": t2 - t1,
            "mask_decoding": t3 - t2,
            "total": t3 - start,
        }
        return [
            SegmentationResult(
                answer=answer.text,
                masks=answer_masks,
                timings=dict(timings),
                cache_hit=cache_hit,
                message=self._message(answer, answer_masks, threshold),
                token_ids=answer.tokens,
            )
            for answer, answer_masks in zip(answers, masks, strict=True)
        ]

    def _check_query(self, query: str) -> str:
        text = check_query(query)
        for token in self._reserved:
            if token in text:
                raise InputError(f"the query must not contain {token!r}; remove it")
        return text

    # Stages ---------------------------------------------------------------------------
    @property
    def _llava(self):
        """The transformers LLaVA (peft's LoRA layers live inside it, in place)."""
        return self.loaded.model.base_llava

    def _cache_key(self, pixels: np.ndarray) -> str:
        """Image content hash + the identity of the model that encodes it."""
        loaded = self.loaded
        model_identity = f"{id(loaded.model)}:{loaded.device}:{loaded.config.precision}"
        return f"{model_identity}:{image_key(pixels)}"

    def _encode_image(self, pixels: np.ndarray) -> tuple[_ImageEncoding, bool]:
        key = self._cache_key(pixels)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key], True
        loaded = self.loaded
        encoded = encode_image(pixels, loaded.processor, loaded.sam_processor)
        sam_pixels = encoded.sam_pixel_values[None].to(loaded.device)
        sam_embeddings = loaded.model.encode_images(sam_pixels)
        llava = self._llava
        vision_dtype = next(llava.model.vision_tower.parameters()).dtype
        clip_pixels = encoded.pixel_values[None].to(loaded.device, vision_dtype)
        features = llava.get_image_features(pixel_values=clip_pixels, return_dict=True)
        encoding = _ImageEncoding(
            sam_embeddings=sam_embeddings,
            image_features=features.pooler_output[0],
            input_size=encoded.input_size,
            original_size=encoded.original_size,
        )
        if self.cache_size > 0:
            self._cache[key] = encoding
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return encoding, False

    def _prompt_ids(self, questions: list[str]) -> list[list[int]]:
        tokenizer = self.loaded.tokenizer
        n_image, fmt = self._n_image_tokens, self._format
        ids = [encode_text(tokenizer, q, None, n_image, fmt)[0] for q in questions]
        limit = self._llava.config.text_config.max_position_embeddings
        for question, prompt in zip(questions, ids, strict=True):
            if len(prompt) + self.max_new_tokens > limit:
                raise InputError(
                    f"the query {question[:40]!r}... is too long for this model "
                    f"({len(prompt)} prompt tokens + {self.max_new_tokens} for the answer > "
                    f"{limit}); shorten it"
                )
        return ids

    def _prompt_prefix(self, encoding: _ImageEncoding, prompt: list[int]) -> _PromptPrefix:
        """The image's cached prefix, or a new one (stored with the image's encoding)."""
        image_id = self._llava.config.image_token_id
        ids = tuple(prompt[: max(i for i, t in enumerate(prompt) if t == image_id) + 1])
        if encoding.prefix is not None and encoding.prefix.ids == ids:
            return encoding.prefix
        llava = self._llava
        cache = DynamicCache(config=llava.config)
        features = BaseModelOutputWithPooling(pooler_output=[encoding.image_features])
        llava.model(
            input_ids=torch.tensor([ids], device=self.loaded.device),
            mm_encoder_outputs={"image": features},
            cache=cache,
            use_cache=True,
        )
        prefix = _PromptPrefix(ids=ids, cache=cache)
        if self.prefix_cache_size > 0:
            encoding.prefix = prefix
            self._bound_prefix_caches()
        return prefix

    def _bound_prefix_caches(self) -> None:
        """Keep prefix KV caches only on the prefix_cache_size most recently used images."""
        kept = 0
        for entry in reversed(self._cache.values()):
            if entry.prefix is not None:
                kept += 1
                if kept > self.prefix_cache_size:
                    entry.prefix = None

    def _generate(self, encoding: _ImageEncoding, questions: list[str]) -> list[_Answer]:
        """Greedy answers: the prompts are prefilled (from the image's prefix KV cache when
        the image comes first), then decoded greedily."""
        tokenizer = self.loaded.tokenizer
        prompts = self._prompt_ids(questions)
        if self._image_first:
            input_ids, attention_mask, cache, cached = self._prefill_prefix(encoding, prompts)
        else:
            input_ids, attention_mask, cache, cached = self._prefill_prompt(encoding, prompts)
        eos_id = tokenizer.eos_token_id
        generated, states = self._greedy(input_ids, attention_mask, cache, cached, eos_id)
        answers = []
        for row, row_states in zip(generated.tolist(), states, strict=True):
            end = row.index(eos_id) if eos_id in row else len(row)
            tokens = row[:end]
            is_seg = torch.tensor([t == self.loaded.seg_token_id for t in tokens], dtype=torch.bool)
            answers.append(
                _Answer(
                    text=tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                    seg_states=row_states[:end][is_seg.to(row_states.device)],
                    truncated=eos_id not in row,
                    tokens=tokens,
                )
            )
        return answers

    def _prefill_prefix(
        self, encoding: _ImageEncoding, prompts: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, DynamicCache, int]:
        """Image first: the rows, their mask, a copy of the image's prefix KV cache and its
        length (the question and " ASSISTANT:" are left to the greedy loop).

        A batch shares the prefix, so rows are laid out as [prefix | padding | question]: the
        padding sits between the two (masked out; position ids come from the attention mask,
        so every row's positions run on as in a single query) instead of on the left.
        """
        tokenizer = self.loaded.tokenizer
        prefix = self._prompt_prefix(encoding, prompts[0])
        n, width = len(prompts), len(prefix.ids)
        if any(tuple(p[:width]) != prefix.ids for p in prompts):
            raise RuntimeError("prompts about one image must share the image prefix")
        rest = collate_text([p[width:] for p in prompts], None, _pad_id(tokenizer), left=True)
        device = self.loaded.device
        head = torch.tensor([prefix.ids], device=device).expand(n, -1)
        input_ids = torch.cat([head, rest["input_ids"].to(device)], dim=1)
        attention_mask = torch.cat(
            [torch.ones_like(head), rest["attention_mask"].to(device)], dim=1
        )
        cache = copy.deepcopy(prefix.cache)
        if n > 1:
            cache.batch_repeat_interleave(n)
        return input_ids, attention_mask, cache, width

    def _prefill_prompt(
        self, encoding: _ImageEncoding, prompts: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, DynamicCache, int]:
        """Question first: the left-padded rows, their mask, and the KV cache of all of each
        row but its last token (a text token of " ASSISTANT:", left to the greedy loop), with
        the image's cached features in place of its image tokens."""
        llava, device = self._llava, self.loaded.device
        batch = collate_text(prompts, None, _pad_id(self.loaded.tokenizer), left=True)
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        padded = not bool(attention_mask.all())  # as in _greedy: no mask for unpadded rows
        features = BaseModelOutputWithPooling(
            pooler_output=[encoding.image_features] * len(prompts)
        )
        cache = DynamicCache(config=llava.config)
        llava.model(
            input_ids=input_ids[:, :-1],
            attention_mask=attention_mask[:, :-1] if padded else None,
            position_ids=positions[:, :-1],
            mm_encoder_outputs={"image": features},
            cache=cache,
            use_cache=True,
        )
        return input_ids, attention_mask, cache, input_ids.shape[1] - 1

    def _greedy(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: DynamicCache,
        cached: int,
        eos_id: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding with the KV cache: one forward pass per new token.

        The loop `generate` runs, without its per-call set-up (a fixed cost that is a large
        share of a short answer on a small model). `cached` leading positions are already in
        `cache`; positions follow the attention mask, as `generate` computes them.
        Returns the new tokens [n, T] (pad after EOS) and, for each, the last-layer post-norm
        state that predicted it [n, T, H].
        """
        llava = self._llava
        # After the prefix, a step holds only text tokens: the language model and the LM head
        # are called directly (what LLaVA's forward does when there are no pixel values),
        # which saves the wrapper's per-step overhead.
        embed, language_model = llava.get_input_embeddings(), llava.model.language_model
        processor = self.logits_processor
        pad_id = _pad_id(self.loaded.tokenizer)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        step_ids, step_positions = input_ids[:, cached:], positions[:, cached:]
        sequence, mask = input_ids, attention_mask
        # One unpadded row needs no mask: the causal mask alone is exact, and cheaper to build.
        padded = not bool(attention_mask.all())
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tokens, states = [], []
        for _ in range(self.max_new_tokens):
            out = language_model(
                inputs_embeds=embed(step_ids),
                attention_mask=mask if padded else None,
                position_ids=step_positions,
                cache=cache,
                use_cache=True,
            )
            state = out.last_hidden_state[:, -1]  # after the final norm
            scores = llava.lm_head(state).float()
            if self._suppress:
                scores[:, self._suppress] = float("-inf")
            if processor is not None:
                scores = processor(sequence, scores)
            chosen = scores.argmax(dim=-1)
            chosen = torch.where(finished, torch.full_like(chosen, pad_id), chosen)
            tokens.append(chosen)
            states.append(state)
            finished |= chosen == eos_id
            if bool(finished.all()):
                break
            step_ids = chosen[:, None]
            step_positions = step_positions[:, -1:] + 1
            sequence = torch.cat([sequence, step_ids], dim=1)
            if padded:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        return torch.stack(tokens, dim=1), torch.stack(states, dim=1)

    def _decode_masks(
        self,
        encoding: _ImageEncoding,
        answers: list[_Answer],
        threshold: float,
        keep_logits: bool,
    ) -> list[list[MaskResult]]:
        model = self.loaded.model
        n = len(answers)
        prompts = [model.project(answer.seg_states) for answer in answers]
        logits, scores = model.decode_masks(
            prompts,
            encoding.sam_embeddings.expand(n, -1, -1, -1),
            [encoding.input_size] * n,
            [encoding.original_size] * n,
        )
        results = []
        for answer_logits, answer_scores in zip(logits, scores, strict=True):
            array = answer_logits.float().cpu().numpy()
            results.append(
                [
                    _mask_result(array[i], float(answer_scores[i]), threshold, keep_logits)
                    for i in range(array.shape[0])
                ]
            )
        return results

    def _message(self, answer: _Answer, masks: list[MaskResult], threshold: float) -> str | None:
        """What went wrong, for people: masks are numbered from 1, the threshold is given as
        the probability users set."""
        notes = []
        if not masks:
            notes.append(NO_SEG_MESSAGE)
        empty = [str(i + 1) for i, m in enumerate(masks) if not m.mask.any()]
        if len(masks) > MANY_MASKS:
            some = f"; {len(empty)} of its masks are empty" if empty else ""
            notes.append(
                f"The answer has {len(masks)} {SEG_TOKEN} tokens, far more than it names "
                f"objects: the model's output went wrong (a lower threshold will not help){some}."
            )
        elif empty:
            notes.append(
                f"Mask {', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty: no pixel "
                f"has a mask probability above {logit_to_probability(threshold):.2f}; try a "
                "lower threshold."
            )
        if answer.truncated:
            notes.append(f"The answer was cut off at {self.max_new_tokens} new tokens.")
        return " ".join(notes) or None


def logit_to_probability(logit: float) -> float:
    """The mask probability of a logit threshold (0 -> 0.5)."""
    return 0.5 * (1.0 + math.tanh(0.5 * logit))  # sigmoid without overflow


def probability_to_logit(probability: float) -> float:
    """The logit threshold of a mask probability (0.5 -> 0.0); clipped to [1e-12, 1 - 1e-12],
    so that the logit stays finite."""
    p = min(max(float(probability), 1e-12), 1.0 - 1e-12)
    return math.log(p / (1.0 - p))


def _pad_id(tokenizer) -> int:
    pad_id = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad_id is None else pad_id


def _check_threshold(threshold: float) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError) as err:
        raise InputError(f"the threshold must be a number, got {threshold!r}") from err
    if not math.isfinite(value):
        raise InputError(f"the threshold must be a finite number, got {threshold!r}")
    return value


def _mask_result(logits: np.ndarray, score: float, threshold: float, keep: bool) -> MaskResult:
    mask = logits > threshold
    return MaskResult(
        mask=mask,
        score=score,
        area_fraction=float(mask.mean()),
        logits=logits.astype(np.float32, copy=False) if keep else None,
    )
