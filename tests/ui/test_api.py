"""The app through gradio_client, wired to the fake backend and the fake trainer."""

from __future__ import annotations

import io
import json
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from lisa_demo.ui.models import checkpoint_key
from lisa_demo.ui.runs import TRAINING
from tests.ui.conftest import EXAMPLE_QUERY, LaunchedApp, red_square_image

# gradio itself opens the 10000x10000 upload's header, and PIL warns about its size.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

OVERLAY, ANSWER, DETAILS, TABLE, FILES, TIMINGS = range(6)
LOG, PROGRESS, LOSS, EVAL, CHECKPOINTS = range(5)


def assert_example_ok(app: LaunchedApp) -> None:
    """The app still serves: the example segments with IoU 1.0."""
    out = app.segment_example()
    assert out[TABLE]["data"][0][3] == 1.0


def wait_for_new_run(previous: str | None, min_step: int, timeout: float = 20.0) -> None:
    """Until a run other than `previous` has logged `min_step` steps."""
    deadline = time.monotonic() + timeout
    while True:
        state = TRAINING.snapshot()
        if state is not None and state.run_id != previous and state.step >= min_step:
            return
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.1)


def current_run_id() -> str | None:
    state = TRAINING.snapshot()
    return None if state is None else state.run_id


def test_api_lists_the_three_named_endpoints(fake_app: LaunchedApp) -> None:
    endpoints = fake_app.client.view_api(return_format="dict", print_info=False)
    named = endpoints["named_endpoints"]
    assert {"/segment", "/train", "/stop_training"} <= set(named)
    segment_params = [p["parameter_name"] for p in named["/segment"]["parameters"]]
    assert segment_params[:2] == ["image", "query"]
    optional = {p["parameter_name"] for p in named["/segment"]["parameters"][2:]}
    assert all(p["parameter_has_default"] for p in named["/segment"]["parameters"][2:]), optional


def test_segment_example_returns_overlay_answer_table_and_pngs(fake_app: LaunchedApp) -> None:
    out = fake_app.segment_example()

    annotations = out[OVERLAY]["annotations"]
    assert [a["label"] for a in annotations] == ["mask 1"]
    assert "[SEG]" in out[ANSWER]
    table = out[TABLE]
    assert table["headers"] == ["mask", "confidence (SAM IoU)", "area %", "true IoU", "Dice"]
    mask_no, confidence, area, iou, dice = table["data"][0]
    assert (mask_no, confidence) == (1, 0.93)
    assert iou == 1.0 > 0.7 and dice == 1.0
    assert area == pytest.approx(100 * 40 * 60 / (120 * 160), abs=0.01)
    assert [Path(f["path"]).name for f in out[FILES]] == ["mask_1.png"]
    png = np.asarray(Image.open(out[FILES][0]["path"]))
    assert png.shape == (120, 160) and png[50, 70] == 255 and png[0, 0] == 0
    assert "Timings: image encoding" in out[DETAILS]
    assert "Image embeddings from cache:" in out[DETAILS]


def test_timings_come_back_as_a_json_object_too(fake_app: LaunchedApp) -> None:
    out = fake_app.segment_example()
    assert out[TIMINGS] == {
        "image_encoding": 0.01, "generation": 0.02, "mask_decoding": 0.01, "total": 0.04
    }  # fmt: skip
    assert "Timings: image encoding 0.01 s" in out[DETAILS]  # and the prose


def test_model_argument_accepts_the_label_the_dropdown_shows(fake_app: LaunchedApp) -> None:
    by_label = fake_app.segment_example(model="test backend")
    by_key = fake_app.segment_example(model="backend")
    assert by_label[TABLE]["data"] == by_key[TABLE]["data"]
    assert by_label[TABLE]["data"][0][3] == 1.0


def test_many_seg_output_shows_the_first_masks_and_one_line(fake_app: LaunchedApp) -> None:
    out = fake_app.segment_example(query="Show me many things")
    assert [row[0] for row in out[TABLE]["data"]] == [1, 2, 3, 4]
    assert [Path(f["path"]).name for f in out[FILES]] == [f"mask_{i}.png" for i in (1, 2, 3, 4)]
    assert len(out[OVERLAY]["annotations"]) == 4
    assert "Showing the first 4 of 12 masks; the other 8 (8 of them empty)" in out[DETAILS]
    assert "lower threshold" not in out[DETAILS]


def test_second_question_on_same_image_reports_cache(fake_app: LaunchedApp) -> None:
    fake_app.segment_example()
    out = fake_app.segment_example(query="And now the red one again?")
    assert "Image embeddings from cache: yes" in out[DETAILS]


def test_threshold_reaches_the_model_as_a_logit(fake_app: LaunchedApp) -> None:
    fake_app.segment_example(threshold=0.5)
    assert fake_app.backend.calls[-1][2] == pytest.approx(0.0)
    fake_app.segment_example(threshold=0.9)
    assert fake_app.backend.calls[-1][2] == pytest.approx(np.log(9.0))


def test_answer_without_seg_says_nothing_to_segment(fake_app: LaunchedApp) -> None:
    out = fake_app.segment_example(query="Is there nothing here?", ground_truth_mask=None)
    assert out[ANSWER] == "There is nothing like that here."
    assert "found nothing to segment" in out[DETAILS]
    assert out[OVERLAY]["annotations"] == []
    assert out[TABLE]["data"] == [] or out[TABLE]["data"] == [[None] * 3]
    assert out[TABLE]["headers"] == ["mask", "confidence (SAM IoU)", "area %"]
    assert not out[FILES]


def test_drawn_ground_truth_is_used_when_no_mask_file(fake_app: LaunchedApp, tmp_path) -> None:
    layer = np.zeros((120, 160, 4), dtype=np.uint8)
    layer[30:70, 40:70] = (255, 0, 255, 255)  # painted the left half of the square
    Image.fromarray(layer).save(tmp_path / "layer.png")
    drawing = {
        "background": handle_file(str(fake_app.examples / "red_square.png")),
        "layers": [handle_file(str(tmp_path / "layer.png"))],
        "composite": None,
        "id": None,
    }
    out = fake_app.segment_example(ground_truth_mask=None, ground_truth_drawing=drawing)
    assert out[TABLE]["data"][0][3] == pytest.approx(0.5, abs=0.01)


def _save(tmp_path: Path, name: str, image: Image.Image) -> str:
    path = tmp_path / name
    image.save(path)
    return str(path)


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_pngs_segment(fake_app: LaunchedApp, tmp_path, mode: str) -> None:
    image = Image.fromarray(red_square_image()).convert(mode)
    out = fake_app.segment_example(image=handle_file(_save(tmp_path, f"{mode}.png", image)))
    assert out[TABLE]["headers"][:3] == ["mask", "confidence (SAM IoU)", "area %"]
    assert fake_app.backend.calls[-1][0] == (120, 160, 3)


def _huge_png(tmp_path: Path) -> str:
    return _save(tmp_path, "huge.png", Image.new("L", (10_000, 10_000), 200))


def _corrupt(tmp_path: Path) -> str:
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"definitely not the rest of a png")
    return str(path)


def _truncated_jpeg(tmp_path: Path) -> str:
    buffer = io.BytesIO()
    Image.fromarray(red_square_image()).save(buffer, format="JPEG")
    path = tmp_path / "truncated.jpg"
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) * 2 // 3])  # header intact, pixels cut off
    return str(path)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("empty query", "Type a question"),
        ("blank query", "Type a question"),
        ("no image", "Add an image first"),
        ("10000x10000 image", "megapixel limit"),
        ("corrupt file", "not an image the app can read"),
        ("truncated jpeg", "damaged or truncated"),
        ("corrupt ground truth", "Ground-truth mask: this file is not an image"),
        ("wrong-size ground truth", "use a mask of the image's size"),
        ("unknown model", "Unknown model"),
    ],
)
def test_bad_inputs_give_a_message_and_the_app_keeps_serving(
    fake_app: LaunchedApp, tmp_path, case: str, expected: str
) -> None:
    overrides: dict[str, object] = {
        "empty query": {"query": ""},
        "blank query": {"query": "   "},
        "no image": {"image": None},
        "10000x10000 image": {"image": handle_file(_huge_png(tmp_path))},
        "corrupt file": {"image": handle_file(_corrupt(tmp_path))},
        "truncated jpeg": {"image": handle_file(_truncated_jpeg(tmp_path))},
        "corrupt ground truth": {"ground_truth_mask": handle_file(_corrupt(tmp_path))},
        "wrong-size ground truth": {
            "ground_truth_mask": handle_file(_save(tmp_path, "m.png", Image.new("L", (50, 50))))
        },
        "unknown model": {"model": "no-such-model"},
    }[case]
    with pytest.raises(AppError, match=expected):
        fake_app.segment_example(**overrides)
    assert_example_ok(fake_app)


def test_examples_folder_feeds_the_examples(fake_app: LaunchedApp) -> None:
    from lisa_demo.ui.inference_tab import load_examples

    examples = load_examples(fake_app.examples)
    assert examples == [
        [
            str(fake_app.examples / "red_square.png"),
            EXAMPLE_QUERY,
            str(fake_app.examples / "red_square_mask.png"),
        ]
    ]
    assert load_examples(fake_app.examples / "missing") == []


# Training -----------------------------------------------------------------------------------
def test_train_streams_updates_and_ends_with_checkpoints(
    fake_app: LaunchedApp, no_run_after, monkeypatch
) -> None:
    monkeypatch.setenv("FAKE_TRAINER_STEP_S", "0.4")
    job = fake_app.client.submit(max_steps=6, api_name="/train")
    final = job.result(timeout=60)
    updates = job.outputs()

    assert len(updates) >= 3
    assert "**finished**" in final[PROGRESS] and "step 6 / 6" in final[PROGRESS]
    assert "step 6/6" in final[LOG] and "validation @ step 6" in final[LOG]
    series = {row[1] for row in final[LOSS]["data"]}
    assert {"loss", "ce_loss", "bce_loss", "dice_loss"} <= series
    # Two curves, from the evaluation before the first step on; before/best numbers.
    assert {row[1] for row in final[EVAL]["data"]} == {"new data gIoU", "retention gIoU"}
    assert min(row[0] for row in final[EVAL]["data"]) == 0
    assert "| new data | 0.200 / 0.180 |" in final[PROGRESS]
    assert "| retention | 0.800 / 0.760 |" in final[PROGRESS]
    assert "Warning" not in final[PROGRESS]
    names = sorted(Path(f["path"]).name for f in final[CHECKPOINTS])
    run_id = TRAINING.snapshot().run_id
    assert names == [f"{run_id}-best.zip", f"{run_id}-last.zip"]
    with zipfile.ZipFile(final[CHECKPOINTS][0]["path"]) as zf:
        assert any(name.endswith("manifest.json") for name in zf.namelist())

    # The page's other defaults are the model card's fine-tune, and they reach the trainer.
    events = fake_app.settings.runs_dir / run_id / "events.jsonl"
    argv = " ".join(json.loads(events.read_text().splitlines()[0])["config"]["argv"])
    for flags in (
        "--synthetic 400 --focus-concept heart --train-tokens heart --synthetic-explanations "
        "--look-alikes diamond",
        "--learning-rate 0.0015 --lora-r 16 --lora-targets q_proj k_proj v_proj o_proj "
        "gate_proj up_proj down_proj --lora-dropout 0.05 --batch-size 8",
        "--eval-every 300", "--replay-share 0.3", "--replay-distill 3.0",
    ):
        assert flags in argv
    # the projector stays frozen and the mask side's rate is the trainer's (0 for this model)
    assert "--train-projector" not in argv and "--mask-lr-scale" not in argv

    # The run's checkpoints are now models of the Inference tab.
    folder = fake_app.settings.runs_dir / run_id / "checkpoints" / "best"
    out = fake_app.segment_example(model=checkpoint_key(fake_app.settings.runs_dir, folder))
    assert out[TABLE]["data"][0][3] == 1.0


def test_a_run_that_forgets_ends_with_a_warning_on_the_page(
    fake_app: LaunchedApp, no_run_after, monkeypatch
) -> None:
    monkeypatch.setenv("FAKE_TRAINER_STEP_S", "0.05")
    final = fake_app.client.predict(max_steps=4, learning_rate=0.05, api_name="/train")
    assert "**finished**" in final[PROGRESS]
    assert (
        "**Warning: the model forgot: retention gIoU fell from 0.800 to 0.600**"
        in (final[PROGRESS])
    )
    assert "warning: the model forgot" in final[LOG]


def test_estimate_measures_the_chosen_settings_before_start(
    fake_app: LaunchedApp, no_run_after, monkeypatch
) -> None:
    monkeypatch.setenv("FAKE_TRAINER_STEP_S", "0.5")
    text = fake_app.client.predict(max_steps=120, api_name="/estimate_training")
    # 120 steps of 0.5 s and 60 evaluations of 0.25 s after the measured start-up: over 1:15.
    assert text.startswith("**Estimated duration: about 1:")
    assert "120 steps of 0.50 s" in text and "60 evaluations of 0.2 s" in text
    assert not list((fake_app.settings.runs_dir / ".estimates").iterdir())  # scratch removed


def test_stop_ends_the_run_with_last_saved(
    fake_app: LaunchedApp, no_run_after, monkeypatch
) -> None:
    monkeypatch.setenv("FAKE_TRAINER_STEP_S", "0.2")
    previous = current_run_id()
    job = fake_app.client.submit(max_steps=500, api_name="/train")
    wait_for_new_run(previous, min_step=2)

    message = fake_app.client.predict(api_name="/stop_training")
    final = job.result(timeout=40)

    assert message.startswith("Stop requested")
    assert "**stopped**" in final[PROGRESS]
    state = TRAINING.snapshot()
    assert state.status == "stopped" and state.step < 500
    assert (state.run_dir / "checkpoints" / "last" / "manifest.json").is_file()
    assert any(Path(f["path"]).name.endswith("-last.zip") for f in final[CHECKPOINTS])
    assert fake_app.client.predict(api_name="/stop_training") == "No training run is in progress."


def test_second_start_while_running_is_refused(
    fake_app: LaunchedApp, no_run_after, monkeypatch
) -> None:
    monkeypatch.setenv("FAKE_TRAINER_STEP_S", "0.2")
    previous = current_run_id()
    first = fake_app.client.submit(max_steps=500, api_name="/train")
    wait_for_new_run(previous, min_step=1)

    with pytest.raises(AppError, match="already in progress"):
        fake_app.client.predict(max_steps=3, api_name="/train")
    assert_example_ok(fake_app)
    assert TRAINING.run.alive

    fake_app.client.predict(api_name="/stop_training")
    assert "**stopped**" in first.result(timeout=40)[PROGRESS]


def _zip(tmp_path: Path, members: dict[str, bytes]) -> str:
    path = tmp_path / "dataset.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return str(path)


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ({"../evil.json": b"{}"}, "points outside"),
        ({"/etc/evil.json": b"{}"}, "absolute path"),
        ({"notes.txt": b"hello"}, "annotated images"),
    ],
)
def test_bad_zip_is_refused_and_the_app_keeps_serving(
    fake_app: LaunchedApp, no_run_after, tmp_path, members: dict, expected: str
) -> None:
    upload = handle_file(_zip(tmp_path, members))
    with pytest.raises(AppError, match=expected) as refused:
        fake_app.client.predict(source="zip", dataset_zip=upload, api_name="/train")
    # The message names the user's file, not where the server keeps its copy or the run.
    message = str(refused.value)
    assert "dataset.zip: " in message
    assert tempfile.gettempdir() not in message and str(fake_app.settings.runs_dir) not in message
    assert TRAINING.run is None or not TRAINING.run.alive
    assert_example_ok(fake_app)


def test_zip_source_without_upload_and_server_folder_are_refused(
    fake_app: LaunchedApp, no_run_after
) -> None:
    with pytest.raises(AppError, match="upload a .zip"):
        fake_app.client.predict(source="zip", api_name="/train")
    with pytest.raises(AppError, match="disabled|not one of|choices"):
        fake_app.client.predict(source="folder", server_folder="/etc", api_name="/train")
    assert_example_ok(fake_app)
