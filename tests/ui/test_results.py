"""Ground truth reading and the per-mask table, without a server."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lisa_demo.ui.results import (
    GroundTruthError,
    colour_map,
    details_text,
    drawn_mask,
    ground_truth,
    mask_from_array,
    mask_table,
    overlay,
    shown_masks,
)
from tests.ui.fakes import FakeMask, FakeResult


def test_mask_from_array_non_zero_or_opaque_is_foreground() -> None:
    gray = np.array([[0, 1], [255, 0]], dtype=np.uint8)
    assert mask_from_array(gray).tolist() == [[False, True], [True, False]]
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 1, 2] = 9
    assert mask_from_array(rgb).tolist() == [[False, True], [False, False]]
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[1, 1] = (0, 0, 0, 255)  # black but opaque on a transparent mask: foreground
    assert mask_from_array(rgba).tolist() == [[False, False], [False, True]]
    opaque = np.zeros((2, 2, 4), dtype=np.uint8)
    opaque[..., 3] = 255
    opaque[0, 0, 0] = 255
    assert mask_from_array(opaque).tolist() == [[True, False], [False, False]]


def test_ground_truth_file_resized_when_aspect_matches(tmp_path) -> None:
    mask = np.zeros((60, 80), dtype=np.uint8)
    mask[:30] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    gt = ground_truth(tmp_path / "m.png", None, (120, 160))
    assert gt.mask.shape == (120, 160) and gt.mask.dtype == np.uint8
    assert set(np.unique(gt.mask)) == {0, 1} and gt.mask[:60].all()
    assert "resized from 80x60 to 160x120" in gt.note
    with pytest.raises(GroundTruthError, match="image's size"):
        ground_truth(tmp_path / "m.png", None, (100, 100))
    assert ground_truth(None, None, (10, 10)) is None


@pytest.mark.parametrize("orientation", [3, 6])
def test_ground_truth_file_is_read_in_its_exif_orientation(tmp_path, orientation) -> None:
    # The image is decoded with its EXIF orientation applied; a mask file carrying the same
    # tag must line up with it. Displayed (3 high x 4 wide), the mask is the top-left pixel
    # and the one right of it. Orientation 3 stores it turned 180 degrees (bottom-right);
    # 6 stores it turned 90 degrees anticlockwise (4 high x 3 wide, displayed[y, x] =
    # stored[3 - x, y]): rows 2-3 of column 0.
    displayed = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
    stored = np.zeros((3, 4) if orientation == 3 else (4, 3), dtype=np.uint8)
    if orientation == 3:
        stored[2, 2:4] = 255
    else:
        stored[2:4, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "m.png", exif=exif)
    gt = ground_truth(tmp_path / "m.png", None, (3, 4))
    assert gt.note is None
    np.testing.assert_array_equal(gt.mask, displayed.astype(np.uint8))


def test_drawn_mask_is_alpha_of_the_layers() -> None:
    layer = np.zeros((4, 4, 4), dtype=np.uint8)
    assert drawn_mask({"background": None, "layers": [layer], "composite": None}) is None
    layer[1, 2, 3] = 40
    mask = drawn_mask({"background": None, "layers": [layer], "composite": None})
    assert mask.sum() == 1 and mask[1, 2]
    assert drawn_mask(None) is None


def test_table_overlay_and_details() -> None:
    mask = np.zeros((10, 20), dtype=bool)
    mask[:5, :10] = True
    result = FakeResult("it [SEG]", [FakeMask(mask, 0.8765, 0.25)], {"total": 0.5}, True)
    gt = ground_truth(None, None, (10, 20))
    assert list(mask_table(result.masks, gt).columns) == ["mask", "confidence (SAM IoU)", "area %"]
    image = np.zeros((10, 20, 3), dtype=np.uint8)
    shown, layers = overlay(image, result.masks)
    assert shown.shape == image.shape and layers[0][1] == "mask 1"
    assert layers[0][0].max() == 1.0
    assert not image.any()  # the outlines go into a copy
    text = details_text(result, [])
    assert "total 0.50 s" in text and "from cache: yes" in text


def test_overlay_of_a_big_image_is_downscaled() -> None:
    image = np.zeros((4000, 2000, 3), dtype=np.uint8)
    result = [FakeMask(np.ones((4000, 2000), dtype=bool), 0.5, 1.0)]
    shown, layers = overlay(image, result)
    assert shown.shape == (1600, 800, 3) and layers[0][0].shape == (1600, 800)


def test_outlines_are_drawn_white_and_black_around_each_mask() -> None:
    image = np.full((40, 40, 3), 200, dtype=np.uint8)
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:30, 10:30] = True
    shown, _ = overlay(image, [FakeMask(mask, 0.9, 0.25)])
    # The boundary pixel is black (the thin line on top), its neighbours white: visible on
    # any fill; the inside and far outside are untouched.
    assert tuple(shown[10, 20]) == (0, 0, 0)
    assert tuple(shown[9, 20]) == (255, 255, 255) and tuple(shown[11, 20]) == (255, 255, 255)
    assert tuple(shown[20, 20]) == (200, 200, 200) and tuple(shown[0, 0]) == (200, 200, 200)


def test_palette_is_not_red_first_and_many_masks_are_summarised() -> None:
    colours = colour_map()
    assert list(colours) == ["mask 1", "mask 2", "mask 3", "mask 4"]
    first = colours["mask 1"]
    red, green, blue = (int(first[i : i + 2], 16) for i in (1, 3, 5))
    assert blue > red and len(set(colours.values())) == 4
    empty = np.zeros((4, 4), dtype=bool)
    masks = [FakeMask(~empty, 0.9, 1.0)] + [FakeMask(empty, 0.1, 0.0) for _ in range(9)]
    shown, line = shown_masks(masks)
    assert shown == masks[:4]
    assert line.startswith("Showing the first 4 of 10 masks; the other 6 (6 of them empty)")
    assert shown_masks(masks[:4]) == (masks[:4], None)
