"""Folders replaced atomically (checkpoints, exported models), and recovery after a kill.

write_atomically(NAME) takes four steps, T a fresh token:
    1. write everything into .NAME.tmp-T
    2. rename NAME to .NAME.old-T          (only when NAME exists)
    3. rename .NAME.tmp-T to NAME
    4. delete .NAME.old-T
A .NAME.old-T exists only after step 1 finished, so whenever a process dies, a complete folder
is left: NAME itself, or (killed between steps 2 and 3) the .NAME.tmp-T beside a .NAME.old-T.
complete_folder() finds it without changing anything (readers may run while a writer works);
recover_interrupted_writes() puts it back in place and removes the rest (a run does this when
it starts, before it writes). "Complete" means every write() call returned: a kill cannot lose
what was written, a power cut before the page cache reaches the disk can. No torch here.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

_ASIDE = re.compile(r"^\.(?P<name>.+)\.(?P<mark>tmp|old)-(?P<token>\d+(?:-\d+)?)$")


def _aside(folder: Path, mark: str, token: str) -> Path:
    return folder.with_name(f".{folder.name}.{mark}-{token}")


def write_atomically(folder: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a fresh temporary folder, then swap it in as `folder`.

    A process killed at any moment leaves the previous `folder` or the new one complete, found
    by complete_folder(); an exception leaves the previous `folder` in place.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    token = f"{time.time_ns()}-{os.getpid()}"  # wall-clock first: the newest sorts last
    tmp, old = _aside(folder, "tmp", token), _aside(folder, "old", token)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    moved = False
    try:
        if folder.exists():
            os.rename(folder, old)
            moved = True
        os.rename(tmp, folder)
    except BaseException:
        _undo_swap(folder, tmp, old, moved)
        raise
    if moved:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _undo_swap(folder: Path, tmp: Path, old: Path, moved: bool) -> None:
    """After a failed step 2 or 3: the previous folder back in place, the new one removed."""
    if moved and not folder.exists():
        try:
            os.rename(old, folder)
        except OSError:
            return  # both left as they are: complete_folder() still finds the new one
    shutil.rmtree(tmp, ignore_errors=True)


def _pending_swaps(folder: Path) -> list[Path]:
    """The .NAME.tmp-T folders that have a .NAME.old-T twin (complete ones), newest first."""
    try:
        entries = list(folder.parent.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        match = _ASIDE.match(entry.name)
        if match and match["name"] == folder.name and match["mark"] == "old":
            tmp = _aside(folder, "tmp", match["token"])
            if tmp.is_dir():
                found.append((tuple(int(part) for part in match["token"].split("-")), tmp))
    return [tmp for _, tmp in sorted(found, reverse=True)]


def complete_folder(folder: Path | str) -> Path | None:
    """The complete folder that stands for `folder`: itself, or what a write killed between
    its two renames left (see above); None when there is none. Reads only."""
    folder = Path(folder)
    if folder.is_dir():
        return folder
    if folder.exists():
        return None
    pending = _pending_swaps(folder)
    return pending[0] if pending else None


def recover_interrupted_writes(parent: Path | str) -> list[str]:
    """Finish what killed writes left in `parent`: a missing NAME gets its complete
    .NAME.tmp-T back, then every other .NAME.tmp-* and .NAME.old-* folder is deleted.

    Only for the process that owns `parent` (a run at its start), never while a write runs.
    Returns the names put back.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    leftovers = [p for p in parent.iterdir() if _ASIDE.match(p.name) and p.is_dir()]
    restored = []
    for name in sorted({_ASIDE.match(p.name)["name"] for p in leftovers}):
        folder = parent / name
        found = complete_folder(folder)
        if found is not None and found != folder:
            os.rename(found, folder)
            restored.append(name)
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return restored
