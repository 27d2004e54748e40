"""Turning a segmentation result into what the Inference tab shows; no gradio here.

Ground truth comes from an uploaded mask image (non-zero pixels are foreground; in an image with
transparency, opaque pixels are; read as displayed, EXIF orientation applied like the image's)
or from strokes painted on the image (alpha > 0).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from lisa_demo.metrics import mask_dice, mask_iou

DISPLAY_MAX_SIDE = 1600  # the overlay is downscaled to this; masks and metrics stay full size
MASK_DIR_PREFIX = "lisa-masks-"
MASK_DIR_MAX_AGE_S = 3600.0
ASPECT_TOLERANCE = 0.02
TABLE_COLUMNS = ["mask", "confidence (SAM IoU)", "area %"]
GT_COLUMNS = ["true IoU", "Dice"]
NOTHING_TO_SEGMENT = "The model found nothing to segment: its answer has no [SEG] token."
MAX_SHOWN_MASKS = 4  # an answer that repeats [SEG] gives dozens: the rest get one line
# Okabe and Ito's colour-blind-safe palette, red-free at the start; each mask also gets a
# white-and-black outline drawn into the image, which stays visible on any colour.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#F0E442", "#D55E00")
OUTLINE_COLOURS = ((255, 255, 255), (0, 0, 0))  # RGB: a wide white line under a thin black one
STAGES = (
    ("image_encoding", "image encoding"),
    ("generation", "generation"),
    ("mask_decoding", "mask decoding"),
    ("total", "total"),
)


class GroundTruthError(ValueError):
    """A ground-truth mask that cannot be used; the message says why."""


@dataclass
class GroundTruth:
    """A binary ground-truth mask at the image's size and how it was obtained."""

    mask: np.ndarray  # HxW uint8, 0 background / 1 foreground
    note: str | None = None  # e.g. "resized from 100x80"


def mask_from_array(array: np.ndarray) -> np.ndarray:
    """HxW bool foreground of a mask image array (HxW, HxWx3 or HxWx4, any numeric dtype).

    With an alpha channel that has transparent pixels, foreground = alpha > 0; otherwise
    foreground = any channel non-zero.
    """
    if array.ndim == 2:
        return array != 0
    if array.ndim != 3:
        raise GroundTruthError(f"a mask image must be HxW or HxWxC, got shape {array.shape}")
    if array.shape[2] in (2, 4):
        alpha = array[:, :, -1]
        if alpha.min() < alpha.max() or alpha.max() == 0:
            return alpha > 0
        return (array[:, :, :-1] != 0).any(axis=2)
    return (array != 0).any(axis=2)


def read_mask_file(path: str | Path) -> np.ndarray:
    """HxW bool foreground of a mask image file as displayed (its EXIF orientation applied,
    as it is to the image); GroundTruthError if it is not an image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                oriented = ImageOps.exif_transpose(image)
                if oriented.mode == "P":
                    oriented = oriented.convert("RGBA")
                array = np.asarray(oriented)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise GroundTruthError(
            f"the ground-truth mask {Path(path).name} is not a readable image ({err}); "
            "upload a PNG where non-zero pixels are the object"
        ) from err
    except Image.DecompressionBombError as err:
        raise GroundTruthError(f"the ground-truth mask is far too large ({err})") from err
    return mask_from_array(array)


def drawn_mask(editor_value: Any) -> np.ndarray | None:
    """HxW bool union of painted strokes (alpha > 0) from an ImageEditor value, or None."""
    if not isinstance(editor_value, dict):
        return None
    strokes = [
        layer[:, :, 3] > 0
        for layer in editor_value.get("layers") or []
        if isinstance(layer, np.ndarray) and layer.ndim == 3 and layer.shape[2] == 4
    ]
    if not strokes or not any(s.any() for s in strokes):
        return None
    shape = strokes[0].shape
    union = np.zeros(shape, dtype=bool)
    for stroke in strokes:
        union |= fit_mask(stroke, shape, "drawn layer")[0]
    return union


def fit_mask(mask: np.ndarray, shape: tuple[int, int], name: str) -> tuple[np.ndarray, str | None]:
    """Resize a bool mask (nearest) to `shape` when the aspect ratios agree; else refuse."""
    if mask.shape == shape:
        return mask, None
    (h, w), (H, W) = mask.shape, shape
    if abs((w / h) / (W / H) - 1.0) > ASPECT_TOLERANCE:
        raise GroundTruthError(
            f"the {name} is {w}x{h} but the image is {W}x{H}; use a mask of the image's size"
        )
    resized = cv2.resize(mask.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST)
    return resized.astype(bool), f"the {name} was resized from {w}x{h} to {W}x{H}"


def ground_truth(
    mask_path: str | Path | None, editor_value: Any, shape: tuple[int, int]
) -> GroundTruth | None:
    """The uploaded mask if given, else the drawn one, at the image's HxW; None if neither."""
    drawn = drawn_mask(editor_value)
    if mask_path:
        mask, note = fit_mask(read_mask_file(mask_path), shape, "ground-truth mask")
        if drawn is not None:
            ignored = "the drawn mask was ignored (a mask file was given)"
            note = f"{note}; {ignored}" if note else ignored
    elif drawn is not None:
        mask, note = fit_mask(drawn, shape, "drawn mask")
    else:
        return None
    return GroundTruth(mask.astype(np.uint8), note)


def mask_label(index: int) -> str:
    """The legend label of the mask at 0-based `index`: masks are numbered from 1, as in the
    table, the PNG files (mask_1.png) and the CLI."""
    return f"mask {index + 1}"


def colour_map() -> dict[str, str]:
    """Legend label -> palette colour for every mask the page shows (gr.AnnotatedImage's
    color_map; fixed labels keep the API's overlay value a plain image and annotations)."""
    return {mask_label(i): PALETTE[i % len(PALETTE)] for i in range(MAX_SHOWN_MASKS)}


def shown_masks(masks: list[Any]) -> tuple[list[Any], str | None]:
    """The masks the page shows (the first MAX_SHOWN_MASKS) and one line about the others."""
    if len(masks) <= MAX_SHOWN_MASKS:
        return list(masks), None
    rest = masks[MAX_SHOWN_MASKS:]
    empty = sum(1 for m in rest if not np.asarray(m.mask).any())
    return list(masks[:MAX_SHOWN_MASKS]), (
        f"Showing the first {MAX_SHOWN_MASKS} of {len(masks)} masks; the other {len(rest)} "
        f"({empty} of them empty) come from an answer that repeats [SEG], which is the "
        "model's output going wrong, not the threshold."
    )


def mask_table(masks: list[Any], gt: GroundTruth | None) -> pd.DataFrame:
    """One row per mask: number, SAM's predicted IoU, area %, and true IoU / Dice with GT."""
    columns = TABLE_COLUMNS + (GT_COLUMNS if gt is not None else [])
    rows = []
    for i, result in enumerate(masks):
        row = [i + 1, round(float(result.score), 3), round(100 * float(result.area_fraction), 2)]
        if gt is not None:
            row += [
                round(mask_iou(result.mask, gt.mask), 3),
                round(mask_dice(result.mask, gt.mask), 3),
            ]
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def display_scale(shape: tuple[int, ...], max_side: int = DISPLAY_MAX_SIDE) -> float:
    return min(1.0, max_side / max(shape[0], shape[1]))


def overlay(image: np.ndarray, masks: list[Any]) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
    """(image, [(float mask in [0, 1], label), ...]) for gr.AnnotatedImage, at display size.

    The image is a new array with each mask's outline drawn in (white under black), so that a
    mask stays visible whatever the colour of its object; the input is not modified."""
    scale = display_scale(image.shape)
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    shown = image.copy() if scale == 1.0 else cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    layers = []
    width = max(1, round(max(size) / 300))  # outline width grows with the displayed image
    for i, result in enumerate(masks):
        mask = np.asarray(result.mask, dtype=np.uint8)
        if scale != 1.0:
            mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        for colour, thickness in zip(OUTLINE_COLOURS, (2 * width + 1, width), strict=True):
            cv2.drawContours(shown, contours, -1, colour, thickness)
        layers.append((mask.astype(np.float32), mask_label(i)))
    return shown, layers


def fresh_mask_dir(root: Path | None = None) -> Path:
    """A new temp folder for this call's PNGs; folders older than an hour are removed."""
    root = Path(root or tempfile.gettempdir())
    cutoff = time.time() - MASK_DIR_MAX_AGE_S
    for old in root.glob(MASK_DIR_PREFIX + "*"):
        try:
            if old.is_dir() and old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue
    return Path(tempfile.mkdtemp(prefix=MASK_DIR_PREFIX, dir=root))


def write_mask_pngs(masks: list[Any], folder: Path) -> list[str]:
    """mask_1.png, mask_2.png, ...: single-channel PNGs, 255 inside the mask, 0 outside."""
    paths = []
    for i, result in enumerate(masks):
        path = folder / f"mask_{i + 1}.png"
        Image.fromarray(np.asarray(result.mask, dtype=np.uint8) * 255, mode="L").save(path)
        paths.append(str(path))
    return paths


def details_text(result: Any, notes: list[str]) -> str:
    """Markdown: what happened (nothing segmented, the pipeline's note), notes, timings, cache."""
    message = getattr(result, "message", None)
    lines = []
    if not result.masks:
        lines.append(f"**{message or NOTHING_TO_SEGMENT}**")
    elif message:
        lines.append(message)
    lines += [note for note in notes if note]
    timings = result.timings or {}
    stages = [f"{label} {timings[key]:.2f} s" for key, label in STAGES if key in timings]
    if stages:
        lines.append("Timings: " + " · ".join(stages))
    lines.append(f"Image embeddings from cache: {'yes' if result.cache_hit else 'no'}")
    return "\n\n".join(lines)
