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


def encode_text(
    tokenizer,
    question: str,
    answer: str | None,
    n_image_tokens: int,
    template: str = LLAVA_PROMPT,
) -> tuple[list[int], list[int]]:
    """Token ids of prompt (+ answer and EOS) and labels that score the answer tokens only.
    `template`: the model's prompt (`prompt_template(processor)`)."""
    prompt = chat_prompt(question, template).replace(IMAGE_TOKEN, IMAGE_TOKEN * n_image_tokens)
    prompt_ids = tokenizer(prompt).input_ids
    if answer is None:
        return prompt_ids, [IGNORE_LABEL] * len(prompt_ids)
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
