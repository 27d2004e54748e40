"""A kill at every step of a run's checkpoint writes leaves `best` and `last` loadable by the
real readers: resume, the loader behind infer and eval, and the app's run list and downloads.

The trainer's own write_checkpoint runs in a forked child that os._exit()s at the k-th
filesystem step (tests/test_atomic.py counts them); the parent then reads what is on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

from lisa_demo import checkpoint as ckpt
from lisa_demo.loading import load_lisa
from lisa_demo.train import state as train_state
from lisa_demo.train.loop import (
    Progress,
    build_optimizer,
    remove_leftovers,
    resume_folder,
    write_checkpoint,
)
from lisa_demo.train.options import parse_args
from lisa_demo.train.state import load_optimizer, load_trainer_state
from lisa_demo.ui.models import find_checkpoint_specs
from lisa_demo.ui.runs import Checkpoint, RunState, has_checkpoint, zip_checkpoint
from tests.test_atomic import KILLED, Faults

KINDS = ("best", "last")


@dataclasses.dataclass
class Trainer:
    cfg: object
    loaded: object
    params: list
    optimizer: torch.optim.Optimizer

    def save(self, run: Path, step: int) -> None:
        """Checkpoints best and last of version `step`: every trainable weight = step / 100."""
        with torch.no_grad():
            for p in self.params:
                p.fill_(step / 100)
        cfg = dataclasses.replace(self.cfg, output_dir=run)
        progress = Progress(step=step, best_metric=step / 10)
        for kind in KINDS:
            write_checkpoint(kind, cfg, self.loaded, self.loaded.model, self.optimizer,
                             progress, {"giou": step / 10})  # fmt: skip


@pytest.fixture(scope="module")
def trainer(tmp_path_factory) -> Trainer:
    out = tmp_path_factory.mktemp("template")
    cfg = parse_args(["--synthetic", "4", "--preset", "tiny-random", "--output-dir", str(out)])
    loaded = load_lisa(cfg.model, device="cpu", for_training=True)
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    for p in params:  # one step, so that the optimizer has state to save and resume
        p.grad = torch.full_like(p, 0.01)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return Trainer(cfg, loaded, params, optimizer)


def install(faults: Faults, patch) -> None:
    faults.install(patch)
    for module in (ckpt, train_state):  # safetensors writes the weights and optimizer state
        patch(module, "save_file", faults.wrap("save_file", module.save_file))


def killed_save(trainer: Trainer, run: Path, step: int, at: float) -> int:
    pid = os.fork()
    if pid == 0:  # the child never returns to pytest
        try:
            install(Faults(at, lambda: os._exit(KILLED)), setattr)
            trainer.save(run, step)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def read_like_every_reader(trainer: Trainer, run: Path) -> dict[str, int]:
    """The version (step) of best and last as each reader sees it; fails if one cannot."""
    seen = {}
    for kind in KINDS:
        folder = run / "checkpoints" / kind
        assert has_checkpoint(folder), kind  # the app's run list
        step = ckpt.read_manifest(folder)["step"]
        ckpt.load_trainable_state(folder, trainer.loaded.model)  # the loader's two reads
        assert all(torch.all(p == step / 100) for p in trainer.params), kind
        state = RunState(run_id=run.name, run_dir=run)  # the app's download of the folder
        zipped = zip_checkpoint(state, Checkpoint(kind, step, str(folder)))
        with zipfile.ZipFile(zipped) as zf:
            names = set(zf.namelist())
        assert {f"{kind}/manifest.json", f"{kind}/trainable.safetensors"} <= names
        seen[kind] = step
    assert RunState(run_id=run.name, run_dir=run).best_checkpoint() == run / "checkpoints/best"
    specs = find_checkpoint_specs(run.parent, fallback_preset="tiny-random")
    assert sorted(spec.label.split(" · ")[1] for spec in specs) == ["best", "last"]
    resume = resume_folder(run)  # resuming: trainer state and optimizer of `last`
    assert load_trainer_state(resume)["step"] == seen["last"]
    load_optimizer(trainer.optimizer, resume)
    return seen


def test_a_kill_at_every_step_of_the_checkpoint_writes(trainer, tmp_path, monkeypatch):
    run = tmp_path / "count" / "run"
    trainer.save(run, 1)
    with monkeypatch.context() as patch:
        counter = Faults(float("inf"), lambda: None)
        install(counter, patch.setattr)
        trainer.save(run, 2)
    n_steps = len(counter.log)
    assert counter.log.count("rename") == 4 and counter.log.count("save_file") == 4
    missing = []
    history = []
    for at in range(1, n_steps + 1):
        run = tmp_path / str(at) / "run"
        trainer.save(run, 1)
        assert killed_save(trainer, run, 2, at) == KILLED
        if not all((run / "checkpoints" / kind).is_dir() for kind in KINDS):
            missing.append(at)  # a name is missing: readers must recover the complete copy
        seen = read_like_every_reader(trainer, run)
        history.append((seen["best"], seen["last"]))
        remove_leftovers(run)  # what the next run in this folder does first
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]
        for kind in KINDS:  # the same versions, now under their own names
            assert ckpt.read_manifest(run / "checkpoints" / kind)["step"] == seen[kind]
    assert len(missing) == 2  # between the two renames of best, then of last
    # Each kind turns from version 1 to 2 once, best before last, and never back.
    assert history == sorted(history) and history[0] == (1, 1) and history[-1] == (2, 2)


def test_the_loader_and_clis_read_a_checkpoint_caught_between_its_renames(
    trainer, tmp_path, scene_image, capsys
):
    """infer (through the CLI's path checks and the loader) and a real resume, on a run
    killed with `last` and then `best` moved aside and their new copies not yet renamed."""
    from PIL import Image

    from lisa_demo.infer.cli import main as infer_main
    from lisa_demo.train.__main__ import main as train_main

    run = tmp_path / "run"
    trainer.save(run, 1)
    with pytest.MonkeyPatch.context() as patch:
        counter = Faults(float("inf"), lambda: None)
        install(counter, patch.setattr)
        trainer.save(run, 2)
    second_rename_of_best = [i for i, s in enumerate(counter.log, 1) if s == "rename"][1]
    trainer.save(run, 1)
    assert killed_save(trainer, run, 2, second_rename_of_best) == KILLED
    best = run / "checkpoints" / "best"
    assert not best.exists()
    loaded = load_lisa(trainer.cfg.model, checkpoint=best, device="cpu")
    assert all(torch.all(p == 0.02) for n, p in loaded.model.named_parameters() if "lora_" in n)
    image = tmp_path / "scene.png"
    Image.fromarray(scene_image).save(image)
    argv = ["--image", str(image), "--query", "the red square", "--preset", "tiny-random"]
    code = infer_main([*argv, "--checkpoint", str(best), "--out-dir", str(tmp_path / "masks")])
    assert code == 0, capsys.readouterr().err

    code = train_main(
        ["--synthetic", "4", "--preset", "tiny-random", "--output-dir", str(run),
         "--resume", str(run), "--max-steps", "3", "--seg-rate-samples", "0"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    start = next(e for e in _events(run) if e["event"] == "start")
    assert start["start_step"] == 1  # `last` still held version 1 when the kill came
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]
    assert load_trainer_state(run / "checkpoints" / "last")["step"] == 3


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
