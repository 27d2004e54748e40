"""The Training tab's memory estimate: its handler called directly, and its wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lisa_demo.ui import AppSettings, build_app
from lisa_demo.ui.runs import PRESET_DEFAULT, RunError
from lisa_demo.ui.training_tab import (
    MEMORY_TITLE,
    TINY_NOTE,
    default_training_preset,
    make_memory_handler,
    training_model_choices,
    training_model_folder,
)
from tests.ui.conftest import TINY_LISA_NAME
from tests.ui.fakes import FakeBackend

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def estimate(tmp_path: Path):
    return make_memory_handler(AppSettings(runs_dir=tmp_path / "runs"))


def _row(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {name}"))


def test_tiny_estimate_shows_both_peaks_and_says_it_is_for_a_gpu(estimate) -> None:
    text = estimate("tiny-random", PRESET_DEFAULT, PRESET_DEFAULT, 8, TARGETS, 2)
    assert text.startswith(MEMORY_TITLE)
    assert "Training step (batch 2)" in text and "| Inference |" in text
    assert _row(text, "Training step").endswith("| 8 GB |")  # the smallest card listed
    assert TINY_NOTE in text
    # "tiny" is not bundled in a fresh clone: it has tiny-random's architecture.
    assert estimate("tiny", PRESET_DEFAULT, PRESET_DEFAULT, 8, TARGETS, 2).startswith(
        MEMORY_TITLE + "\n"
    )


def test_estimate_changes_with_batch_size(estimate) -> None:
    one = estimate("llava-1.5-7b", PRESET_DEFAULT, PRESET_DEFAULT, 8, TARGETS, 1)
    eight = estimate("llava-1.5-7b", PRESET_DEFAULT, PRESET_DEFAULT, 8, TARGETS, 8)
    assert MEMORY_TITLE in one and MEMORY_TITLE in eight
    assert TINY_NOTE not in one
    assert _row(one, "Training step") != _row(eight, "Training step")
    assert _row(one, "Inference") == _row(eight, "Inference")  # one query at a time
    # 4-bit QLoRA at batch 1 fits an 8 GB card (docs/BENCHMARKS.md), batch 8 does not.
    assert _row(one, "Training step").endswith("| 8 GB |")
    assert not _row(eight, "Training step").endswith("| 8 GB |")


def test_quantization_precision_and_lora_settings_change_the_estimate(estimate) -> None:
    base = estimate("llava-1.5-7b", PRESET_DEFAULT, PRESET_DEFAULT, 8, TARGETS, 1)
    others = [
        estimate("llava-1.5-7b", "none", PRESET_DEFAULT, 8, TARGETS, 1),
        estimate("llava-1.5-7b", PRESET_DEFAULT, "fp32", 8, TARGETS, 1),
        estimate("llava-1.5-7b", PRESET_DEFAULT, PRESET_DEFAULT, 64, TARGETS, 1),
        estimate("llava-1.5-7b", PRESET_DEFAULT, PRESET_DEFAULT, 8, ["q_proj"], 1),
    ]
    for other in others:
        assert _row(other, "Training step") != _row(base, "Training step")
    assert "no quantization" in others[0] and "more than 24 GB" not in base
    # the projector's 21 M weights get fp32 master weights, gradients and AdamW state
    projector = estimate("llava-1.5-7b", PRESET_DEFAULT, PRESET_DEFAULT, 8, TARGETS, 1, True)
    assert "the image projector" in projector and "the image projector" not in base
    assert _row(projector, "Training step") != _row(base, "Training step")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("tiny-random", PRESET_DEFAULT, PRESET_DEFAULT, 0, TARGETS, 2), "LoRA rank"),
        (("tiny-random", PRESET_DEFAULT, PRESET_DEFAULT, None, TARGETS, 2), "LoRA rank"),
        (("tiny-random", PRESET_DEFAULT, PRESET_DEFAULT, 8, [], 2), "LoRA target"),
        (("tiny-random", PRESET_DEFAULT, PRESET_DEFAULT, 8, TARGETS, None), "batch size"),
        (("no-such-preset", PRESET_DEFAULT, PRESET_DEFAULT, 8, TARGETS, 2), "unknown model"),
        (("tiny-random", "3bit", PRESET_DEFAULT, 8, TARGETS, 2), "quantization must be"),
    ],
)
def test_bad_settings_give_a_message_not_an_exception(estimate, arguments, message) -> None:
    text = estimate(*arguments)
    assert text.startswith(MEMORY_TITLE) and message in text


def test_a_model_without_a_known_architecture_is_explained(tmp_path: Path) -> None:
    settings = AppSettings(preset="llava-1.5-7b", llava="someone/other-llava", runs_dir=tmp_path)
    text = make_memory_handler(settings)("llava-1.5-7b", "4bit", "bf16", 8, TARGETS, 1)
    assert "not available" in text and "someone/other-llava" in text


def test_estimate_runs_on_load_and_on_every_setting_change(tmp_path: Path) -> None:
    demo = build_app(AppSettings(runs_dir=tmp_path / "runs"), backend=FakeBackend())
    (block_fn,) = [f for f in demo.fns.values() if f.name == "estimate_training_memory"]
    events = {event for _, event in block_fn.targets}
    assert "load" in events
    labels = {"Model to fine-tune", "Quantization", "Precision", "LoRA rank", "LoRA targets",
              "Batch size", "Train the image projector too"}  # fmt: skip
    assert {component.label for component in block_fn.inputs} == labels
    changed = {target for target, event in block_fn.targets if event == "change"}
    assert changed == {component._id for component in block_fn.inputs}
    assert [output.elem_id for output in block_fn.outputs] == ["training-memory"]


# Full models ------------------------------------------------------------------------------
def test_full_models_are_offered_to_fine_tune_besides_the_presets(
    tmp_path: Path, converted_models_dir: Path
) -> None:
    folder = converted_models_dir / TINY_LISA_NAME
    settings = AppSettings(runs_dir=tmp_path / "runs", models_dir=converted_models_dir)
    choices = training_model_choices(settings)
    assert choices == [
        ("tiny (the bundled tiny LISA)", "tiny"),
        ("tiny-random", "tiny-random"),
        ("llava-1.5-7b", "llava-1.5-7b"),
        ("llava-1.5-7b-sam-huge", "llava-1.5-7b-sam-huge"),
        (f"{TINY_LISA_NAME} (LISA, llava_v1)", f"model:{TINY_LISA_NAME}"),
    ]
    assert training_model_folder(settings, f"model:{TINY_LISA_NAME}") == str(folder)
    assert training_model_folder(settings, "tiny") is None
    with pytest.raises(RunError, match="unknown model 'model:other'"):
        training_model_folder(settings, "model:other")
    assert default_training_preset(settings) == "tiny"
    # The configured full model is offered too, and is the default.
    configured = AppSettings(runs_dir=tmp_path / "runs", models_dir=tmp_path, model=str(folder))
    assert training_model_choices(configured)[-1] == (
        f"{TINY_LISA_NAME} (LISA, llava_v1)", "configured"
    )  # fmt: skip
    assert default_training_preset(configured) == "configured"
    assert training_model_folder(configured, "configured") == str(folder)


def test_memory_estimate_of_a_full_model_or_why_there_is_none(
    tmp_path: Path, converted_models_dir: Path
) -> None:
    settings = AppSettings(runs_dir=tmp_path / "runs", models_dir=converted_models_dir)
    estimate = make_memory_handler(settings)
    text = estimate(f"model:{TINY_LISA_NAME}", PRESET_DEFAULT, PRESET_DEFAULT, 8, TARGETS, 2)
    assert "Training step (batch 2)" in text and "| Inference |" in text
    assert f"{TINY_LISA_NAME} (LISA, llava_v1): no quantization, fp32" in text
    # A full model whose config is unreadable gets a line, not a crash.
    broken = tmp_path / "models" / "broken"
    for part in ("llava", "sam"):
        (broken / part).mkdir(parents=True)
        (broken / part / "config.json").write_text("{not json")
    (broken / "projection.safetensors").write_bytes(b"")
    (broken / "manifest.json").write_text(json.dumps({"format": "lisa-studio-bundle"}))
    settings = AppSettings(runs_dir=tmp_path / "runs", models_dir=tmp_path / "models")
    text = make_memory_handler(settings)("model:broken", "4bit", "bf16", 8, TARGETS, 1)
    assert text.startswith(MEMORY_TITLE + ": ") and "broken (full model)" in text
    assert "\n" not in text


def test_a_hub_repo_not_downloaded_is_offered_but_not_downloaded_for_an_estimate(
    tmp_path: Path,
) -> None:
    repo = "nobody-here/lisa-studio-test-model"
    settings = AppSettings(runs_dir=tmp_path / "runs", models_dir=tmp_path, model=repo)
    assert default_training_preset(settings) == "configured"
    assert training_model_folder(settings, "configured") == repo  # the trainer's --model
    text = make_memory_handler(settings)(
        "configured", PRESET_DEFAULT, PRESET_DEFAULT, 8, TARGETS, 1
    )
    assert text == (
        f"{MEMORY_TITLE}: not available for these settings ({repo} is not downloaded yet: it "
        "downloads when first used)."
    )
