"""Path arguments of the command-line tools, checked before any work is done.

Every CLI lists its path arguments as (flag, value, kind) and calls check_cli_paths first: a
file where a folder is expected (or the reverse), a missing input, or an output that cannot be
created gives one line `error: ...` and exit status 2. No torch here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lisa_demo.atomic import complete_folder
from lisa_demo.config import ConfigError

FOLDER = "folder"  # an existing folder: a dataset, a run folder, predictions, a model
FILE = "file"  # an existing file: an image, an explanations JSON
CHECKPOINT = "checkpoint"  # an existing folder, or one a write killed midway left complete
OUTPUT_FOLDER = "output folder"  # an existing folder, or one that can be created
OUTPUT_FILE = "output file"  # a file (existing or not) in a folder that exists or can be made
MODEL = "model"  # a Hub id (checked by the loader), or a local folder
KINDS = (FOLDER, FILE, CHECKPOINT, OUTPUT_FOLDER, OUTPUT_FILE, MODEL)
CHECKPOINT_FOLDER = "a checkpoint folder written by training (RUN/checkpoints/best or last)"


class PathError(ConfigError):
    """A path argument that cannot work; the message names the flag and the path."""


def _looks_local(value: str) -> bool:
    """A model source that can only be a folder (a Hub id is NAME or OWNER/NAME)."""
    return value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1


def _creatable(flag: str, path: Path, what: str) -> None:
    """`path` (missing) can be created: its nearest existing ancestor is a writable folder."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PathError(f"{flag} {path}: {ancestor} is a file, so no {what} can be made there")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PathError(f"{flag} {path}: cannot create it, {ancestor} is not writable")


def check_path(
    flag: str, value: str | os.PathLike | None, kind: str, expected: str | None = None
) -> None:
    """Raise PathError when `value` cannot serve as `kind` (see the constants); None passes.

    expected: what the flag wants, for the message ("a ReasonSeg folder ...")."""
    if value is None:
        return
    if kind not in KINDS:
        raise ValueError(f"unknown path kind {kind!r}")
    want = expected or {FILE: "a file", OUTPUT_FILE: "a file name"}.get(kind, "a folder")
    path = Path(value)
    if kind == MODEL:
        if path.exists() and not path.is_dir():
            raise PathError(f"{flag} {path} is a file; pass a model folder or a Hub id")
        if not path.exists() and _looks_local(str(value)):
            raise PathError(f"{flag} {path} does not exist; pass a model folder or a Hub id")
        return
    if kind == FILE:
        if path.is_dir():
            raise PathError(f"{flag} {path} is a folder, not a file; pass {want}")
        if not path.exists():
            raise PathError(f"{flag} {path}: file not found; pass {want}")
        return
    if kind in (FOLDER, CHECKPOINT):
        if path.exists() and not path.is_dir():
            raise PathError(f"{flag} {path} is a file, not a folder; pass {want}")
        found = complete_folder(path) if kind == CHECKPOINT else (path if path.is_dir() else None)
        if found is None:
            raise PathError(f"{flag} {path} does not exist; pass {want}")
        return
    if kind == OUTPUT_FOLDER:
        if path.exists() and not path.is_dir():
            raise PathError(f"{flag} {path} is a file, not a folder; pass {want}")
        if path.is_dir():
            if not os.access(path, os.W_OK | os.X_OK):
                raise PathError(f"{flag} {path} is not writable; pass another folder")
            return
        _creatable(flag, path, "folder")
        return
    if path.is_dir():  # OUTPUT_FILE
        raise PathError(f"{flag} {path} is a folder, not a file; pass {want}")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise PathError(f"{flag} {path} is not writable; pass another file")
        return
    _creatable(flag, path, "file")


def check_paths(*arguments: tuple) -> None:
    """check_path for each (flag, value, kind[, expected]), in order: the first problem
    raises."""
    for argument in arguments:
        check_path(*argument)


def check_cli_paths(*arguments: tuple) -> int:
    """check_paths for a CLI's main: 0 when every path is fine, else print `error: ...` on
    stderr and return the exit status 2."""
    try:
        check_paths(*arguments)
    except PathError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
