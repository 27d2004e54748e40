"""The prompt comes from the model's chat template: llava-1.5's (image first) or the tiny
models' (question first)."""

from __future__ import annotations

import copy

import pytest

from lisa_demo.config import IMAGE_TOKEN
from lisa_demo.inputs import (
    LLAVA_PROMPT,
    chat_prompt,
    encode_text,
    image_first,
    prompt_template,
)
from lisa_demo.tiny import CHAT_TEMPLATE, build_processors, build_tokenizer


@pytest.fixture(scope="module")
def processor():
    return build_processors(build_tokenizer())[0]


def _with_template(processor, template):
    other = copy.copy(processor)
    other.chat_template = template
    return other


def test_llava_template_renders_the_llava_1_5_prompt(processor):
    template = prompt_template(_with_template(processor, CHAT_TEMPLATE))
    assert template == LLAVA_PROMPT
    assert image_first(template)
    assert chat_prompt("  Where is the red circle? ", template) == (
        f"USER: {IMAGE_TOKEN}\nWhere is the red circle? ASSISTANT:"
    )


def test_tiny_models_put_the_question_first(processor):
    template = prompt_template(processor)
    assert not image_first(template)
    assert chat_prompt("Where is the red circle?", template) == (
        f"USER: Where is the red circle?\n{IMAGE_TOKEN} ASSISTANT:"
    )


def test_no_template_means_llava_1_5(processor):
    assert prompt_template(_with_template(processor, None)) == LLAVA_PROMPT


def test_template_without_an_image_is_refused(processor):
    text_only = (
        "{% for m in messages %}{% for c in m['content'] %}{{ c.get('text', '') }}"
        "{% endfor %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="one image and one question"):
        prompt_template(_with_template(processor, text_only))


def test_encode_text_labels_only_the_answer_in_either_order(processor):
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for template in (LLAVA_PROMPT, prompt_template(processor)):
        ids, labels = encode_text(tokenizer, "the red circle", "Sure.", 3, template)
        prompt_ids = encode_text(tokenizer, "the red circle", None, 3, template)[0]
        assert ids[: len(prompt_ids)] == prompt_ids
        assert ids.count(image_id) == 3
        answer = ids[len(prompt_ids) :]
        assert answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer[:-1]).strip() == "Sure."
        assert labels == [-100] * len(prompt_ids) + answer
    # the question's words come before the image tokens only in the tiny models' order
    first = encode_text(tokenizer, "the red", None, 3, prompt_template(processor))[0]
    red = tokenizer.convert_tokens_to_ids("\u2581red")
    assert first.index(red) < first.index(image_id)
    llava = encode_text(tokenizer, "the red", None, 3, LLAVA_PROMPT)[0]
    assert llava.index(red) > llava.index(image_id)
