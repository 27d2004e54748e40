"""Uploaded datasets: the archive's table of contents is checked first, then only the files
the dataset uses are unpacked, as the train/ + val/ layout the trainer reads.

Before one byte is written, an upload is refused, with a message naming the problem, when a
member's path is absolute or climbs out of the archive, a member is a symlink, the archive
holds more than MAX_ARCHIVE_FILES files or MAX_ARCHIVE_BYTES uncompressed bytes, a member is
compressed more than MAX_COMPRESSION_RATIO:1, the layout has no NAME.jpg|png + NAME.json pairs
(in train/ and optionally val/, or in one flat folder; lone wrapper folders are fine), a file it
uses is larger than MAX_FILE_BYTES, or the disk lacks the room. Then only those pairs are
unpacked, into a fresh folder. No gradio here.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lisa_demo.data.reasonseg import IMAGE_EXTENSIONS, DataError, read_records

MAX_ARCHIVE_FILES = 20_000
MAX_ARCHIVE_BYTES = 4 * 1024**3  # uncompressed
MAX_FILE_BYTES = 64 * 1024**2  # one image or annotation, uncompressed
MAX_COMPRESSION_RATIO = 200  # per member: more is a zip bomb, not images and JSON
DISK_RESERVE_BYTES = 512 * 1024**2  # left free after unpacking, for checkpoints and logs
VAL_FRACTION = 0.2
SKIPPED_PREFIXES = ("__MACOSX/",)
SKIPPED_NAMES = (".DS_Store", "Thumbs.db")
SPLITS = ("train", "val")
PAIR = "NAME.jpg|.png + NAME.json pairs"
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
    """Archiver junk and hidden files (the dataset reader skips hidden files too)."""
    return (
        path.as_posix().startswith(SKIPPED_PREFIXES)
        or path.name in SKIPPED_NAMES
        or any(part.startswith(".") for part in path.parts)
    )


@dataclass
class ExtractionPlan:
    """What an archive's table of contents says will be unpacked, and where."""

    root: PurePosixPath  # the wrapper folders inside the archive (kept in the target)
    files: list[tuple[zipfile.ZipInfo, str]]  # (member, "train/NAME.ext" or "val/NAME.ext")
    notes: list[str] = field(default_factory=list)
    left_out: int = 0  # files of the archive that are no part of a pair

    @property
    def total_bytes(self) -> int:
        return sum(info.file_size for info, _ in self.files)


def _layout_root(paths: list[PurePosixPath]) -> PurePosixPath:
    """The folder the data is in: descend through lone wrapper folders (a zip of a folder)."""
    root = PurePosixPath()
    while True:
        rest = [path.relative_to(root) for path in paths]
        tops = {r.parts[0] for r in rest}
        if len(tops) != 1 or any(len(r.parts) == 1 for r in rest) or tops <= set(SPLITS):
            return root
        root = root / tops.pop()


def _pairs(files: dict[str, zipfile.ZipInfo], where: str, at_least: int = 1) -> dict[str, list]:
    """stem -> [image name, annotation name] of one folder's files (the first image of
    IMAGE_EXTENSIONS wins, as in the dataset reader); ArchiveError below `at_least` pairs."""
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    images: dict[str, tuple[int, str]] = {}
    jsons: dict[str, str] = {}
    for name in sorted(files):
        path = PurePosixPath(name)
        suffix = path.suffix.lower()
        if suffix == ".json":
            jsons[path.stem] = name
        elif suffix in rank and (path.stem not in images or rank[suffix] < images[path.stem][0]):
            images[path.stem] = (rank[suffix], name)
    stems = sorted(images.keys() & jsons.keys())
    if len(stems) < at_least:
        need = (
            f"has no {PAIR}"
            if at_least == 1
            else f"needs at least {at_least} annotated images ({PAIR}), one of them for validation"
        )
        raise ArchiveError(
            f"{where} {need}: it holds {len(images)} images and {len(jsons)} annotation files, "
            f"{len(stems)} of them paired (each image needs its NAME.json beside it); expected "
            f"train/ and optionally val/ folders of {PAIR}"
        )
    return {stem: [images[stem][1], jsons[stem]] for stem in stems}


def _split_off_val(pairs: dict[str, list]) -> tuple[dict, dict]:
    """Every fifth sample (by name) for validation, the rest for training."""
    every = max(2, round(1 / VAL_FRACTION))
    stems = sorted(pairs)
    val = {s: pairs[s] for i, s in enumerate(stems) if i % every == every - 1}
    return {s: pairs[s] for s in stems if s not in val}, val


def plan_extraction(members: list[zipfile.ZipInfo]) -> ExtractionPlan:
    """Check an archive's table of contents and decide which members are unpacked where.

    Raises ArchiveError, naming the problem, before anything is written."""
    paths = [_member_path(m) for m in members]
    _check_sizes(members)
    files = {
        path: info
        for info, path in zip(members, paths, strict=True)
        if not info.is_dir() and path.parts and not _skipped(path)
    }
    if not files:
        raise ArchiveError("the archive is empty")
    root = _layout_root(list(files))
    folders: dict[tuple[str, ...], dict[str, zipfile.ZipInfo]] = {}
    for path, info in files.items():
        inner = path.relative_to(root)
        folders.setdefault(inner.parts[:-1], {})[inner.name] = info
    notes = []
    if any(path.relative_to(root).parts[0] == "train" for path in files):
        has_val = ("val",) in folders
        train = _pairs(folders.get(("train",), {}), "train/", at_least=1 if has_val else 2)
        if has_val:
            splits = {"train": train, "val": _pairs(folders[("val",)], "val/")}
            sources = {"train": ("train",), "val": ("val",)}
        else:
            splits = dict(zip(SPLITS, _split_off_val(train), strict=True))
            sources = {"train": ("train",), "val": ("train",)}
            notes.append("no val/ folder: every fifth train/ sample was set aside for validation")
    else:
        where = "the archive" if not root.parts else f"{root}/"
        pairs = _pairs(folders.get((), {}), where, at_least=2)
        splits = dict(zip(SPLITS, _split_off_val(pairs), strict=True))
        sources = {"train": (), "val": ()}
        notes.append("no train/ and val/ folders: every fifth sample was set aside for validation")
    planned = []
    for split, pairs in splits.items():
        for names in pairs.values():
            for name in names:
                info = folders[sources[split]][name]
                if info.file_size > MAX_FILE_BYTES:
                    raise ArchiveError(
                        f"refused: {info.filename!r} unpacks to {info.file_size / 2**20:.0f} "
                        f"MiB, more than the limit of {MAX_FILE_BYTES / 2**20:.0f} MiB per file"
                    )
                planned.append((info, f"{split}/{name}"))
    return ExtractionPlan(root, planned, notes, left_out=len(files) - len(planned))


def _check_free_space(target: Path, needed: int) -> None:
    existing = target
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed + DISK_RESERVE_BYTES > free:
        raise ArchiveError(
            f"refused: the dataset unpacks to {needed / 1e9:.2f} GB and the server's disk has "
            f"{free / 1e9:.2f} GB free ({DISK_RESERVE_BYTES / 1e9:.1f} GB must stay free for "
            "training); upload a smaller dataset"
        )


def extract_zip(archive: str | Path, target: str | Path) -> ExtractionPlan:
    """Check `archive` (plan_extraction, the free space), then unpack the planned members into
    the new folder `target`: TARGET/ROOT/train/ and TARGET/ROOT/val/.

    Raises ArchiveError; nothing is left behind.
    """
    target = Path(target)
    if target.exists():
        raise ArchiveError(f"{target.name} already exists; extraction needs a fresh folder")
    try:
        with zipfile.ZipFile(archive) as zf:
            plan = plan_extraction(zf.infolist())
            _check_free_space(target, plan.total_bytes)
            folder = target.joinpath(*plan.root.parts)
            for info, destination in plan.files:
                out = folder / destination
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
    except zipfile.BadZipFile as err:
        shutil.rmtree(target, ignore_errors=True)
        raise ArchiveError(f"the upload is not a readable .zip archive ({err})") from err
    except ArchiveError:
        shutil.rmtree(target, ignore_errors=True)
        raise
    except OSError as err:  # not the server's paths: the message goes to the user
        shutil.rmtree(target, ignore_errors=True)
        raise ArchiveError(f"could not extract the archive: {err.strerror or err}") from err
    except (RuntimeError, EOFError) as err:  # RuntimeError: encrypted member
        shutil.rmtree(target, ignore_errors=True)
        raise ArchiveError(f"could not extract the archive: {err}") from err
    return plan


def _count_usable(folder: Path, split: str, shown: str) -> int:
    try:
        records, report = read_records(folder)
    except DataError as err:  # its message names the folder: show `shown` instead
        raise ArchiveError(f"{split}/: {str(err).replace(str(folder), shown)}") from err
    if not any(record.has_target for record in records):
        raise ArchiveError(f"{split}/ has no image with a target polygon ({report.summary()})")
    return len(records)


def check_dataset(root: Path, shown: str | None = None) -> str:
    """A summary line for a folder with train/ and val/; ArchiveError if either is unusable.

    shown: how messages name the folder (default: its path)."""
    shown = shown or str(root)
    for split in SPLITS:
        if not (root / split).is_dir():
            raise ArchiveError(
                f"{shown} has no {split}/ folder; expected train/ and val/ folders of "
                "NAME.jpg + NAME.json pairs (ReasonSeg layout)"
            )
    n_train = _count_usable(root / "train", "train", f"{shown}/train")
    n_val = _count_usable(root / "val", "val", f"{shown}/val")
    return f"{n_train} train and {n_val} val images"


def prepare_uploaded_dataset(
    archive: str | Path, target: str | Path, name: str | None = None
) -> tuple[Path, str]:
    """Check and extract an uploaded zip; return (dataset folder with train/ and val/, summary).

    Accepts train/ + val/ folders, train/ alone (every fifth sample becomes val/) or a flat
    folder of NAME.jpg + NAME.json pairs (split the same way), optionally inside wrapper
    folders. Messages name the upload by `name` (default: the archive's file name), never by
    a server path. Raises ArchiveError; nothing is left in `target`.
    """
    target = Path(target)
    name = name or Path(archive).name
    try:
        plan = extract_zip(archive, target)
        root = target.joinpath(*plan.root.parts)
        summary = check_dataset(root, shown=name if not plan.root.parts else f"{name}/{plan.root}")
    except ArchiveError as err:
        shutil.rmtree(target, ignore_errors=True)
        raise ArchiveError(f"{name}: {err}") from err
    left_out = [f"{plan.left_out} other files left out"] if plan.left_out else []
    lines = [f"{len(plan.files)} files extracted", summary, *plan.notes, *left_out]
    return root, "; ".join(lines)
