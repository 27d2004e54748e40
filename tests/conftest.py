"""Shared test setup: offline, one tiny random LISA per pytest run, and small helpers.

The tiny-random model is built once per pytest run into a temporary LISA_CACHE_DIR (unless the
caller set one, e.g. to reuse a build between runs).
"""

from __future__ import annotations

import os
from collections.abc import Callable

# Before anything imports huggingface_hub or gradio (both read these at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _test_environment(tmp_path_factory):
    """A cache folder for the tiny models, shared by the whole pytest run; one CPU thread
    unless told otherwise (the test machines share two cores, and oversubscribed threads are
    many times slower)."""
    with pytest.MonkeyPatch.context() as patch:
        if "LISA_CACHE_DIR" not in os.environ:
            patch.setenv("LISA_CACHE_DIR", str(tmp_path_factory.mktemp("lisa-cache")))
        if "OMP_NUM_THREADS" not in os.environ:
            patch.setenv("OMP_NUM_THREADS", "1")  # for subprocesses
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            yield
            torch.set_num_threads(threads)
        else:
            yield


@pytest.fixture(scope="session")
def tiny_loaded():
    """The tiny random LISA for inference (fp32, no LoRA). Tests must not change its weights."""
    from lisa_demo.config import preset
    from lisa_demo.loading import load_lisa

    return load_lisa(preset("tiny-random"), device="cpu")


@pytest.fixture(scope="session")
def image_first_loaded(tiny_loaded):
    """The same model and weights with llava-1.5's prompt, the image before the question (the
    tiny models put the question first); the pipeline then caches the prompt's prefix."""
    import copy
    import dataclasses

    from lisa_demo.tiny import CHAT_TEMPLATE

    processor = copy.copy(tiny_loaded.processor)
    processor.chat_template = CHAT_TEMPLATE
    return dataclasses.replace(tiny_loaded, processor=processor)


def draw_scene() -> np.ndarray:
    """A 48x64 RGB uint8 image: a red square and a blue disc on gray."""
    image = np.full((48, 64, 3), 128, dtype=np.uint8)
    image[8:24, 6:22] = (220, 30, 30)
    yy, xx = np.mgrid[:48, :64]
    image[(yy - 30) ** 2 + (xx - 44) ** 2 < 100] = (30, 60, 220)
    return image


@pytest.fixture
def scene_image() -> np.ndarray:
    """A fresh copy of the test scene (see draw_scene)."""
    return draw_scene()


class ScriptedAnswers:
    """A logits processor that makes greedy generation write fixed token ids, then EOS.

    Row b of the batch follows scripts[b % len(scripts)]. Only the choice of token is forced:
    the forward passes, and so the hidden states, are the model's own.
    """

    def __init__(self, scripts: list[list[int]], eos_id: int) -> None:
        self.scripts = scripts
        self.eos_id = eos_id
        self.start: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, float("-inf"))
        for row in range(scores.shape[0]):
            script = self.scripts[row % len(self.scripts)]
            forced[row, script[step] if step < len(script) else self.eos_id] = 0.0
        return forced


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of an answer as the model would generate it (without EOS)."""
    return tokenizer(" " + answer, add_special_tokens=False).input_ids


@pytest.fixture
def force_answer(monkeypatch) -> Callable:
    """force_answer(loaded, *answers): the next generations of `loaded` write these answers."""
    from transformers import LogitsProcessorList

    from lisa_demo.infer.pipeline import LisaPipeline

    forced: dict[int, tuple[list[list[int]], int]] = {}  # id(llava) -> (scripts, eos id)
    original_greedy = LisaPipeline._greedy

    def greedy(self, *args, **kwargs):
        """The pipeline's own decoding loop, with the scripted answers when forced."""
        if id(self._llava) not in forced:
            return original_greedy(self, *args, **kwargs)
        scripts, eos_id = forced[id(self._llava)]
        processor = ScriptedAnswers(scripts, eos_id)
        kept = self.logits_processor
        self.logits_processor = LogitsProcessorList([processor])
        try:
            return original_greedy(self, *args, **kwargs)
        finally:
            self.logits_processor = kept

    monkeypatch.setattr(LisaPipeline, "_greedy", greedy)

    def install(loaded, *answers: str) -> None:
        tokenizer = loaded.tokenizer
        llava = loaded.model.llava
        llava = llava.get_base_model() if hasattr(llava, "get_base_model") else llava
        original = type(llava).generate.__get__(llava)  # unpatched, even when forced twice
        scripts = [answer_ids(tokenizer, a) + [tokenizer.eos_token_id] for a in answers]
        forced[id(llava)] = (scripts, tokenizer.eos_token_id)

        def generate(*args, **kwargs):  # other callers (validation's [SEG] rate) use generate
            processor = ScriptedAnswers(scripts, tokenizer.eos_token_id)
            return original(*args, logits_processor=LogitsProcessorList([processor]), **kwargs)

        monkeypatch.setattr(llava, "generate", generate)

    return install


@pytest.fixture(scope="session")
def make_inputs() -> Callable:
    """make_inputs(loaded, image, question, answer): a teacher-forced batch of one for
    LisaModel.forward (labels score the answer)."""
    from lisa_demo.inputs import (
        collate_text,
        encode_image,
        encode_text,
        image_token_count,
        prompt_template,
    )

    def build(loaded, image: np.ndarray, question: str, answer: str) -> dict:
        encoded = encode_image(image, loaded.processor, loaded.sam_processor)
        n_image, template = image_token_count(loaded.processor), prompt_template(loaded.processor)
        ids, labels = encode_text(loaded.tokenizer, question, answer, n_image, template)
        batch = collate_text([ids], [labels], loaded.tokenizer.pad_token_id)
        device = loaded.device
        return {
            **{name: tensor.to(device) for name, tensor in batch.items()},
            "pixel_values": encoded.pixel_values[None].to(device),
            "sam_pixel_values": encoded.sam_pixel_values[None].to(device),
            "input_sizes": [encoded.input_size],
            "original_sizes": [encoded.original_size],
        }

    return build
