"""The training CLI end to end on the tiny random model: artifacts, stop/resume, processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lisa_demo.data.synthetic import generate_dataset
from lisa_demo.train.__main__ import main as train_main
from lisa_demo.train.loop import lr_at

ROOT = Path(__file__).resolve().parents[2]
BASE = ["--preset", "tiny-random", "--batch-size", "2", "--seg-rate-samples", "2"]


def read_events(run: Path) -> list[dict]:
    lines = (run / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]  # every line must parse


def of(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["event"] == kind]


def run_cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "lisa_demo.train", *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, {"train": 6, "val": 3}, seed=3)
    return root


@pytest.fixture(scope="module")
def short_run(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    code = train_main(
        ["--dataset", str(dataset), "--output-dir", str(out), *BASE,
         "--max-steps", "4", "--eval-every", "2", "--learning-rate", "1e-3"]
    )  # fmt: skip
    assert code == 0
    return out


def test_short_run_writes_every_artifact(short_run: Path):
    for name in ("events.jsonl", "training_history.json", "training_history.png"):
        assert (short_run / name).stat().st_size > 0, name
    assert list(short_run.glob("metrics_epoch_*.json"))
    for kind in ("best", "last"):
        folder = short_run / "checkpoints" / kind
        assert (folder / "manifest.json").exists() and (folder / "trainable.safetensors").exists()
    events = read_events(short_run)
    assert events[0]["event"] == "start" and events[0]["trainable_params"] > 0
    assert [e["step"] for e in of(events, "log")] == [1, 2, 3, 4]
    # Before the first step, then every 2 steps; tiny-random has no domain of its own, so the
    # retention set is every second validation image (3 images: 2 new-data, 1 retention).
    evals = of(events, "eval")
    assert [(e["step"], e["before"]) for e in evals] == [(0, True), (2, False), (4, False)]
    assert all(0.0 <= e["giou"] <= 1.0 and 0.0 <= e["ciou"] <= 1.0 for e in evals)
    assert all(e["n"] == 2 and e["retention_n"] == 1 for e in evals)
    assert [w["kind"] for w in of(events, "warning")] == ["no_replay"]
    assert events[-1]["event"] == "end" and events[-1]["status"] == "finished"
    assert not list((short_run / "checkpoints").glob(".*")), "temporary folders left behind"


def test_best_checkpoint_loads_in_the_inference_cli(short_run: Path, scene_image, tmp_path):
    from PIL import Image

    from lisa_demo.infer.__main__ import main as infer_main

    image = tmp_path / "scene.png"
    Image.fromarray(scene_image).save(image)
    best = short_run / "checkpoints" / "best"
    code = infer_main(
        ["--image", str(image), "--query", "the red square", "--preset", "tiny-random",
         "--checkpoint", str(best), "--out-dir", str(tmp_path / "out"), "--json"]
    )  # fmt: skip
    assert code == 0


def test_training_loss_goes_down(dataset, tmp_path):
    code = train_main(
        ["--dataset", str(dataset), "--output-dir", str(tmp_path), *BASE,
         "--max-train-samples", "2", "--max-steps", "16", "--learning-rate", "3e-3",
         "--lr-scheduler", "constant", "--eval-every", "16", "--seg-rate-samples", "0"]
    )  # fmt: skip
    assert code == 0
    losses = [e["loss"] for e in of(read_events(tmp_path), "log")]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses


def test_embedding_cache_is_hit_in_the_second_epoch(dataset, tmp_path):
    code = train_main(
        ["--dataset", str(dataset), "--output-dir", str(tmp_path), *BASE,
         "--max-train-samples", "4", "--epochs", "2", "--seg-rate-samples", "0"]
    )  # fmt: skip
    assert code == 0
    ends = of(read_events(tmp_path), "epoch_end")
    assert len(ends) == 2
    first, second = ends[0]["embedding_cache"], ends[1]["embedding_cache"]
    assert second["misses"] == first["misses"], "no image should be encoded twice"
    assert second["hits"] > first["hits"]


def test_offloaded_sam_encoder_run_trains_to_the_same_losses(tiny_loaded, dataset, tmp_path):
    """--offload-sam-encoder: every train and validation image is encoded before the first
    step, then the encoder leaves the GPU (a no-op move here); losses and scores are those of
    the same run without it. (tiny_loaded first: building the tiny model in the process would
    move the random state of the first run only.)"""
    runs = {}
    for name, extra in (("plain", []), ("offloaded", ["--offload-sam-encoder"])):
        out = tmp_path / name
        args = ["--dataset", str(dataset), "--output-dir", str(out), *BASE, "--max-steps", "3",
                "--eval-every", "2", "--learning-rate", "1e-3", *extra]  # fmt: skip
        assert train_main(args) == 0
        runs[name] = read_events(out)
    events, reference = runs["offloaded"], runs["plain"]
    (offloaded,) = of(events, "sam_encoder_offloaded")
    # The dataset's 6 train images; its 3 val images (new-data and retention) were encoded
    # by the evaluation before the first step.
    assert offloaded["images_encoded"] == 6
    assert not of(reference, "sam_encoder_offloaded")
    logs, expected = of(events, "log"), of(reference, "log")
    assert [e["step"] for e in logs] == [e["step"] for e in expected] == [1, 2, 3]
    np.testing.assert_allclose([e["loss"] for e in logs], [e["loss"] for e in expected],
                               rtol=1e-5)  # fmt: skip
    assert all(e["embedding_cache"]["misses"] == 9 for e in logs)  # nothing left to encode
    assert expected[0]["embedding_cache"]["misses"] < 9  # without: encoded as they come
    for ours, theirs in zip(of(events, "eval"), of(reference, "eval"), strict=True):
        assert ours["giou"] == pytest.approx(theirs["giou"], abs=1e-6)


def test_sigterm_saves_last_and_resume_continues_the_step_counter(dataset, tmp_path):
    run = tmp_path / "run"
    args = ["--dataset", str(dataset), "--output-dir", str(run), *BASE, "--max-steps", "400",
            "--eval-every", "1000", "--seg-rate-samples", "0"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lisa_demo.train", *args], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if (run / "events.jsonl").exists() and len(of(read_events(run), "log")) >= 3:
            break
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    events = read_events(run)
    assert events[-1]["status"] == "stopped"
    stopped_at = events[-1]["step"]
    assert 3 <= stopped_at < 400
    state = json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == stopped_at

    resumed = run_cli([*args[:-6], "--max-steps", str(stopped_at + 2), "--resume", str(run),
                       "--eval-every", "1000", "--seg-rate-samples", "0"])  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    events = read_events(run)
    starts = of(events, "start")
    assert len(starts) == 2 and starts[1]["start_step"] == stopped_at
    new_logs = [e["step"] for e in of(events, "log") if e["time"] >= starts[1]["time"]]
    assert new_logs == [stopped_at + 1, stopped_at + 2]
    history = json.loads((run / "training_history.json").read_text())
    assert [h["step"] for h in history if h["event"] == "log"][:3] == [1, 2, 3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_accelerate_run_writes_one_set_of_artifacts(dataset, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "lisa_demo.train", "--dataset", str(dataset), "--output-dir", str(tmp_path),
           *BASE, "--max-steps", "2", "--eval-every", "2"]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    events = read_events(tmp_path)
    assert len(of(events, "start")) == 1 and events[0]["world_size"] == 2
    assert len(of(events, "end")) == 1 and events[-1]["status"] == "finished"
    evals = of(events, "eval")
    # 2 new-data val images (the third is the retention set) split over 2 processes, summed
    assert evals and evals[-1]["n"] == 2 and evals[-1]["retention_n"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "/nonexistent/data"], "does not exist"),
        (["--synthetic", "4", "--learning-rate", "-1"], "--learning-rate must be positive"),
        (["--synthetic", "4", "--epochs", "0"], "nothing to train"),
        (["--synthetic", "4", "--preset", "gpt-17"], "unknown preset"),
        (["--synthetic", "4", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--synthetic", "4", "--explanation-lead", "1.5"], "--explanation-lead is a share"),
        (["--synthetic", "4", "--image-store-size", "0"], "--image-store-size must be at least 1"),
        (["--synthetic", "4", "--schedule-by-time"], "add --max-minutes"),
        (
            ["--synthetic", "4", "--synthetic-extra-queries", "-1"],
            "--synthetic-extra-queries must be >= 0",
        ),  # fmt: skip
    ],
)
def test_bad_input_stops_with_one_clear_line(args, message, tmp_path, capsys):
    assert train_main([*args, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    end = read_events(tmp_path / "out")[-1]  # the app reads why the run did not start
    assert end["event"] == "end" and end["status"] == "failed" and message in end["error"]


def test_empty_or_unusable_dataset_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    assert train_main(["--dataset", str(tmp_path / "data"), "--output-dir", str(out)]) == 2
    assert "error:" in capsys.readouterr().err
    (tmp_path / "data" / "train" / "a.json").write_text("{not json")
    (tmp_path / "data" / "train" / "a.jpg").write_bytes(b"not an image")
    assert train_main(["--dataset", str(tmp_path / "data"), "--output-dir", str(out)]) == 2
    assert "error:" in capsys.readouterr().err


def test_resume_from_another_base_is_refused_in_one_clean_line(short_run, dataset, tmp_path):
    """Refused after the models loaded: still no progress bar, library warning or traceback
    before the one `error:` line (a process of its own, so that all of stderr is seen)."""
    from lisa_demo.tiny import write_tiny_models

    other = write_tiny_models(tmp_path / "other", seed=99)
    done = run_cli(
        ["--dataset", str(dataset), "--output-dir", str(tmp_path / "o"), *BASE,
         "--llava", str(other / "llava"), "--sam", str(other / "sam"),
         "--max-steps", "1", "--resume", str(short_run)]
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "made for" in lines[0], lines


def test_eval_cli_scores_a_checkpoint_with_the_validation_code(
    short_run, dataset, capsys, tmp_path
):
    from lisa_demo.eval import main as eval_main

    # The run validated on the 1st and 3rd val images (the 2nd was its retention set).
    val = tmp_path / "val"
    val.mkdir()
    for path in sorted((dataset / "val").iterdir()):
        if path.stem.endswith(("00000", "00002")):
            (val / path.name).symlink_to(path)
    best = short_run / "checkpoints" / "best"
    code = eval_main(
        ["--dataset", str(val), "--checkpoint", str(best), "--preset", "tiny-random",
         "--json", "--seg-rate", "2"]
    )  # fmt: skip
    assert code == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["n"] == 2 and 0.0 <= scores["giou"] <= 1.0 and 0.0 <= scores["ciou"] <= 1.0
    assert scores["seg_rate_n"] == 2
    per_sample = json.loads((best / "eval_val.json").read_text())["per_sample"]
    assert (
        len(per_sample) == 2 and {"image", "iou", "intersection", "union"} <= per_sample[0].keys()
    )
    # The same numbers as the run's own validation at the step it saved `best`.
    saved = json.loads((best / "trainer_state.json").read_text())["metrics"]
    assert scores["giou"] == pytest.approx(saved["giou"], abs=1e-6)


def test_vision_feature_cache_only_when_the_vision_side_is_frozen():
    """LoRA runs (vision tower and projector frozen) may cache LLaVA's vision features;
    --train-all trains them, so it must not."""
    from lisa_demo.config import preset
    from lisa_demo.loading import load_lisa
    from lisa_demo.train.loop import _vision_trains

    lora = load_lisa(preset("tiny-random").replace(use_lora=True), device="cpu", for_training=True)
    assert not _vision_trains(lora.model)
    full = load_lisa(preset("tiny-random").replace(train_all=True), device="cpu", for_training=True)
    assert _vision_trains(full.model)


def test_image_store_keeps_the_most_recent_images_up_to_its_size(dataset, tiny_loaded):
    from lisa_demo.data.reasonseg import ReasonSegDataset
    from lisa_demo.train.data import SampleBatcher

    data = ReasonSegDataset(dataset / "train", queries="first")
    batcher = SampleBatcher(tiny_loaded.processor, tiny_loaded.sam_processor, image_capacity=2)
    store = batcher.images
    first = store.get(data[0]).encoded
    assert store.get(data[0]).encoded is first  # kept: no second decode
    store.get(data[1])
    store.get(data[0])  # data[0] is now the most recent, data[1] the oldest
    store.get(data[2])  # over capacity: data[1] leaves
    kept = [data[i].record.json_path for i in (0, 2)]
    assert list(store._masks) == kept and len(store._images) == 2
    assert store.get(data[0]).encoded is first
    assert store.get(data[1]) is not None and len(store._images) == len(store._masks) == 2
    assert list(store._masks) == [data[i].record.json_path for i in (0, 1)]  # data[2] left


def test_image_store_decodes_a_hard_linked_image_once(tmp_path, tiny_loaded):
    from lisa_demo.data.reasonseg import ReasonSegDataset
    from lisa_demo.train.data import SampleBatcher

    generate_dataset(tmp_path, {"train": 3}, seed=1, extra_queries=1)
    data = ReasonSegDataset(tmp_path / "train", queries="first")
    assert len(data) == 6  # three scenes, each with one extra query on the same image
    batcher = SampleBatcher(tiny_loaded.processor, tiny_loaded.sam_processor)
    store = batcher.images
    prepared = {data[i].record.json_path.stem: store.get(data[i]) for i in range(len(data))}
    assert len(store._images) == 3 and len(store._masks) == 6
    for name in ("train_00000", "train_00001", "train_00002"):
        first, extra = prepared[name], prepared[f"{name}_x1"]
        assert extra.encoded is first.encoded  # one decode per image file
        assert not np.array_equal(extra.mask, first.mask)  # each query keeps its own mask


def test_synthetic_extra_queries_add_training_samples_about_other_shapes(tmp_path):
    from types import SimpleNamespace

    from lisa_demo.train.loop import prepare_datasets
    from lisa_demo.train.options import parse_args

    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    sizes = {}
    for extra in (0, 1):
        cfg = parse_args(["--synthetic", "8", "--synthetic-seed", "2", "--synthetic-extra-queries",
                          str(extra), "--output-dir", str(tmp_path / str(extra))])  # fmt: skip
        train, val = prepare_datasets(cfg, accelerator)
        sizes[extra] = (len(train.records), len(val.records))
    # One more sample per training scene (every one of these 8 scenes has another shape a
    # query can name); the validation scenes stay one query each.
    assert sizes == {0: (8, 4), 1: (16, 4)}


def test_look_alikes_reach_the_generated_training_scenes(tmp_path):
    from types import SimpleNamespace

    from lisa_demo.config import ConfigError
    from lisa_demo.train.loop import prepare_datasets
    from lisa_demo.train.options import parse_args

    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    argv = ["--synthetic", "12", "--focus-concept", "heart", "--look-alikes", "diamond",
            "--look-alike-share", "1", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    cfg = parse_args(argv)
    train, val = prepare_datasets(cfg, accelerator)
    for path in [
        *(tmp_path / "run/data/train").glob("*.json"),
        *(tmp_path / "run/data/val").glob("*.json"),
    ]:
        objects = json.loads(path.read_text())["objects"]
        assert any(o["kind"] == "diamond" and not o["target"] for o in objects)
    out = str(tmp_path / "bad")
    for split in ("train", "val"):
        (tmp_path / "ds" / split).mkdir(parents=True)
    for argv, message in (
        (["--dataset", str(tmp_path / "ds"), "--look-alikes", "diamond"], "needs --synthetic"),
        (["--synthetic", "4", "--focus-concept", "heart", "--look-alikes", "heart"], "focus"),
        (["--synthetic", "4", "--look-alikes", "star", "--look-alike-share", "2"], "share"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_args([*argv, "--output-dir", out])


def test_schedule_by_time_follows_whichever_is_further_along():
    # Cosine from 1.0 over steps 10..110 (warm-up 10 steps): at step 60 the steps alone are
    # half-way, lr = 0.5 * (1 + cos(pi / 2)) = 0.5.
    assert lr_at(60, 110, 10, "cosine", 1.0) == pytest.approx(0.5)
    assert lr_at(60, 110, 10, "cosine", 1.0, time_spent=0.2) == pytest.approx(0.5)
    # The clock is further along (3/4 of the budget spent): 0.5 * (1 + cos(3 pi / 4)).
    assert lr_at(60, 110, 10, "cosine", 1.0, time_spent=0.75) == pytest.approx(0.1464466, abs=1e-6)
    assert lr_at(60, 110, 10, "linear", 1.0, time_spent=0.75) == pytest.approx(0.25)
    assert lr_at(60, 110, 10, "cosine", 1.0, time_spent=1.0) == pytest.approx(0.0)
    # The warm-up and a constant schedule do not follow the clock.
    assert lr_at(4, 110, 10, "cosine", 1.0, time_spent=0.9) == pytest.approx(0.5)
    assert lr_at(60, 110, 10, "constant", 1.0, time_spent=0.9) == 1.0


def test_estimate_times_a_few_steps_and_trains_nothing(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    code = train_main(
        ["--dataset", str(dataset), "--output-dir", str(out), *BASE, "--max-steps", "500",
         "--eval-every", "100", "--seg-rate-samples", "0", "--estimate"]
    )  # fmt: skip
    assert code == 0
    estimate = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert estimate["total_steps"] == 500 and estimate["evaluations"] == 5
    assert estimate["step_s"] > 0 and estimate["eval_s"] > 0 and estimate["startup_s"] > 0
    expected = estimate["startup_s"] + 500 * estimate["step_s"] + 5 * estimate["eval_s"]
    assert estimate["total_s"] == pytest.approx(expected, abs=0.2)
    events = read_events(out)
    assert [e["event"] for e in events][-2:] == ["estimate", "end"]
    assert events[-1]["status"] == "estimated"
    assert not of(events, "log") and not (out / "checkpoints").exists()


def test_resume_keeps_this_process_optimizer_implementation(tmp_path):
    """Checkpoints saved with a fused AdamW (as CPU runs before 2026-12-04 did) resume on the
    default one: hyperparameters and moments from the file, the implementation from here."""
    import torch

    from lisa_demo.train.state import load_optimizer, save_optimizer

    params = [torch.nn.Parameter(torch.ones(3))]
    fused = torch.optim.AdamW(params, lr=0.5, fused=True)
    params[0].grad = torch.ones(3)
    fused.step()
    save_optimizer(fused, tmp_path)
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    load_optimizer(plain, tmp_path)
    group = plain.param_groups[0]
    assert group["lr"] == 0.5  # the checkpoint's hyperparameters
    assert not group["fused"]  # this optimizer's implementation
    state = next(iter(plain.state.values()))
    assert torch.equal(state["exp_avg"], next(iter(fused.state.values()))["exp_avg"])
