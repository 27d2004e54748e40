"""Run plumbing without a server: launcher, events.jsonl reading, state, stop and kill."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from lisa_demo.ui.runs import (
    EventReader,
    RunError,
    RunState,
    TrainingManager,
    TrainRequest,
    parse_event_lines,
    trainer_command,
)
from lisa_demo.ui.settings import AppSettings
from tests.ui.conftest import FAKE_TRAINER


def test_trainer_command_plain_and_under_accelerate() -> None:
    assert trainer_command(["--x"], "lisa_demo.train") == [
        sys.executable, "-m", "lisa_demo.train", "--x"
    ]  # fmt: skip
    command = trainer_command(["--x"], "lisa_demo.train", launcher="accelerate")
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[-3:] == ["-m", "lisa_demo.train", "--x"]
    assert command[command.index("--num_processes") + 1] == "1"


def test_train_request_builds_the_trainer_contract_flags(tmp_path: Path) -> None:
    request = TrainRequest(
        synthetic_n=8, exclude_concept="star", preset="tiny-random", max_steps=3,
        lora_targets=("q_proj", "v_proj"), precision="bf16",
    )  # fmt: skip
    args = request.trainer_args(tmp_path, None)
    joined = " ".join(args)
    assert f"--output-dir {tmp_path}" in joined
    assert "--synthetic 8 --exclude-concept star" in joined
    assert "--max-steps 3" in joined and "--epochs" not in joined
    assert "--lora-targets q_proj v_proj" in joined
    assert "--precision bf16" in joined and "--quantization" not in joined
    for flag in (
        "--learning-rate",
        "--lora-r",
        "--batch-size",
        "--grad-accum",
        "--lr-scheduler",
        "--max-train-samples",
        "--max-val-samples",
        "--eval-every",
        "--preset",
    ):
        assert flag in args  # fmt: skip
    assert "--train-tokens" not in args and "--synthetic-explanations" not in args
    assert "--pointing-weight" not in args and "--train-projector" not in args
    assert args[args.index("--lora-dropout") + 1] == "0.05"  # the trainer's own default
    assert args[args.index("--replay-share") + 1] == "0.5"
    assert args[args.index("--retention-margin") + 1] == "0.03"
    assert "--replay-dir" not in args
    replayed = TrainRequest(replay_share=0.25, replay_folder="/data/base").trainer_args(
        tmp_path, None
    )
    assert replayed[replayed.index("--replay-share") + 1] == "0.25"
    assert replayed[replayed.index("--replay-dir") + 1] == "/data/base"
    focused = TrainRequest(
        focus_concept="heart",
        explained_answers=True,
        pointing_weight=2.0,
        train_projector=True,
        lora_dropout=0.0,
        look_alikes=("diamond", "pink"),
    )
    focused = focused.trainer_args(tmp_path, None)
    assert " ".join(focused).count("--focus-concept heart --train-tokens heart") == 1
    assert focused[focused.index("--look-alikes") + 1 :][:2] == ["diamond", "pink"]
    assert "--look-alikes" not in args
    assert "--synthetic-explanations" in focused
    assert focused[focused.index("--pointing-weight") + 1] == "2.0"
    assert "--train-projector" in focused
    assert focused[focused.index("--lora-dropout") + 1] == "0.0"
    by_epochs = TrainRequest(length="epochs", epochs=2).trainer_args(tmp_path, tmp_path / "data")
    assert "--epochs" in by_epochs and "--max-steps" not in by_epochs
    assert by_epochs[by_epochs.index("--dataset") + 1] == str(tmp_path / "data")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"source": "zip"}, "upload a .zip"),
        ({"source": "ftp"}, "data source"),
        ({"max_steps": 0}, "at least 1"),
        ({"lora_targets": ()}, "LoRA target"),
        ({"exclude_concept": "red", "focus_concept": "red"}, "both"),
        ({"pointing_weight": -1.0}, "pointing loss weight"),
        ({"pointing_weight": float("nan")}, "pointing loss weight"),
        ({"lora_dropout": -0.1}, "LoRA dropout"),
        ({"lora_dropout": 1.0}, "LoRA dropout"),
        ({"lora_dropout": float("nan")}, "LoRA dropout"),
        ({"replay_share": 1.0}, "replay share"),
        ({"replay_share": -0.1}, "replay share"),
        ({"retention_margin": float("nan")}, "retention margin"),
        ({"focus_concept": "heart", "look_alikes": ("heart",)}, "look-alike and the held-out"),
        ({"look_alikes": ("unicorn",)}, "unknown look-alike"),
    ],
)
def test_train_request_refuses_nonsense(fields: dict, message: str) -> None:
    with pytest.raises(RunError, match=message):
        TrainRequest(**fields)


def test_parse_event_lines_keeps_partial_line_and_skips_garbage() -> None:
    data = b'{"event": "log", "step": 1}\nnot json\n[1, 2]\n{"no_event": 1}\n{"event": "lo'
    events, rest = parse_event_lines(data)
    assert events == [{"event": "log", "step": 1}]
    assert rest == b'{"event": "lo'


def test_event_reader_tolerates_a_half_written_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    reader = EventReader(path)
    assert reader.read() == []  # no file yet
    with path.open("w") as handle:
        handle.write('{"event": "start", "total_steps": 4}\n{"event": "log", "st')
    assert [e["event"] for e in reader.read()] == ["start"]
    with path.open("a") as handle:
        handle.write('ep": 1}\n')
    assert reader.read() == [{"event": "log", "step": 1}]
    assert reader.read() == []


def test_run_state_ignores_unknown_events_and_keys(tmp_path: Path) -> None:
    state = RunState(run_id="r", run_dir=tmp_path)
    state.apply({"event": "start", "total_steps": 10, "dataset": {"train": 8, "val": 2}})
    state.apply({"event": "from_the_future", "x": 1})
    state.apply({"event": "log", "step": 3, "loss": 1.5, "ce_loss": 1.0, "brand_new": "?"})
    state.apply({"event": "eval", "step": 3, "giou": 0.25, "ciou": 0.5})
    assert state.status == "running" and state.step == 3 and state.total_steps == 10
    assert state.loss_frame().to_dict("list") == {
        "step": [3, 3], "series": ["loss", "ce_loss"], "value": [1.5, 1.0]
    }  # fmt: skip
    assert set(state.eval_frame()["series"]) == {"new data gIoU"}  # no retention_giou key
    progress = state.progress_markdown()
    assert "step 3 / 10 (30%)" in progress and "left" in progress
    state.apply({"event": "end", "status": "weird", "error": "boom"})
    assert state.status == "failed" and "boom" in state.progress_markdown()


def test_run_state_shows_both_sets_before_latest_and_best_and_the_warning(tmp_path) -> None:
    state = RunState(run_id="r", run_dir=tmp_path)
    state.apply({"event": "start", "total_steps": 4,
                 "dataset": {"train": 16, "new": 8, "replay": 8, "val": 2,
                             "replay_plan": "replay: 8 synthetic scenes"}})  # fmt: skip
    state.apply({"event": "eval", "step": 0, "before": True, "giou": 0.25, "ciou": 0.2,
                 "retention_giou": 0.8, "retention_ciou": 0.75})  # fmt: skip
    # The first evaluation already gives both curves a point.
    assert state.eval_frame().to_dict("list") == {
        "step": [0, 0], "series": ["new data gIoU", "retention gIoU"], "value": [0.25, 0.8]
    }  # fmt: skip
    assert "8 new + 8 replay" in state.log_text()
    for step, new, kept in ((2, 0.6, 0.79), (4, 0.7, 0.5)):
        state.apply({"event": "eval", "step": step, "giou": new, "ciou": new - 0.1,
                     "retention_giou": kept, "retention_ciou": kept - 0.05})  # fmt: skip
    state.apply({"event": "checkpoint", "step": 2, "kind": "best", "path": "x", "metric": 0.6})
    message = "the model forgot: retention gIoU fell from 0.800 to 0.500"
    state.apply({"event": "warning", "kind": "retention", "message": message})
    state.apply({"event": "end", "status": "finished", "step": 4, "warning": message})
    progress = state.progress_markdown()
    assert progress.count(message) == 1 and f"**Warning: {message}**" in progress
    assert "Replay and retention: replay: 8 synthetic scenes" in progress
    table = progress[progress.index("| gIoU / cIoU") :].splitlines()
    assert table[0] == "| gIoU / cIoU | before | step 4 | best (step 2) |"
    assert table[2] == "| new data | 0.250 / 0.200 | 0.700 / 0.600 | 0.600 / 0.500 |"
    assert table[3] == "| retention | 0.800 / 0.750 | 0.500 / 0.450 | 0.790 / 0.740 |"
    assert state.log_text().count(f"warning: {message}") == 1


def test_stop_during_start_up_ends_as_stopped(tmp_path: Path, monkeypatch) -> None:
    """SIGTERM before the trainer has its handler (still importing) kills it with -15: the
    stop the user asked for, not a failure."""
    monkeypatch.setenv("FAKE_TRAINER_STARTUP_S", "30")
    manager = TrainingManager()
    manager.start(_settings(tmp_path), TrainRequest(max_steps=4))
    time.sleep(0.3)
    manager.stop()
    state = _wait_done(manager, timeout=10)
    assert state.status == "stopped" and state.error is None
    assert "stopped before training began" in state.log_text()
    assert "exit" not in state.progress_markdown()


def _settings(tmp_path: Path, **kw: object) -> AppSettings:
    return AppSettings(**{"runs_dir": tmp_path / "runs", "trainer_module": FAKE_TRAINER, **kw})


def _wait_done(manager: TrainingManager, timeout: float = 30.0) -> RunState:
    deadline = time.monotonic() + timeout
    while not manager.snapshot().done:
        assert time.monotonic() < deadline, "run did not end"
        time.sleep(0.05)
    return manager.snapshot()


def test_manager_runs_the_fake_trainer_and_zips_checkpoints(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_TRAINER_STEP_S", "0.01")
    manager = TrainingManager()
    manager.start(_settings(tmp_path), TrainRequest(max_steps=4))
    state = _wait_done(manager)
    assert state.status == "finished" and state.step == 4
    assert sorted(Path(p).name for p in state.checkpoint_files()) == [
        f"{state.run_id}-best.zip", f"{state.run_id}-last.zip"
    ]  # fmt: skip
    info = json.loads((state.run_dir / "ui_run.json").read_text())
    assert info["preset"] == "tiny"
    assert state.best_checkpoint() == state.run_dir / "checkpoints" / "best"


def test_trainer_that_crashes_is_reported_failed_with_its_output(tmp_path: Path) -> None:
    manager = TrainingManager()
    settings = _settings(tmp_path, trainer_module="tests.ui.no_such_trainer_module")
    manager.start(settings, TrainRequest(max_steps=2))
    state = _wait_done(manager)
    assert state.status == "failed"
    assert "exited with code 1" in state.error and "No module named" in state.error


def test_stop_kills_a_trainer_that_ignores_sigterm(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_TRAINER_IGNORE_SIGTERM", "1")
    monkeypatch.setenv("FAKE_TRAINER_STEP_S", "0.05")
    manager = TrainingManager()
    manager.start(_settings(tmp_path, stop_timeout_s=0.5), TrainRequest(max_steps=10_000))
    while manager.snapshot().step < 1:
        time.sleep(0.05)
    assert manager.stop().startswith("Stop requested")
    state = _wait_done(manager, timeout=10)
    assert state.status == "stopped" and "killed" in state.error


def test_server_folder_source_is_checked_and_passed_as_dataset(tmp_path, monkeypatch) -> None:
    from tests.ui.test_archive import sample

    monkeypatch.setenv("FAKE_TRAINER_STEP_S", "0.01")
    for split, name in (("train", "a"), ("val", "b")):
        folder = tmp_path / "ds" / split
        folder.mkdir(parents=True)
        for file_name, data in sample(name).items():
            (folder / file_name).write_bytes(data)
    manager = TrainingManager()
    with pytest.raises(RunError, match="has no train/ folder"):
        manager.start(_settings(tmp_path), TrainRequest(source="folder", folder_path=str(tmp_path)))
    request = TrainRequest(source="folder", folder_path=str(tmp_path / "ds"), max_steps=2)
    manager.start(_settings(tmp_path), request)
    state = _wait_done(manager)
    assert f"--dataset {tmp_path / 'ds'}" in state.log_text()
    assert state.summary == "1 train and 1 val images"


def test_a_full_model_run_launches_the_trainer_with_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_TRAINER_STEP_S", "0.01")
    folder = tmp_path / "models" / "lisa-7b"
    args = TrainRequest(model=str(folder), max_steps=2).trainer_args(tmp_path / "out", None)
    assert args[:4] == ["--output-dir", str(tmp_path / "out"), "--model", str(folder)]
    assert "--preset" not in args
    # The app's own --llava/--sam belong to its preset, never to a full model's run.
    manager = TrainingManager()
    settings = _settings(tmp_path, llava="someone/llava", sam="someone/sam")
    manager.start(settings, TrainRequest(model=str(folder), max_steps=2))
    state = _wait_done(manager)
    launched = next(line for line in state.log_lines if "launched:" in line)
    assert f"-m {FAKE_TRAINER} --output-dir {state.run_dir} --model {folder} --synthetic" in (
        launched
    )
    assert "--llava" not in launched and "--sam" not in launched and "--preset" not in launched
    info = json.loads((state.run_dir / "ui_run.json").read_text())
    assert info["model"] == str(folder)


def test_loss_curve_is_thinned_for_the_page_keeping_the_newest_step(tmp_path: Path) -> None:
    state = RunState(run_id="r", run_dir=tmp_path)
    for step in range(1, 1001):
        state.apply({"event": "log", "step": step, "loss": 1.0 / step, "ce_loss": 0.5})
    frame = state.loss_frame(max_steps=300)
    steps = sorted(set(frame["step"]))
    assert len(steps) <= 300 and steps[-1] == 1000
    assert steps == list(range(1000, 0, -4))[::-1]  # every 4th step, counted from the newest
    assert (frame.groupby("step").size() == 2).all()  # both series at every kept step
    kept = frame[frame["series"] == "loss"].set_index("step")["value"]
    assert kept[1000] == 1.0 / 1000 and kept[4] == 1.0 / 4
    assert len(state.loss_frame(max_steps=2000)) == 2000  # short runs: every point
