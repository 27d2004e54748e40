"""The app on the real tiny-random pipeline and the real trainer (no fakes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio_client import Client

from lisa_demo.config import PROJECT_ROOT
from lisa_demo.ui import AppSettings, build_app
from lisa_demo.ui.models import checkpoint_key
from lisa_demo.ui.runs import TRAINING
from tests.ui.conftest import LaunchedApp, launch, wait_for_no_run, write_examples

TRAINER_MAIN = PROJECT_ROOT / "lisa_demo" / "train" / "__main__.py"
OVERLAY, ANSWER, DETAILS, TABLE, FILES = range(5)
PROGRESS, CHECKPOINTS = 1, 4


@pytest.fixture(scope="module")
def real_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaunchedApp]:
    root = tmp_path_factory.mktemp("real-app")
    examples = write_examples(root / "examples")
    settings = AppSettings(preset="tiny-random", runs_dir=root / "runs", examples_dir=examples)
    demo = build_app(settings)
    url = launch(demo)
    client = Client(url, download_files=False, verbose=False)
    yield LaunchedApp(client, url, settings, None, examples)
    wait_for_no_run()
    demo.close()


def assert_segment_shapes(out: tuple) -> None:
    assert isinstance(out[ANSWER], str)
    assert out[OVERLAY]["image"]["path"]
    headers = out[TABLE]["headers"]
    assert headers == ["mask", "confidence (SAM IoU)", "area %", "true IoU", "Dice"]
    n_masks = len(out[OVERLAY]["annotations"])
    assert len(out[FILES] or []) == n_masks
    if n_masks == 0:
        assert "found nothing to segment" in out[DETAILS]
    assert "Timings: image encoding" in out[DETAILS]


def test_tiny_random_pipeline_segments_through_the_app(real_app: LaunchedApp) -> None:
    assert_segment_shapes(real_app.segment_example(model="configured"))


@pytest.mark.slow
@pytest.mark.xfail(not TRAINER_MAIN.exists(), reason="trainer not merged yet")
def test_real_trainer_run_then_its_checkpoint_segments(real_app: LaunchedApp, no_run_after) -> None:
    job = real_app.client.submit(
        preset="tiny-random",
        synthetic_scenes=8,
        max_steps=3,
        batch_size=1,
        max_val_samples=2,
        api_name="/train",
    )
    final = job.result(timeout=300)
    state = TRAINING.snapshot()
    assert "**finished**" in final[PROGRESS], state.log_text()
    assert {Path(f["path"]).name for f in final[CHECKPOINTS]} == {
        f"{state.run_id}-best.zip", f"{state.run_id}-last.zip"
    }  # fmt: skip

    best = state.best_checkpoint()
    out = real_app.segment_example(model=checkpoint_key(real_app.settings.runs_dir, best))
    assert_segment_shapes(out)
