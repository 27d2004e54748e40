"""ReasonSeg reader: rasterising, sample counts, bad files, lazy loading."""

import json
import logging
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from lisa_demo.data import reasonseg
from lisa_demo.data.reasonseg import (
    DataError,
    ReasonSegDataset,
    rasterize_shapes,
    read_records,
    usable_shapes,
)
from lisa_demo.data.synthetic import generate_scene

X = 255


def polygon(label: str, points: list[list[float]]) -> dict:
    return {"label": label, "points": points, "shape_type": "polygon"}


def square(label: str, x0: float, y0: float, x1: float, y1: float) -> dict:
    return polygon(label, [[x0, y0], [x1, y0], [x1, y1], [x0, y1]])


TARGET = square("target", 1, 1, 4, 3)


def write_pair(
    folder: Path,
    name: str,
    text: object = ("a red cup",),
    shapes: list | None = None,
    size: tuple[int, int] = (8, 6),
    ext: str = ".jpg",
    **extra: object,
) -> None:
    """Write NAME<ext> (width x height RGB) and NAME.json beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(folder / f"{name}{ext}")
    annotation = {"text": list(text) if isinstance(text, tuple) else text, "is_sentence": False}
    annotation["shapes"] = [TARGET] if shapes is None else shapes
    annotation.update(extra)
    (folder / f"{name}.json").write_text(json.dumps(annotation))


# --- rasterising ---------------------------------------------------------------------------


def test_smaller_shapes_painted_later_win_whatever_the_file_order():
    shapes = [square("ignore", 2, 2, 5, 5), square("target", 0, 0, 4, 4)]
    expected = np.array(
        [
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, X, X, X, X],
            [1, 1, X, X, X, X],
            [1, 1, X, X, X, X],
            [0, 0, X, X, X, X],
        ],
        dtype=np.uint8,
    )
    mask = rasterize_shapes(shapes, 6, 6)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, expected)
    # A small target inside a large ignore region wins over it.
    mask = rasterize_shapes([square("target", 1, 1, 2, 2), square("ignore", 0, 0, 3, 3)], 4, 4)
    expected = np.array([[X, X, X, X], [X, 1, 1, X], [X, 1, 1, X], [X, X, X, X]], dtype=np.uint8)
    np.testing.assert_array_equal(mask, expected)


def test_flag_dropped_short_polygons_painted_points_truncated():
    shapes = [
        square("flag", 0, 0, 5, 3),  # would cover everything
        polygon("target", [[0, 0], [3.9, 3.2]]),  # 2 points: a line, as the reference paints
        polygon("target", [[-3, -3], [10, -3], [10, 1.7], [-3, 1.7]]),  # rows 0-1 (1.7 -> 1)
        square("Ignore region", 4.9, 2, 9, 9),  # label containing "ignore"; x 4.9 -> 4
    ]
    expected = np.array(
        [
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
            [0, 0, 1, 0, X, X],
            [0, 0, 0, 1, X, X],
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(rasterize_shapes(shapes, 4, 6), expected)


def test_a_one_point_polygon_paints_its_pixel():
    mask = rasterize_shapes([polygon("target", [[2.6, 1.2]])], 3, 4)
    expected = np.zeros((3, 4), np.uint8)
    expected[1, 2] = 1
    np.testing.assert_array_equal(mask, expected)


# A triangle with its left vertex 2 pixels outside the image: edges of slope +-1 from (-2, 2)
# to (2, -2) and (2, 6), and x = 2. It covers -x <= y <= x + 4 for x <= 2, so columns 0-2 of a
# 5 x 5 image whole. Clipping (-2, 2) to (0, 2) would leave only a thin triangle.
LEFT_TRIANGLE = [[-2, 2], [2, -2], [2, 6]]
LEFT_EXPECTED = np.array([[1, 1, 1, 0, 0]] * 5, dtype=np.uint8)


@pytest.mark.parametrize("side", ["left", "right", "top", "bottom"])
def test_vertices_outside_the_image_keep_the_polygon_shape(side):
    # The same triangle mirrored (x -> 4 - x) and/or transposed (x <-> y) onto each side.
    mirror = side in ("right", "bottom")
    transpose = side in ("top", "bottom")
    points = [[4 - x, y] if mirror else [x, y] for x, y in LEFT_TRIANGLE]
    expected = LEFT_EXPECTED[:, ::-1] if mirror else LEFT_EXPECTED
    if transpose:
        points, expected = [[y, x] for x, y in points], expected.T
    np.testing.assert_array_equal(rasterize_shapes([polygon("target", points)], 5, 5), expected)


def test_polygon_crossing_every_border_is_cut_by_the_image():
    # A diamond |x - 3| + |y - 3| <= 5 on a 7 x 7 image: every vertex is 2 pixels outside,
    # and only the four corner pixels (|x - 3| + |y - 3| = 6) are left out.
    diamond = polygon("target", [[3, -2], [8, 3], [3, 8], [-2, 3]])
    expected = np.ones((7, 7), dtype=np.uint8)
    expected[[0, 0, 6, 6], [0, 6, 0, 6]] = 0
    np.testing.assert_array_equal(rasterize_shapes([diamond], 7, 7), expected)


def test_polygon_entirely_outside_the_image_paints_nothing():
    shapes = [
        square("target", -10, -10, -2, -2),  # above-left: clipping would paint pixel (0, 0)
        square("target", 5, 0, 9, 3),  # right of a 4-wide image
        square("ignore", 0, 4.5, 3, 8),  # below a 4-high image
        polygon("target", [[-5, 8], [-1, 4], [-5, 4]]),  # below-left
    ]
    mask = rasterize_shapes(shapes, 4, 4)
    assert mask.shape == (4, 4) and not mask.any()


def test_negative_fractional_points_truncate_toward_zero_not_floor():
    # x from -5 to -0.5 truncates to -5..0 (column 0 painted); floor would give -5..-1.
    strip = polygon("target", [[-5, 1], [-0.5, 1], [-0.5, 2.7], [-5, 2.7]])
    expected = np.zeros((4, 4), dtype=np.uint8)
    expected[1:3, 0] = 1
    np.testing.assert_array_equal(rasterize_shapes([strip], 4, 4), expected)
    # y from -3 to -0.9 truncates to -3..0 (row 0 painted), x 0.4..2.9 to 0..2.
    strip = polygon("ignore", [[0.4, -3], [2.9, -3], [2.9, -0.9], [0.4, -0.9]])
    expected = np.zeros((4, 4), dtype=np.uint8)
    expected[0, :3] = X
    np.testing.assert_array_equal(rasterize_shapes([strip], 4, 4), expected)
    # (-1.7, 0.3) -> (-1, 0), (3.9, 4.2) -> (3, 4), (3.2, -0.6) -> (3, 0): the triangle under
    # y = x + 1. Floor (-2, 0) or clipping (0, 0) would tilt the long edge.
    triangle = polygon("target", [[-1.7, 0.3], [3.9, 4.2], [3.2, -0.6]])
    expected = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(rasterize_shapes([triangle], 4, 4), expected)


def test_equal_areas_paint_the_later_shape_first():
    # Two 4 x 4 squares overlapping in columns 2-3: np.argsort([16, 16])[::-1] is [1, 0], so
    # the second shape is painted first and the first one wins the overlap.
    left, right = square("target", 0, 0, 3, 3), square("ignore", 2, 0, 5, 3)
    np.testing.assert_array_equal(
        rasterize_shapes([left, right], 4, 6), np.array([[1, 1, 1, 1, X, X]] * 4, np.uint8)
    )
    left, right = square("ignore", 0, 0, 3, 3), square("target", 2, 0, 5, 3)
    np.testing.assert_array_equal(
        rasterize_shapes([right, left], 4, 6), np.array([[X, X, 1, 1, 1, 1]] * 4, np.uint8)
    )


def test_area_counts_only_the_pixels_inside_the_image():
    # The target spans x -4..3 (32 pixels, 16 inside); the ignore square x 2..5 has 16. Inside
    # the image the areas are equal, so the first shape (the target) is painted last and wins.
    shapes = [square("target", -4, 0, 3, 3), square("ignore", 2, 0, 5, 3)]
    np.testing.assert_array_equal(
        rasterize_shapes(shapes, 4, 6), np.array([[1, 1, 1, 1, X, X]] * 4, np.uint8)
    )
    # A target of 92 pixels with 12 inside (x -20..2) is smaller than the ignore square
    # x 1..5 (20 pixels), so it is painted after it.
    shapes = [square("target", -20, 0, 2, 3), square("ignore", 1, 0, 5, 3)]
    np.testing.assert_array_equal(
        rasterize_shapes(shapes, 4, 6), np.array([[1, 1, 1, X, X, X]] * 4, np.uint8)
    )


@pytest.mark.parametrize("reverse", [False, True])
def test_target_inside_ignore_and_ignore_inside_target(reverse):
    def paint(shapes: list[dict]) -> np.ndarray:
        return rasterize_shapes(shapes[::-1] if reverse else shapes, 5, 5)

    ring = [[X] * 5, [X, 1, 1, 1, X], [X, 1, 1, 1, X], [X, 1, 1, 1, X], [X] * 5]
    inside = paint([square("target", 1, 1, 3, 3), square("ignore", 0, 0, 4, 4)])
    np.testing.assert_array_equal(inside, np.array(ring, np.uint8))
    ring = [[1] * 5, [1, X, X, X, 1], [1, X, X, X, 1], [1, X, X, X, 1], [1] * 5]
    inside = paint([square("target", 0, 0, 4, 4), square("ignore", 1, 1, 3, 3)])
    np.testing.assert_array_equal(inside, np.array(ring, np.uint8))


def test_points_beyond_int32_make_the_polygon_unusable():
    far = square("target", 0, 0, 3e9, 2)
    assert not rasterize_shapes([far, square("ignore", -1e10, 0, 1, 1)], 3, 3).any()
    assert usable_shapes([far, TARGET]) == (TARGET,)


def clipped_rasterize(shapes: list[dict], height: int, width: int) -> np.ndarray:
    """The rasterising of commit cd7a26c, before this rule: vertices clipped to the image and
    floored, areas painted on the bounding box, ties painted in file order."""
    painted = []
    for shape in reasonseg.usable_shapes(shapes):
        points = np.asarray(shape["points"], dtype=np.float64)
        clipped = np.stack(
            [np.clip(points[:, 0], 0, width - 1), np.clip(points[:, 1], 0, height - 1)], axis=1
        )
        pixels = np.floor(clipped).astype(np.int32)
        local = pixels - pixels.min(axis=0)
        canvas = np.zeros(local.max(axis=0)[::-1] + 1, dtype=np.uint8)
        cv2.polylines(canvas, [local], isClosed=True, color=1, thickness=1)
        cv2.fillPoly(canvas, [local], color=1)
        value = X if "ignore" in shape["label"].lower() else 1
        painted.append((int(canvas.sum()), pixels, value))
    mask = np.zeros((height, width), dtype=np.uint8)
    for _, pixels, value in sorted(painted, key=lambda item: -item[0]):
        cv2.polylines(mask, [pixels], isClosed=True, color=value, thickness=1)
        cv2.fillPoly(mask, [pixels], color=value)
    return mask


def test_synthetic_scenes_inside_the_image_rasterise_as_before():
    ignores = several = 0
    for seed in range(40):
        image, annotation = generate_scene(random.Random(seed))
        height, width = image.shape[:2]
        shapes = annotation["shapes"]
        points = np.concatenate([np.asarray(shape["points"]) for shape in shapes])
        assert points.min() >= 0 and (points.max(axis=0) <= (width - 1, height - 1)).all()
        np.testing.assert_array_equal(
            rasterize_shapes(shapes, height, width), clipped_rasterize(shapes, height, width)
        )
        ignores += any(shape["label"] == "ignore" for shape in shapes)
        several += len(shapes) > 1
    assert ignores >= 3 and several >= 5  # the scenes exercise the paint order


def test_unknown_labels_are_targets_and_nothing_usable_is_empty():
    assert rasterize_shapes([square("cup", 0, 0, 1, 1)], 2, 2).tolist() == [[1, 1], [1, 1]]
    assert not rasterize_shapes([square("flag", 0, 0, 1, 1), "junk", {}], 2, 2).any()


# --- reading folders -------------------------------------------------------------------------


def test_sample_counts_for_all_first_and_random(tmp_path):
    for name, count in (("a", 1), ("b", 3), ("c", 5)):
        write_pair(tmp_path, name, text=tuple(f"query {i} of {name}" for i in range(count)))
    all_queries = ReasonSegDataset(tmp_path, queries="all")
    assert len(all_queries) == 9 and all_queries.report.samples == 9
    assert [s.query_index for s in all_queries] == [0, 0, 1, 2, 0, 1, 2, 3, 4]
    first = ReasonSegDataset(tmp_path, queries="first")
    assert len(first) == 3 and first.report.samples == 3
    assert [s.query for s in first] == ["query 0 of a", "query 0 of b", "query 0 of c"]

    random_queries = ReasonSegDataset(tmp_path, queries="random", seed=5)
    assert len(random_queries) == 3
    draws = set()
    for epoch in range(8):
        random_queries.set_epoch(epoch)
        picks = [(s.record.name, s.query_index) for s in random_queries]
        assert [name for name, _ in picks] == ["a", "b", "c"]
        assert picks[0][1] == 0 and random_queries[2].query == f"query {picks[2][1]} of c"
        draws.add(tuple(picks))
    assert len(draws) > 1  # re-drawn per epoch
    again = ReasonSegDataset(tmp_path, queries="random", seed=5)
    again.set_epoch(7)
    assert [s.query_index for s in again] == [s.query_index for s in random_queries]


def test_record_fields_and_report(tmp_path):
    write_pair(tmp_path, "cup", text=[" a red cup ", "", "the cup."], family="attribute")
    records, report = read_records(tmp_path)
    (record,) = records
    assert record.queries == ("a red cup", "the cup.")
    assert (record.height, record.width, record.family, record.is_sentence) == (
        6,
        8,
        "attribute",
        False,
    )
    assert record.load_image().shape == (6, 8, 3)
    np.testing.assert_array_equal(record.load_mask(), rasterize_shapes([TARGET], 6, 8))
    assert (report.images_found, report.images_used, report.samples) == (1, 1, 2)
    assert report.summary() == f"{tmp_path.name}: 1 images, 2 samples; skipped 0"


def test_each_kind_of_bad_file_is_skipped_counted_and_logged_once(tmp_path, caplog):
    write_pair(tmp_path, "good")
    write_pair(
        tmp_path, "no_target", shapes=[square("flag", 0, 0, 3, 3), square("ignore", 0, 0, 2, 2)]
    )
    write_pair(tmp_path, "short_poly", shapes=[TARGET, polygon("target", [])])
    write_pair(tmp_path, "empty_text", text=["  "])
    write_pair(tmp_path, "no_text", text=None)
    write_pair(tmp_path, "broken")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "no_image.json").write_text(json.dumps({"text": ["x"], "shapes": []}))
    write_pair(tmp_path, "bad_image")
    (tmp_path / "bad_image.jpg").write_bytes(b"this is not a jpeg")
    Image.new("RGB", (4, 4)).save(tmp_path / "no_json.png")

    with caplog.at_level(logging.WARNING, logger="lisa_demo.data"):
        records, report = read_records(tmp_path)

    assert [r.name for r in records] == ["good", "no_target", "short_poly"]
    assert report.skipped == {
        "empty text": 2,
        "malformed json": 1,
        "missing image": 1,
        "missing json": 1,
        "unreadable image": 1,
    }
    assert report.empty_targets == 1 and report.dropped_polygons == 1
    assert (report.images_found, report.images_used, report.samples) == (9, 3, 3)
    empty = records[1].load_mask()
    assert empty.shape == (6, 8) and not (empty == 1).any()
    assert len(records[2].shapes) == 1
    warnings = [r for r in caplog.records if r.name == "lisa_demo.data"]
    assert len(warnings) == 6 + 1  # one per skip, one for the empty target
    assert "skipped 6 (empty text: 2, malformed json: 1" in report.summary()


def test_missing_empty_and_unusable_folders_raise_data_error(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*NAME\.jpg \+ NAME\.json"):
        read_records(tmp_path / "nowhere")
    (tmp_path / "README.txt").write_text("hello")
    with pytest.raises(DataError, match=r"no \.json or image files.*NAME\.jpg \+ NAME\.json"):
        ReasonSegDataset(tmp_path)
    (tmp_path / "lonely.json").write_text(json.dumps({"text": ["x"], "shapes": []}))
    with pytest.raises(DataError, match="no usable sample.*missing image: 1"):
        read_records(tmp_path)


def test_extensions_are_case_insensitive_and_modes_convert_to_rgb(tmp_path):
    write_pair(tmp_path, "upper", ext=".JPG")
    for mode in ("L", "RGBA", "P"):
        write_pair(tmp_path, f"img_{mode}", ext=".png")
        Image.new(mode, (8, 6)).save(tmp_path / f"img_{mode}.png")
    records, _ = read_records(tmp_path)
    assert len(records) == 4
    for record in records:
        pixels = record.load_image()
        assert pixels.shape == (6, 8, 3) and pixels.dtype == np.uint8


def test_exif_orientation_swaps_height_and_width(tmp_path):
    write_pair(tmp_path, "rotated", size=(8, 6))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (8, 6)).save(tmp_path / "rotated.jpg", exif=exif)
    (record,) = read_records(tmp_path)[0]
    assert (record.height, record.width) == (8, 6)
    assert record.load_image().shape == (8, 6, 3)
    assert record.load_mask().shape == (8, 6)


def test_masks_and_pixels_are_not_decoded_at_read_time(tmp_path, monkeypatch):
    write_pair(tmp_path, "lazy")

    def fail(*args, **kwargs):
        raise AssertionError("decoded at read time")

    monkeypatch.setattr(reasonseg, "rasterize_shapes", fail)
    monkeypatch.setattr(Image.Image, "load", fail)
    dataset = ReasonSegDataset(tmp_path)
    assert dataset[0].record.name == "lazy"


def test_explanations_attach_to_matching_image_and_query(tmp_path):
    write_pair(tmp_path, "cup", text=["a red cup", "the mug"])
    explanations = tmp_path.parent / "explanations.json"
    entries = [
        {"image": "cup.jpg", "query": "a red cup", "outputs": "It holds coffee."},
        {"image": "other.jpg", "query": "the mug", "outputs": "wrong image"},
        {"image": "cup.jpg"},
    ]
    explanations.write_text(json.dumps(entries))
    dataset = ReasonSegDataset(tmp_path, explanations=explanations)
    assert [s.explanation for s in dataset] == ["It holds coffee.", None]
    explanations.write_text("{}")
    with pytest.raises(DataError, match="JSON list"):
        ReasonSegDataset(tmp_path, explanations=explanations)


def test_unknown_query_mode_is_an_error(tmp_path):
    write_pair(tmp_path, "cup")
    with pytest.raises(ValueError, match="first"):
        ReasonSegDataset(tmp_path, queries="every")
