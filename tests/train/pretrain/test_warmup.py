"""The encoder warm-ups' pieces: patch labels, description classes, the images they draw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lisa_demo.data.reasonseg import ReasonSegDataset
from lisa_demo.data.synthetic import (
    COLOURS,
    REGIONS,
    SHAPE_KINDS,
    SIZES,
    generate_dataset,
    object_classes,
    target_classes,
)
from lisa_demo.train.pretrain.targets import TargetClasses
from lisa_demo.train.pretrain.warmup import patch_labels, warmup_samples


def square(x0: int, y0: int, x1: int, y1: int, **look) -> dict:
    return {"outline": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1]]], **look}


def test_patch_labels_take_the_object_covering_most_of_each_cell_if_a_quarter():
    """40x40 image, 2x2 grid of 20 px cells. A fills the top-left cell; B covers 6 of the 20
    columns of the bottom-right cell (30%); C covers 4 columns of the top-right cell (20%,
    below MIN_COVER); the bottom-left cell is empty."""
    a = square(0, 0, 19, 19, kind="star", colour="red", size="small")
    b = square(34, 20, 39, 39, kind="circle", colour="blue", size="large")
    c = square(36, 0, 39, 19, kind="cross", colour="green", size="medium")
    labels = patch_labels([a, b, c], 40, 40, grid=2)
    none = [len(SHAPE_KINDS), len(COLOURS), len(SIZES)]
    star, red, small = SHAPE_KINDS.index("star"), list(COLOURS).index("red"), 0
    circle, blue, large = SHAPE_KINDS.index("circle"), list(COLOURS).index("blue"), 2
    assert labels[:, 0].tolist() == [star, red, small]
    assert labels[:, 1].tolist() == none  # C: 20% < 25%
    assert labels[:, 2].tolist() == none
    assert labels[:, 3].tolist() == [circle, blue, large]


def test_object_and_target_classes_index_kind_colour_size_and_region():
    obj = {"kind": "heart", "colour": "blue", "size": "medium", "centre": [90.0, 10.0]}
    # width 100, height 60: x 90 is in the right third, y 10 in the top third
    assert object_classes(obj, 100, 60) == (
        SHAPE_KINDS.index("heart"),
        list(COLOURS).index("blue"),
        1,
        REGIONS.index("at the top right"),
    )
    scene = {
        "imageWidth": 100,
        "imageHeight": 60,
        "objects": [{**obj, "target": False}, {**obj, "centre": [50, 30], "target": True}],
    }
    assert target_classes(scene)[3] == REGIONS.index("in the middle")
    assert target_classes({"imageWidth": 1, "imageHeight": 1, "objects": []}) is None
    assert target_classes({"shapes": []}) is None  # plain ReasonSeg annotation


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, {"train": 6}, seed=3)
    return root


def test_warmup_samples_come_from_the_first_images_only(dataset):
    data = ReasonSegDataset(dataset / "train", queries="all")
    images = [r.image_path for r in data.records]
    everything = warmup_samples(data, len(data))
    assert [s.query for s in everything] == [data[i].query for i in range(len(data))]
    two = warmup_samples(data, len(data), images=2)
    assert {s.record.image_path for s in two} == set(images[:2])
    # every query of those two images is kept (queries="all" gives several per image)
    assert len(two) == sum(len(r.queries) for r in data.records[:2]) > 2


def test_warmup_images_count_hard_links_to_one_image_once(tmp_path):
    generate_dataset(tmp_path, {"train": 3}, seed=1, extra_queries=1)
    data = ReasonSegDataset(tmp_path / "train", queries="first")
    assert len(data) == 6  # three scenes, each with one extra query on the same image
    first_two = warmup_samples(data, len(data), images=2)
    assert sorted(s.record.json_path.stem for s in first_two) == [
        "train_00000", "train_00000_x1", "train_00001", "train_00001_x1",
    ]  # fmt: skip


def test_target_classes_of_a_batch_come_from_each_annotation(tmp_path):
    """An extra query on the same image has its own target; other data gives -1 rows."""
    generate_dataset(tmp_path, {"train": 2}, seed=1, extra_queries=1)
    data = ReasonSegDataset(tmp_path / "train", queries="first")
    samples = [data[i] for i in range(len(data))]
    rows = TargetClasses().batch(samples)
    for sample, row in zip(samples, rows, strict=True):
        annotation = json.loads(sample.record.json_path.read_text())
        assert row.tolist() == [list(target_classes(annotation))]
    assert rows[0].tolist() != rows[1].tolist()  # train_00000 and its extra query
    plain = tmp_path / "plain.json"
    plain.write_text('{"shapes": []}')
    other = type("S", (), {"record": type("R", (), {"json_path": plain})()})()
    assert TargetClasses().batch([other])[0].tolist() == [[-1, -1, -1, -1]]
