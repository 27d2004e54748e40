"""The app serving and fine-tuning a full-model folder: a converted tiny random LISA placed in a
temporary models folder (LISA_MODELS_DIR), through gradio_client, on the real pipeline.

The boosted tiny LISA answers [SEG] at every step, so the app's pipelines here stop after
MAX_NEW_TOKENS tokens (the default 48 masks would take half a minute to decode on a CPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

from lisa_demo.config import full_model_config
from lisa_demo.infer.pipeline import LisaPipeline
from lisa_demo.ui import AppSettings, build_app
from lisa_demo.ui.models import (
    TINY_MODEL_NOTE,
    ModelSpec,
    checkpoint_key,
    find_checkpoint_specs,
)
from lisa_demo.ui.runs import TRAINING
from tests.ui.conftest import (
    TINY_LISA_NAME,
    LaunchedApp,
    launch,
    red_square_image,
    wait_for_no_run,
    write_examples,
)
from tests.ui.test_real_backends import assert_segment_shapes

OVERLAY, ANSWER, DETAILS, TABLE, FILES = range(5)
PROGRESS = 1
MAX_NEW_TOKENS = 2
TINY_LISA_KEY = f"model:{TINY_LISA_NAME}"
TINY_LISA_LABEL = f"{TINY_LISA_NAME} (LISA, llava_v1)"


def short_answers(spec: ModelSpec) -> LisaPipeline:
    """load_pipeline with a shorter answer."""
    return LisaPipeline.from_config(
        spec.model_config(), checkpoint=spec.checkpoint, max_new_tokens=MAX_NEW_TOKENS
    )


@pytest.fixture(scope="module")
def lisa_app(tmp_path_factory, converted_models_dir: Path) -> Iterator[LaunchedApp]:
    root = tmp_path_factory.mktemp("lisa-app")
    examples = write_examples(root / "examples")
    settings = AppSettings(
        runs_dir=root / "runs", examples_dir=examples, models_dir=converted_models_dir
    )
    demo = build_app(settings, loader=short_answers)
    url = launch(demo)
    client = Client(url, download_files=False, verbose=False)
    yield LaunchedApp(client, url, settings, None, examples)
    wait_for_no_run()
    demo.close()


def _dropdown_choices(client: Client, label: str) -> list[list[str]]:
    [component] = [
        c for c in client.config["components"] if c.get("props", {}).get("label") == label
    ]
    return component["props"]["choices"]


def assert_masks_have_the_image_size(out: tuple, shape: tuple[int, int]) -> None:
    """One PNG per [SEG] of the answer (at least one), each at the image's size."""
    assert len(out[FILES] or []) == out[ANSWER].count("[SEG]") >= 1, out[ANSWER]
    for file in out[FILES]:
        assert np.asarray(Image.open(file["path"])).shape == shape


def test_the_converted_lisa_is_listed_and_segments_through_the_api(lisa_app: LaunchedApp):
    for label in ("Model", "Model to fine-tune"):
        assert [TINY_LISA_LABEL, TINY_LISA_KEY] in _dropdown_choices(lisa_app.client, label)
    out = lisa_app.segment_example(model=TINY_LISA_KEY)
    # Random weights answer nonsense; the call succeeds with the pipeline's whole output.
    assert_segment_shapes(out)
    assert_masks_have_the_image_size(out, red_square_image().shape[:2])
    again = lisa_app.segment_example(model=TINY_LISA_KEY, query="And the blue one?")
    assert "Image embeddings from cache: yes" in again[DETAILS]


def _note(demo):
    [note] = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "model-note"]
    [handler] = [f for f in demo.fns.values() if note in f.outputs and f.inputs]
    return note, handler.fn


def test_the_tiny_model_note_shows_for_the_bundled_model_only(
    tmp_path: Path, converted_models_dir: Path
) -> None:
    settings = AppSettings(runs_dir=tmp_path / "runs", models_dir=converted_models_dir)
    note, on_change = _note(build_app(settings))
    assert note.visible and note.value == TINY_MODEL_NOTE  # the bundled model is the default
    hidden = on_change(TINY_LISA_KEY)
    assert hidden.visible is False and hidden.value == ""
    shown = on_change("preset:tiny")
    assert shown.visible is True and shown.value == TINY_MODEL_NOTE
    # Started with --model on the converted LISA: that is the default, and no note.
    folder = converted_models_dir / TINY_LISA_NAME
    configured = AppSettings(runs_dir=tmp_path / "runs", models_dir=tmp_path, model=str(folder))
    note, _ = _note(build_app(configured))
    assert not note.visible


@pytest.mark.slow
def test_a_fine_tune_of_the_converted_lisa_reloads_on_it(lisa_app: LaunchedApp, no_run_after):
    job = lisa_app.client.submit(
        preset=TINY_LISA_KEY,
        synthetic_scenes=4,
        max_steps=1,
        batch_size=1,
        max_val_samples=1,
        api_name="/train",
    )
    final = job.result(timeout=300)
    state = TRAINING.snapshot()
    assert "**finished**" in final[PROGRESS], state.log_text()
    folder = lisa_app.settings.models_dir / TINY_LISA_NAME
    assert f"--model {folder}" in state.log_text()
    # The run's start event recorded the converted base; its checkpoint loads on it.
    key = checkpoint_key(lisa_app.settings.runs_dir, state.best_checkpoint())
    [spec] = [s for s in find_checkpoint_specs(lisa_app.settings.runs_dir, "tiny") if s.key == key]
    base = full_model_config(folder)
    cfg = spec.model_config()
    assert (cfg.llava, cfg.sam, cfg.heads) == (base.llava, base.sam, base.heads)
    assert cfg.prompt_format == "llava_v1" and cfg.use_lora
    out = lisa_app.segment_example(model=key)
    assert_segment_shapes(out)
    assert_masks_have_the_image_size(out, red_square_image().shape[:2])
