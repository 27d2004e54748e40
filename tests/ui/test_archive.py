"""Safe extraction of uploaded dataset archives."""

from __future__ import annotations

import json
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
