"""Uploaded datasets: safe .zip extraction and the train/ + val/ layout the trainer reads.

An upload is refused, with a message saying why, when a member's path is absolute or climbs out
of the target folder, a member is a symlink, the archive holds more than MAX_ARCHIVE_FILES files
or MAX_ARCHIVE_BYTES uncompressed bytes, or it has no usable ReasonSeg sample. Extraction always
goes into a fresh folder. No gradio here.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from lisa_demo.data.reasonseg import IMAGE_EXTENSIONS, DataError, read_records

MAX_ARCHIVE_FILES = 20_000
MAX_ARCHIVE_BYTES = 4 * 1024**3  # uncompressed
MAX_COMPRESSION_RATIO = 200  # per member: more is a zip bomb, not images and JSON
VAL_FRACTION = 0.2
SKIPPED_PREFIXES = ("__MACOSX/",)
SKIPPED_NAMES = (".DS_Store", "Thumbs.db")
_CHUNK = 1 << 20


class ArchiveError(ValueError):
    """An uploaded archive that cannot be used; the message says why."""


def _member_path(info: zipfile.ZipInfo) -> PurePosixPath:
    """The member's relative path; ArchiveError if it is absolute, climbs out or is a link."""
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"refused: {info.filename!r} is an absolute path")
    if ".." in path.parts:
        raise ArchiveError(f"refused: {info.filename!r} points outside the archive's folder")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ArchiveError(f"refused: {info.filename!r} is a symbolic link")
    return path


def _check_sizes(members: list[zipfile.ZipInfo]) -> None:
    files = [m for m in members if not m.is_dir()]
    if len(files) > MAX_ARCHIVE_FILES:
        raise ArchiveError(
            f"refused: the archive holds {len(files)} files, more than the limit of "
            f"{MAX_ARCHIVE_FILES}; upload a smaller dataset"
        )
    total = sum(m.file_size for m in files)
    if total > MAX_ARCHIVE_BYTES:
        raise ArchiveError(
            f"refused: the archive unpacks to {total / 1e9:.1f} GB, more than the limit of "
            f"{MAX_ARCHIVE_BYTES / 1e9:.1f} GB"
        )
    for m in files:
        if m.compress_size and m.file_size / m.compress_size > MAX_COMPRESSION_RATIO:
            raise ArchiveError(
                f"refused: {m.filename!r} is compressed {m.file_size // m.compress_size}:1, "
                "which images and JSON never are (a zip bomb?)"
            )


def _skipped(path: PurePosixPath) -> bool:
    return path.as_posix().startswith(SKIPPED_PREFIXES) or path.name in SKIPPED_NAMES


def extract_zip(archive: str | Path, target: str | Path) -> int:
    """Extract `archive` into the new folder `target` after checking every member.

    Returns the number of files written. Raises ArchiveError (nothing is left behind).
    """
    target = Path(target)
    if target.exists():
        raise ArchiveError(f"{target} already exists; extraction needs a fresh folder")
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            paths = [_member_path(m) for m in members]
            _check_sizes(members)
            target.mkdir(parents=True)
            written = 0
            for info, rel in zip(members, paths, strict=True):
                if _skipped(rel) or not rel.parts:
                    continue
                out = target.joinpath(*rel.parts)
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
                written += 1
    except zipfile.BadZipFile as err:
        shutil.rmtree(target, ignore_errors=True)
        raise ArchiveError(f"the upload is not a readable .zip archive ({err})") from err
    except ArchiveError:
        shutil.rmtree(target, ignore_errors=True)
        raise
    except (OSError, RuntimeError, EOFError) as err:  # RuntimeError: encrypted member
        shutil.rmtree(target, ignore_errors=True)
        raise ArchiveError(f"could not extract the archive: {err}") from err
    return written


def _dataset_root(folder: Path) -> Path:
    """Descend through lone wrapper folders (e.g. the zip of one folder)."""
    while True:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in ("train", "val"):
            folder = entries[0]
        else:
            return folder


def _sample_files(folder: Path) -> dict[str, list[Path]]:
    """Files of each sample (NAME.jpg and NAME.json), by stem."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in (*IMAGE_EXTENSIONS, ".json"):
            groups.setdefault(path.stem, []).append(path)
    return groups


def _split_flat(root: Path) -> str:
    """Move a flat folder of samples into train/ and val/ (every fifth sample, by name)."""
    samples = _sample_files(root)
    if len(samples) < 2:
        raise ArchiveError(
            "the archive needs at least 2 annotated images (NAME.jpg + NAME.json), one of them "
            "for validation"
        )
    every = max(2, round(1 / VAL_FRACTION))
    for split in ("train", "val"):
        (root / split).mkdir()
    for i, files in enumerate(samples.values()):
        split = "val" if i % every == every - 1 else "train"
        for path in files:
            path.rename(root / split / path.name)
    return "no train/ and val/ folders: every fifth sample was set aside for validation"


def _count_usable(folder: Path, split: str) -> int:
    try:
        records, report = read_records(folder)
    except DataError as err:
        raise ArchiveError(f"{split}/: {err}") from err
    if not any(record.has_target for record in records):
        raise ArchiveError(f"{split}/ has no image with a target polygon ({report.summary()})")
    return len(records)


def check_dataset(root: Path) -> str:
    """A summary line for a folder with train/ and val/; ArchiveError if either is unusable."""
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ArchiveError(
                f"{root} has no {split}/ folder; expected train/ and val/ folders of "
                "NAME.jpg + NAME.json pairs (ReasonSeg layout)"
            )
    n_train = _count_usable(root / "train", "train")
    n_val = _count_usable(root / "val", "val")
    return f"{n_train} train and {n_val} val images"


def prepare_uploaded_dataset(archive: str | Path, target: str | Path) -> tuple[Path, str]:
    """Extract an uploaded zip and return (dataset folder with train/ and val/, summary).

    Accepts train/ + val/ folders (optionally inside one top folder) or a flat folder of
    NAME.jpg + NAME.json pairs, which is split 80/20.
    """
    target = Path(target)
    count = extract_zip(archive, target)
    if count == 0:
        raise ArchiveError("the archive is empty")
    root = _dataset_root(target)
    notes = []
    if not (root / "train").is_dir():
        notes.append(_split_flat(root))
    elif not (root / "val").is_dir():
        train = root / "train"
        notes.append(_split_flat(train))
        (train / "val").rename(root / "val")
        (train / "train").rename(root / "train.tmp")
        shutil.rmtree(train)  # only files that were no sample are left in it
        (root / "train.tmp").rename(train)
    summary = check_dataset(root)
    return root, "; ".join([f"{count} files extracted", summary, *notes])
