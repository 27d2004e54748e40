"""Atomic folder replacement: a fault at every step of a write leaves a complete folder.

Faults are injected, never timed: every filesystem step of write_atomically (mkdir, each file
written, each rename, the final rmtree) is counted, and the k-th one kills the process
(os._exit in a forked child) or raises.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lisa_demo.atomic import complete_folder, recover_interrupted_writes, write_atomically

FILES = ("weights.bin", "manifest.json", "state.json")
KILLED = 17


def write_version(version: str):
    def write(tmp: Path) -> None:
        for name in FILES:
            (tmp / name).write_text(f"{version}:{name}")

    return write


def version_of(folder: Path) -> str:
    """The version every file of `folder` holds (fails on a mix or a missing file)."""
    versions = {(folder / name).read_text().split(":")[0] for name in FILES}
    assert len(versions) == 1, versions
    return versions.pop()


class Faults:
    """Counts the filesystem steps of a write; step number `at` runs `fault` first.

    With `partial`, a faulted rmtree deletes one file before the fault (a kill midway)."""

    def __init__(self, at: float, fault, partial: bool = False) -> None:
        self.at, self.fault, self.partial = at, fault, partial
        self.count = 0
        self.log: list[str] = []

    def wrap(self, name: str, call):
        def step(*args, **kwargs):
            self.count += 1
            self.log.append(name)
            if self.count == self.at:
                if self.partial and name == "rmtree":
                    next(p for p in Path(args[0]).iterdir()).unlink()
                self.fault()
            return call(*args, **kwargs)

        return step

    def install(self, patch) -> None:
        """patch(owner, name, value): monkeypatch.setattr or a plain setattr."""
        patch(os, "mkdir", self.wrap("mkdir", os.mkdir))
        patch(os, "rename", self.wrap("rename", os.rename))
        patch(shutil, "rmtree", self.wrap("rmtree", shutil.rmtree))
        patch(Path, "write_text", self.wrap("write", Path.write_text))


def killed_write(folder: Path, version: str, at: float, partial: bool = False) -> int:
    """write_atomically in a forked child killed (os._exit) at step `at`; its exit code."""
    pid = os.fork()
    if pid == 0:  # the child never returns to pytest
        try:
            Faults(at, lambda: os._exit(KILLED), partial).install(setattr)
            write_atomically(folder, write_version(version))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def count_steps(tmp_path: Path, monkeypatch, previous: bool) -> list[str]:
    folder = tmp_path / "count" / "last"
    folder.parent.mkdir(parents=True)
    if previous:
        write_atomically(folder, write_version("v1"))
    with monkeypatch.context() as patch:
        faults = Faults(float("inf"), lambda: None)
        faults.install(patch.setattr)
        write_atomically(folder, write_version("v2"))
    return faults.log


def test_the_steps_counted_are_the_documented_ones(tmp_path, monkeypatch):
    # the parent (exists already), the temporary folder, its files, the swap, the clean-up
    steps = count_steps(tmp_path, monkeypatch, previous=True)
    assert steps == ["mkdir", "mkdir", "write", "write", "write", "rename", "rename", "rmtree"]
    assert count_steps(tmp_path / "b", monkeypatch, previous=False) == [
        "mkdir", "mkdir", "write", "write", "write", "rename",
    ]  # fmt: skip


def test_a_kill_at_every_step_leaves_the_old_or_the_new_folder(tmp_path, monkeypatch):
    n_steps = len(count_steps(tmp_path, monkeypatch, previous=True))
    seen = []
    for at in range(1, n_steps + 1):
        parent = tmp_path / f"kill-{at}"
        folder = parent / "last"
        write_atomically(folder, write_version("v1"))
        assert killed_write(folder, "v2", at) == KILLED
        found = complete_folder(folder)
        assert found is not None, f"nothing left after a kill at step {at}"
        seen.append(version_of(found))
        # A run starting here puts that same folder in place and leaves nothing else.
        recover_interrupted_writes(parent)
        assert sorted(p.name for p in parent.iterdir()) == ["last"]
        assert version_of(folder) == seen[-1]
    # The old folder until it is moved aside (step 6), then the new one: complete by then.
    assert seen == ["v1"] * 6 + ["v2"] * (n_steps - 6), seen
    assert killed_write(tmp_path / f"kill-{n_steps}" / "last", "v3", n_steps + 1) == 0


def test_a_kill_while_the_old_folder_is_deleted(tmp_path, monkeypatch):
    n_steps = len(count_steps(tmp_path, monkeypatch, previous=True))
    folder = tmp_path / "run" / "last"
    write_atomically(folder, write_version("v1"))
    assert killed_write(folder, "v2", n_steps, partial=True) == KILLED
    assert version_of(complete_folder(folder)) == "v2"
    recover_interrupted_writes(folder.parent)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["last"]


def test_a_kill_between_the_renames_is_read_as_the_new_folder(tmp_path):
    """The state the fault battery found: no `last`, only .last.old-* and .last.tmp-*."""
    folder = tmp_path / "checkpoints" / "last"
    write_atomically(folder, write_version("v1"))
    assert killed_write(folder, "v2", 7) == KILLED  # step 7: the second rename
    assert not folder.exists()
    names = sorted(p.name.split("-")[0] for p in folder.parent.iterdir())
    assert names == [".last.old", ".last.tmp"]
    assert version_of(complete_folder(folder)) == "v2"
    assert recover_interrupted_writes(folder.parent) == ["last"]
    assert version_of(folder) == "v2"


def test_a_kill_during_a_first_write_leaves_no_folder_and_no_leftovers(tmp_path, monkeypatch):
    n_steps = len(count_steps(tmp_path, monkeypatch, previous=False))
    for at in range(1, n_steps + 2):
        folder = tmp_path / f"first-{at}" / "best"
        folder.parent.mkdir()
        code = killed_write(folder, "v1", at)
        if at > n_steps:  # no fault
            assert code == 0 and version_of(complete_folder(folder)) == "v1"
            continue
        assert code == KILLED
        assert complete_folder(folder) is None  # killed before its one rename: no `best` yet
        recover_interrupted_writes(folder.parent)
        assert not list(folder.parent.iterdir()), "an empty .best.tmp-* stayed behind"


def test_an_exception_at_any_step_keeps_the_previous_folder(tmp_path, monkeypatch):
    n_steps = len(count_steps(tmp_path, monkeypatch, previous=True))
    for at in range(1, n_steps):  # the last step, rmtree(ignore_errors=True), never raises

        def fail(at: int = at) -> None:
            raise RuntimeError(f"injected at step {at}")

        parent = tmp_path / f"raise-{at}"
        folder = parent / "last"
        write_atomically(folder, write_version("v1"))
        with monkeypatch.context() as patch:
            Faults(at, fail).install(patch.setattr)
            with pytest.raises(RuntimeError, match="injected"):
                write_atomically(folder, write_version("v2"))
        assert version_of(folder) == "v1"
        assert sorted(p.name for p in parent.iterdir()) == ["last"]


def test_newest_pending_swap_wins_and_a_lone_old_folder_is_not_used(tmp_path):
    folder = tmp_path / "last"
    for token, version in (("100-1", "v1"), ("200-1", "v2")):
        for mark in ("old", "tmp"):
            aside = tmp_path / f".last.{mark}-{token}"
            aside.mkdir()
            write_version(version)(aside)
    assert version_of(complete_folder(folder)) == "v2"
    lone = tmp_path / "other"
    (tmp_path / ".other.old-300-1").mkdir()
    assert complete_folder(lone) is None  # its new copy is gone: the folder was deleted
    (tmp_path / "file").write_text("x")
    assert complete_folder(tmp_path / "file") is None
