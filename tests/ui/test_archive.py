"""Safe extraction of uploaded dataset archives."""

from __future__ import annotations

import json
import shutil
import stat
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lisa_demo.ui import archive
from lisa_demo.ui.archive import ArchiveError, extract_zip, prepare_uploaded_dataset


def sample(name: str) -> dict[str, bytes]:
    """One ReasonSeg pair: NAME.jpg and NAME.json with a target polygon."""
    buffer = BytesIO()
    Image.fromarray(np.full((40, 50, 3), 200, dtype=np.uint8)).save(buffer, format="JPEG")
    spec = {
        "text": ["the grey thing"],
        "is_sentence": False,
        "shapes": [{"label": "target", "points": [[5, 5], [30, 5], [30, 30]]}],
    }
    return {f"{name}.jpg": buffer.getvalue(), f"{name}.json": json.dumps(spec).encode()}


def make_zip(path: Path, members: dict[str, bytes], links: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize(
    ("members", "links", "message"),
    [
        ({"../../escape.json": b"{}"}, (), "points outside"),
        ({"a/../../escape.json": b"{}"}, (), "points outside"),
        ({"/abs/escape.json": b"{}"}, (), "absolute path"),
        ({"C:/escape.json": b"{}"}, (), "absolute path"),
        ({"ok.json": b"{}"}, ("train/link.jpg",), "symbolic link"),
    ],
)
def test_refuses_members_that_escape(tmp_path, members, links, message) -> None:
    upload = make_zip(tmp_path / "up.zip", members, links)
    with pytest.raises(ArchiveError, match=message):
        extract_zip(upload, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path.parent / "escape.json").exists()


def test_refuses_too_many_files_or_bytes(tmp_path, monkeypatch) -> None:
    upload = make_zip(tmp_path / "up.zip", {f"f{i}.json": b"{}" for i in range(5)})
    monkeypatch.setattr(archive, "MAX_ARCHIVE_FILES", 4)
    with pytest.raises(ArchiveError, match="more than the limit of 4"):
        extract_zip(upload, tmp_path / "a")
    monkeypatch.setattr(archive, "MAX_ARCHIVE_FILES", 100)
    monkeypatch.setattr(archive, "MAX_ARCHIVE_BYTES", 5)
    with pytest.raises(ArchiveError, match="unpacks to"):
        extract_zip(upload, tmp_path / "b")


def test_refuses_a_zip_bomb_member(tmp_path) -> None:
    upload = make_zip(tmp_path / "up.zip", {"zeros.json": b"\0" * 5_000_000})
    with pytest.raises(ArchiveError, match="zip bomb"):
        extract_zip(upload, tmp_path / "out")


def test_refuses_a_file_that_is_not_a_zip_and_an_existing_target(tmp_path) -> None:
    (tmp_path / "fake.zip").write_bytes(b"nope")
    with pytest.raises(ArchiveError, match="not a readable .zip"):
        extract_zip(tmp_path / "fake.zip", tmp_path / "out")
    upload = make_zip(tmp_path / "up.zip", sample("a"))
    (tmp_path / "exists").mkdir()
    with pytest.raises(ArchiveError, match="fresh folder"):
        extract_zip(upload, tmp_path / "exists")


def test_train_and_val_folders_inside_a_wrapper_folder(tmp_path) -> None:
    members = {f"mydata/train/{k}": v for k, v in sample("a").items()}
    members |= {f"mydata/val/{k}": v for k, v in sample("b").items()}
    members["__MACOSX/._junk"] = b"junk"
    upload = make_zip(tmp_path / "up.zip", members)
    root, summary = prepare_uploaded_dataset(upload, tmp_path / "data")
    assert root == tmp_path / "data" / "mydata"
    assert "1 train and 1 val images" in summary
    assert not (tmp_path / "data" / "__MACOSX").exists()


def test_flat_folder_is_split_into_train_and_val(tmp_path) -> None:
    members: dict[str, bytes] = {}
    for i in range(10):
        members |= sample(f"img{i}")
    root, summary = prepare_uploaded_dataset(make_zip(tmp_path / "up.zip", members), tmp_path / "d")
    assert len(list((root / "train").glob("*.json"))) == 8
    assert len(list((root / "val").glob("*.json"))) == 2
    assert "every fifth" in summary


def test_train_without_val_is_split(tmp_path) -> None:
    members: dict[str, bytes] = {"train/README.txt": b"hi"}
    for i in range(5):
        members |= {f"train/{k}": v for k, v in sample(f"img{i}").items()}
    root, summary = prepare_uploaded_dataset(make_zip(tmp_path / "up.zip", members), tmp_path / "d")
    assert "4 train and 1 val images" in summary


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({}, "empty"),
        ({"notes.txt": b"hello"}, "at least 2 annotated images"),
        ({"train/a.json": b"{}", "val/b.json": b"{}"}, "no usable sample|has no"),
    ],
)
def test_archives_without_usable_samples_are_refused(tmp_path, members, message) -> None:
    with pytest.raises(ArchiveError, match=message):
        prepare_uploaded_dataset(make_zip(tmp_path / "up.zip", members), tmp_path / "d")


def compressible_member(zf: zipfile.ZipFile, name: str, size: int, random_bytes: int) -> None:
    """`size` bytes that deflate about 100:1: each 64 KiB block is `random_bytes` random bytes
    (never repeated within deflate's 32 KiB window) and zeros. Streamed: little memory."""
    block = 1 << 16
    zeros = bytes(block - random_bytes)
    rng = np.random.default_rng(0)
    with zf.open(name, "w", force_zip64=True) as out:
        for _ in range(size // block):
            out.write(rng.bytes(random_bytes))
            out.write(zeros)


@pytest.fixture(scope="module")
def big_images_without_annotations(tmp_path_factory) -> Path:
    """The fault battery's upload: twelve 100 MiB "images" and no annotation file, in a zip
    of about 12 MB that passes the count, size and compression-ratio limits."""
    path = tmp_path_factory.mktemp("upload") / "photos.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for i in range(12):
            compressible_member(zf, f"train/photo_{i:02d}.jpg", 100 * 2**20, random_bytes=400)
    return path


def test_an_archive_without_annotations_is_refused_before_one_byte_is_written(
    big_images_without_annotations, tmp_path
) -> None:
    upload = big_images_without_annotations
    with zipfile.ZipFile(upload) as zf:
        members = zf.infolist()
    total = sum(m.file_size for m in members)
    assert total == 12 * 100 * 2**20 and upload.stat().st_size < 20e6
    archive._check_sizes(members)  # the limits that used to be all that was checked pass
    target = tmp_path / "run" / "data"
    with pytest.raises(ArchiveError) as refused:
        prepare_uploaded_dataset(upload, target)
    message = str(refused.value)
    assert message.startswith("photos.zip: train/ needs at least 2 annotated images")
    assert "12 images and 0 annotation files, 0 of them paired" in message
    assert not target.exists() and not (tmp_path / "run").exists()  # zero bytes written


def test_a_file_over_the_per_file_limit_is_refused_before_writing(tmp_path, monkeypatch) -> None:
    members = {f"train/{k}": v for k, v in sample("a").items()}
    members |= {f"val/{k}": v for k, v in sample("b").items()}
    upload = make_zip(tmp_path / "up.zip", members)
    monkeypatch.setattr(archive, "MAX_FILE_BYTES", 100)  # the JPEGs are larger, the JSON not
    with pytest.raises(ArchiveError, match=r"'train/a.jpg' unpacks to .* per file"):
        prepare_uploaded_dataset(upload, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_too_little_free_disk_space_is_refused_before_writing(tmp_path, monkeypatch) -> None:
    members = {f"train/{k}": v for k, v in sample("a").items()}
    members |= {f"val/{k}": v for k, v in sample("b").items()}
    upload = make_zip(tmp_path / "up.zip", members)
    seen = []

    def disk_usage(path):
        seen.append(Path(path))
        return shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000)  # 1000 bytes free

    monkeypatch.setattr(archive.shutil, "disk_usage", disk_usage)
    with pytest.raises(ArchiveError, match="GB free"):
        prepare_uploaded_dataset(upload, tmp_path / "run" / "d")
    assert seen == [tmp_path]  # the nearest folder that exists, on the target's disk
    assert not (tmp_path / "run").exists()


def test_only_the_members_the_layout_uses_are_unpacked(tmp_path) -> None:
    members = {f"mine/train/{k}": v for i in range(3) for k, v in sample(f"t{i}").items()}
    members |= {f"mine/val/{k}": v for k, v in sample("v0").items()}
    members |= {
        "mine/README.md": b"about",
        "mine/train/orphan.jpg": sample("x")["x.jpg"],  # no NAME.json
        "mine/train/notes.txt": b"not a sample",
        "mine/train/deeper/t9.jpg": sample("t9")["t9.jpg"],  # not in train/ itself
        "mine/train/deeper/t9.json": sample("t9")["t9.json"],
        "mine/weights.bin": b"\1" * 1000,
    }
    root, summary = prepare_uploaded_dataset(make_zip(tmp_path / "up.zip", members), tmp_path / "d")
    assert root == tmp_path / "d" / "mine"
    written = sorted(str(p.relative_to(tmp_path / "d")) for p in (tmp_path / "d").rglob("*.*"))
    assert written == sorted(
        [f"mine/train/t{i}.{ext}" for i in range(3) for ext in ("jpg", "json")]
        + ["mine/val/v0.jpg", "mine/val/v0.json"]
    )
    assert "8 files extracted" in summary and "6 other files left out" in summary
    assert "3 train and 1 val images" in summary


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"notes.txt": b"hello"}, "at least 2 annotated images"),
        (
            {**{f"train/{k}": b"{not json" if k.endswith("json") else v
                for k, v in sample("a").items()},
             **{f"val/{k}": v for k, v in sample("b").items()}},
            "no usable sample in my data.zip/train",
        ),
    ],
)  # fmt: skip
def test_messages_name_the_uploaded_file_not_a_server_path(tmp_path, members, message) -> None:
    server_copy = tmp_path / "server-temp-3f2a" / "my data.zip"
    server_copy.parent.mkdir()
    make_zip(server_copy, members)
    target = tmp_path / "runs" / "run-1" / "data"
    with pytest.raises(ArchiveError) as refused:
        prepare_uploaded_dataset(server_copy, target)
    text = str(refused.value)
    assert text.startswith("my data.zip: ") and message in text, text
    assert str(tmp_path) not in text
    assert not target.exists()
