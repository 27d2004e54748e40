"""Turning images, questions and answers into model inputs.

The prompt comes from the model's own chat template (the processor's): llava-1.5's puts the
image before the question ("USER: <image>\n{question} ASSISTANT:"); the bundled tiny model's
puts the question first, so the image tokens can attend to it. A processor without a template
gets llava-1.5's format. The `<image>` placeholder is expanded to one token per vision feature
with the processor's own count, so `[SEG]` positions line up with `input_ids` exactly as with
the real processor.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from lisa_demo.config import IMAGE_TOKEN

IGNORE_LABEL = -100


# The question's place in a prompt template (a marker no question contains).
QUESTION_MARK = "\x00question\x00"
# llava-1.5's single-turn prompt; the answer follows after a space.
LLAVA_PROMPT = f"USER: {IMAGE_TOKEN}\n{QUESTION_MARK} ASSISTANT:"


# LISA's prompt (the llava_v1 conversation of every published LISA model): the image, wrapped
# in <im_start> / <im_end>, comes first, then a newline and the question.
LISA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)
LISA_IM_START, LISA_IM_END = "<im_start>", "<im_end>"
LISA_PROMPT = (
    f"{LISA_SYSTEM} USER: {LISA_IM_START}{IMAGE_TOKEN}{LISA_IM_END}\n{QUESTION_MARK} ASSISTANT:"
)
# The prompt formats a full model's manifest may name ("prompt_format").
PROMPT_FORMATS = ("question-first", "llava-1.5", "llava_v1")


@dataclass(frozen=True)
class PromptFormat:
    """How a model's prompts are written and tokenized.

    template: the single-turn prompt, IMAGE_TOKEN and QUESTION_MARK marking the image and the
        question; the answer follows after a space.
    piecewise: LISA's tokenization (its slow LLaMA tokenizer of transformers 4.31): the text is
        split around every added token, whitespace next to an added token is dropped, and each
        piece is encoded on its own (so each gets its own leading "\u2581").
    image_token: the token the image placeholder expands into (LISA-7B: "<im_patch>").
    """

    name: str
    template: str
    piecewise: bool = False
    image_token: str = IMAGE_TOKEN

    @property
    def image_first(self) -> bool:
        return image_first(self.template)


def prompt_format(processor, name: str | None = None) -> PromptFormat:
    """The prompt format `name` (a manifest's "prompt_format"), or, when None, the one the
    processor's chat template gives (llava-1.5's when it has none)."""
    if name == "llava_v1":
        image_token = getattr(processor, "image_token", None) or IMAGE_TOKEN
        return PromptFormat(name, LISA_PROMPT, piecewise=True, image_token=image_token)
    if name is not None and name not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {name!r}; known: {', '.join(PROMPT_FORMATS)}")
    template = prompt_template(processor)
    found = "llava-1.5" if image_first(template) else "question-first"
    if name is not None and name != found:
        raise ValueError(
            f"the model's manifest says prompt format {name!r}, but its processor's chat "
            f"template gives {found!r}: the folder is inconsistent"
        )
    return PromptFormat(found, template)


def prompt_template(processor) -> str:
    """The model's single-turn prompt with `QUESTION_MARK` where the question goes, rendered
    from the processor's chat template (llava-1.5's format when it has none)."""
    if not getattr(processor, "chat_template", None):
        return LLAVA_PROMPT
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION_MARK}]}
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    if text.count(QUESTION_MARK) != 1 or text.count(IMAGE_TOKEN) != 1:
        raise ValueError(
            f"the processor's chat template must place one image and one question, got {text!r}"
        )
    return text


def image_first(template: str) -> bool:
    """Whether the image comes before the question (then the image's tokens, and so the
    prompt's start up to them, do not depend on the question)."""
    return template.index(IMAGE_TOKEN) < template.index(QUESTION_MARK)


def chat_prompt(question: str, template: str = LLAVA_PROMPT) -> str:
    """The single-turn prompt for `question`; the answer follows after a space."""
    return template.replace(QUESTION_MARK, question.strip())


def image_key(image: np.ndarray) -> str:
    """Content hash of an HxWx3 uint8 image (cache key)."""
    digest = hashlib.sha1(np.ascontiguousarray(image).tobytes())
    digest.update(str(image.shape).encode())
    return digest.hexdigest()


@dataclass
class EncodedImage:
    """One image, preprocessed for both encoders."""

    key: str  # content hash
    pixel_values: torch.Tensor  # [3, h, w] float, CLIP-normalised (what LLaVA sees)
    sam_pixel_values: torch.Tensor  # [3, S, S] float, SAM-normalised, zero-padded
    input_size: tuple[int, int]  # (h, w) of the resized image inside the SAM square
    original_size: tuple[int, int]  # (H, W)


def encode_image(image: np.ndarray, processor, sam_processor) -> EncodedImage:
    """image: HxWx3 uint8 RGB."""
    pil = Image.fromarray(image)
    clip = processor.image_processor(pil, return_tensors="pt")
    sam = sam_processor.image_processor(pil, return_tensors="pt")
    resized = sam["reshaped_input_sizes"][0].tolist()
    return EncodedImage(
        key=image_key(image),
        pixel_values=clip["pixel_values"][0],
        sam_pixel_values=sam["pixel_values"][0],
        input_size=(int(resized[0]), int(resized[1])),
        original_size=(int(image.shape[0]), int(image.shape[1])),
    )


def image_token_count(processor) -> int:
    """How many tokens the processor expands `<image>` into (576 for llava-1.5)."""
    size = processor.image_processor.crop_size or processor.image_processor.size
    data = processor._get_num_multimodal_tokens(image_sizes=[(size["height"], size["width"])])
    return int(data["num_image_tokens"][0])


def added_token_strings(tokenizer) -> list[str]:
    """The tokenizer's added tokens that are not special ([SEG], <im_start>, ...)."""
    special = set(tokenizer.all_special_tokens)
    decoder = tokenizer.added_tokens_decoder
    return [t.content for t in decoder.values() if t.content not in special and not t.special]


def lisa_tokenize(tokenizer, text: str, added: Sequence[str], bos: bool) -> list[int]:
    """Ids of `text` by LISA's rule: split around the `added` tokens (longest first), strip the
    whitespace on both sides of each, encode every remaining non-empty piece on its own."""
    ids = [tokenizer.bos_token_id] if bos else []
    if not added:
        return ids + (tokenizer(text, add_special_tokens=False).input_ids if text else [])
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    parts = re.split(pattern, text)  # odd positions hold the added tokens
    for i in range(1, len(parts), 2):
        parts[i - 1] = parts[i - 1].rstrip()
        parts[i + 1] = parts[i + 1].lstrip()
    for i, part in enumerate(parts):
        if i % 2:
            ids.append(tokenizer.convert_tokens_to_ids(part))
        elif part:
            ids.extend(tokenizer(part, add_special_tokens=False).input_ids)
    return ids


def lisa_prompt_ids(tokenizer, prompt: str, image_token: str, n_image_tokens: int) -> list[int]:
    """LISA's prompt ids: the text on each side of the image placeholder is tokenized by
    `lisa_tokenize` (BOS before the first part only) and the placeholder becomes
    `n_image_tokens` copies of `image_token`'s id."""
    added = added_token_strings(tokenizer)
    chunks = prompt.split(IMAGE_TOKEN)
    image_ids = [tokenizer.convert_tokens_to_ids(image_token)] * n_image_tokens
    ids = lisa_tokenize(tokenizer, chunks[0], added, bos=True)
    for chunk in chunks[1:]:
        ids += image_ids + lisa_tokenize(tokenizer, chunk, added, bos=False)
    return ids


def encode_text(
    tokenizer,
    question: str,
    answer: str | None,
    n_image_tokens: int,
    template: str | PromptFormat = LLAVA_PROMPT,
) -> tuple[list[int], list[int]]:
    """Token ids of prompt (+ answer and EOS) and labels that score the answer tokens only.
    `template`: the model's prompt format (`prompt_format(processor, name)`) or template."""
    fmt = template if isinstance(template, PromptFormat) else None
    text = chat_prompt(question, fmt.template if fmt else template)
    if fmt is not None and fmt.piecewise:
        prompt_ids = lisa_prompt_ids(tokenizer, text, fmt.image_token, n_image_tokens)
    else:
        prompt_ids = tokenizer(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * n_image_tokens)).input_ids
    if answer is None:
        return prompt_ids, [IGNORE_LABEL] * len(prompt_ids)
    if fmt is not None and fmt.piecewise:
        added = added_token_strings(tokenizer)
        answer_ids = lisa_tokenize(tokenizer, answer.strip(), added, bos=False)
    else:
        answer_ids = tokenizer(" " + answer.strip(), add_special_tokens=False).input_ids
    answer_ids = answer_ids + [tokenizer.eos_token_id]
    labels = [IGNORE_LABEL] * len(prompt_ids) + answer_ids
    return prompt_ids + answer_ids, labels


def pad_sequences(
    sequences: Sequence[Sequence[int]], value: int, left: bool = False
) -> torch.Tensor:
    """[B, L] long tensor; `left=True` pads on the left (batched generation)."""
    length = max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if left:
            out[i, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        else:
            out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def collate_text(
    ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]] | None,
    pad_id: int,
    left: bool = False,
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and (if given) labels, padded to one length."""
    batch = {
        "input_ids": pad_sequences(ids, pad_id, left),
        "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, left),
    }
    if labels is not None:
        batch["labels"] = pad_sequences(labels, IGNORE_LABEL, left)
    return batch
