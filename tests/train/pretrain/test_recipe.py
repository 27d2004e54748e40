"""The pretraining recipe through the training CLI: warm-ups, its losses, frozen encoders,
warmed checkpoints, and the core that never imports it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lisa_demo.checkpoint import WEIGHTS
from lisa_demo.data.synthetic import generate_dataset
from lisa_demo.train.__main__ import main as train_main

BASE = ["--preset", "tiny-random", "--batch-size", "2", "--seg-rate-samples", "0"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    generate_dataset(root, {"train": 6, "val": 2}, seed=5)
    return root


def _params_of(run: Path, kind: str = "last") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / kind / WEIGHTS))


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def _initial() -> dict[str, torch.Tensor]:
    from lisa_demo.config import preset
    from lisa_demo.loading import load_lisa

    model = load_lisa(preset("tiny-random").replace(train_all=True), device="cpu").model
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(saved: dict, initial: dict, prefix: str) -> bool:
    names = [n for n in saved if n.startswith(prefix)]
    assert names, prefix
    return any(not torch.equal(saved[n], initial[n]) for n in names)


def test_warmups_train_the_encoders_and_the_target_loss_is_logged(scenes, tmp_path):
    """--train-all with both warm-ups, --target-weight and --pointing-weight: each warm-up
    reports and changes its encoder, the LISA loop logs the target and pointing losses, and
    the exported model carries the warmed-up encoders but no training-only head."""
    from lisa_demo.config import preset
    from lisa_demo.loading import load_lisa

    out = tmp_path / "run"
    code = train_main(
        ["--dataset", str(scenes), "--output-dir", str(out), *BASE, "--train-all",
         "--vision-warmup-minutes", "0.05", "--sam-warmup-minutes", "0.05",
         "--target-weight", "1", "--pointing-weight", "1", "--max-steps", "2", "--eval-every", "2",
         "--learning-rate", "1e-3", "--export-model"]
    )  # fmt: skip
    assert code == 0
    events = _events(out)
    assert events[0]["event"] == "start"  # readers (bundle, app) take the run's config there
    done = {e["stage"]: e for e in events if e["event"] == "warmup_done"}
    assert set(done) == {"vision", "sam"} and all(d["steps"] >= 1 for d in done.values())
    logs = [e for e in events if e["event"] == "log"]
    assert logs and all(e["target_loss"] is not None and e["target_loss"] > 0 for e in logs)
    assert all(e["pointing_loss"] is not None and e["pointing_loss"] > 0 for e in logs)
    saved, initial = _params_of(out), _initial()
    assert _changed(saved, initial, "sam.vision_encoder.")
    assert _changed(saved, initial, "llava.model.vision_tower.")
    assert any(n.startswith("description_prompts.") for n in saved)
    exported = load_lisa(preset("tiny-random").replace(
        llava=str(out / "model" / "llava"), sam=str(out / "model" / "sam"),
        heads=str(out / "model"), build_tiny=False), device="cpu")  # fmt: skip
    assert not hasattr(exported.model, "target_head")
    assert not hasattr(exported.model, "description_prompts")
    tower = dict(exported.model.named_parameters())
    name = next(n for n in saved if n.startswith("sam.vision_encoder."))
    assert torch.equal(tower[name].detach(), saved[name].to(tower[name].dtype))


def test_seg_word_head_trains_is_logged_and_stays_out_of_inference(scenes, tmp_path):
    """--seg-word-weight adds the training-only head: its loss is logged, and the checkpoint
    (which keeps the head, for resuming) still loads into a model built without it."""
    from lisa_demo.checkpoint import load_trainable_state
    from lisa_demo.config import preset
    from lisa_demo.loading import load_lisa

    out = tmp_path / "run"
    code = train_main(
        ["--dataset", str(scenes), "--output-dir", str(out), *BASE, "--max-steps", "2",
         "--eval-every", "2", "--explanations", str(scenes / "train_explanations.json"),
         "--seg-word-weight", "1.0"]
    )  # fmt: skip
    assert code == 0
    logs = [e for e in _events(out) if e["event"] == "log"]
    assert logs and all(e["seg_word_loss"] is not None and e["seg_word_loss"] > 0 for e in logs)
    assert any(n.startswith("seg_word_head.") for n in _params_of(out, "best"))
    plain = load_lisa(preset("tiny-random").replace(use_lora=True), device="cpu")
    assert not hasattr(plain.model, "seg_word_head")
    load_trainable_state(out / "checkpoints" / "best", plain.model)  # no "unexpected" error


def test_frozen_encoders_stay_as_they_were_while_the_rest_trains(scenes, tmp_path):
    out = tmp_path / "run"
    code = train_main(
        ["--dataset", str(scenes), "--output-dir", str(out), *BASE, "--train-all",
         "--freeze-encoders", "--max-steps", "3", "--eval-every", "3", "--learning-rate", "1e-3"]
    )  # fmt: skip
    assert code == 0
    saved, initial = _params_of(out), _initial()
    for prefix in ("sam.vision_encoder.", "llava.model.vision_tower.",
                   "llava.model.multi_modal_projector."):  # fmt: skip
        assert not _changed(saved, initial, prefix), prefix
    assert _changed(saved, initial, "llava.model.language_model.")
    assert _changed(saved, initial, "sam.mask_decoder.")


def test_warmups_need_train_all(scenes, tmp_path, capsys):
    code = train_main(["--dataset", str(scenes), "--output-dir", str(tmp_path / "r"), *BASE,
                       "--sam-warmup-minutes", "1"])  # fmt: skip
    assert code != 0
    assert "--train-all" in capsys.readouterr().err


def test_warmup_learning_rates_reach_their_stages(scenes, tmp_path, monkeypatch):
    """--vision-warmup-lr and --sam-warmup-lr are the peak rates each warm-up runs with."""
    from lisa_demo.train.pretrain import warmup

    seen = {}

    def record(stage):
        def run(*args, learning_rate, **kwargs):
            seen[stage] = learning_rate
            return {"stage": stage, "steps": 0, "seconds": 0.0}

        return run

    monkeypatch.setattr(warmup, "warm_up_vision", record("vision"))
    monkeypatch.setattr(warmup, "warm_up_sam", record("sam"))
    code = train_main(
        ["--dataset", str(scenes), "--output-dir", str(tmp_path / "r"), *BASE, "--train-all",
         "--vision-warmup-minutes", "1", "--sam-warmup-minutes", "1", "--vision-warmup-lr",
         "3e-3", "--sam-warmup-lr", "2e-3", "--max-steps", "1", "--eval-every", "1"]
    )  # fmt: skip
    assert code == 0
    assert seen == {"vision": 3e-3, "sam": 2e-3}


@pytest.mark.parametrize("flag", ["--vision-warmup-lr", "--sam-warmup-lr"])
def test_warmup_learning_rates_must_be_positive(scenes, tmp_path, capsys, flag):
    code = train_main(["--dataset", str(scenes), "--output-dir", str(tmp_path / "r"), *BASE,
                       "--train-all", "--vision-warmup-minutes", "1", flag, "0"])  # fmt: skip
    assert code != 0
    assert f"{flag} must be > 0" in capsys.readouterr().err


ENCODERS = (
    "sam.vision_encoder.",
    "llava.model.vision_tower.",
    "llava.model.multi_modal_projector.",
)


def test_save_warmed_then_init_from_starts_a_fresh_loop_on_the_warmed_weights(scenes, tmp_path):
    """--save-warmed writes checkpoints/warmed between the warm-ups and the LISA loop (step 0,
    the warmed encoders, the training-only prompts); --init-from starts a new run on exactly
    those weights with no warm-up and a fresh step count, and (frozen) keeps its encoders."""
    warm = tmp_path / "warm"
    code = train_main(
        ["--dataset", str(scenes), "--output-dir", str(warm), *BASE, "--train-all",
         "--vision-warmup-minutes", "0.05", "--sam-warmup-minutes", "0.05", "--target-weight", "1",
         "--freeze-encoders", "--save-warmed", "--max-steps", "2", "--eval-every", "2",
         "--learning-rate", "1e-3"]
    )  # fmt: skip
    assert code == 0
    kinds = [(e["kind"], e["step"]) for e in _events(warm) if e["event"] == "checkpoint"]
    assert kinds[0] == ("warmed", 0)
    state = json.loads((warm / "checkpoints" / "warmed" / "trainer_state.json").read_text())
    assert state["step"] == 0
    warmed, last, initial = _params_of(warm, "warmed"), _params_of(warm), _initial()
    assert any(n.startswith("description_prompts.") for n in warmed)
    for prefix in ENCODERS[:2]:
        assert _changed(warmed, initial, prefix), prefix  # the warm-ups trained them
    assert _changed(last, warmed, "llava.model.language_model.")  # the loop came after

    run = tmp_path / "from-warm"
    code = train_main(
        ["--dataset", str(scenes), "--output-dir", str(run), *BASE, "--train-all",
         "--target-weight", "1", "--freeze-encoders", "--init-from", str(warm), "--max-steps", "2",
         "--eval-every", "2", "--learning-rate", "1e-3"]
    )  # fmt: skip
    assert code == 0
    events = _events(run)
    start = events[0]
    assert start["event"] == "start" and start["start_step"] == 0
    assert start["initialized_from"] == str(warm / "checkpoints" / "warmed")
    assert not [e for e in events if e["event"].startswith("warmup")]
    assert [e["step"] for e in events if e["event"] == "eval"] == [2]  # 2 new steps, not 2 more
    saved = _params_of(run)
    for prefix in (*ENCODERS, "description_prompts."):  # the target loss pulls towards these
        assert not _changed(saved, warmed, prefix), prefix
    assert _changed(saved, warmed, "llava.model.language_model.")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--init-from", "X", "--resume", "X"], "either --resume"),
        (["--init-from", "X", "--sam-warmup-minutes", "1"], "drop --vision-warmup-minutes"),
        (["--save-warmed"], "add --vision-warmup-minutes"),
        (["--sam-warmup-minutes", "1", "--embedding-cache-dir", "C"], "drop --embedding-cache-dir"),
        (["--init-from", "NOWHERE"], "no checkpoint there"),
        (["--init-from", "MISSING"], "does not exist"),
    ],
)
def test_init_from_and_save_warmed_refuse_what_cannot_work(scenes, tmp_path, capsys, flags,
                                                           message):  # fmt: skip
    for folder in ("X", "NOWHERE"):  # folders without a checkpoint
        (tmp_path / folder).mkdir()
    flags = [str(tmp_path / f) if f in ("X", "NOWHERE", "C", "MISSING") else f for f in flags]
    code = train_main(["--dataset", str(scenes), "--output-dir", str(tmp_path / "r"), *BASE,
                       "--train-all", "--max-steps", "1", *flags])  # fmt: skip
    assert code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_the_core_never_imports_the_recipe():
    """Only the training CLI (options and __main__) and the recipe itself name it."""
    import ast

    package = Path(__file__).resolve().parents[3] / "lisa_demo"
    allowed = {"train/options.py", "train/__main__.py"}
    for path in package.rglob("*.py"):
        name = path.relative_to(package).as_posix()
        if name.startswith("train/pretrain/") or name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            assert not any("pretrain" in m for m in modules), f"{name} imports {modules}"
