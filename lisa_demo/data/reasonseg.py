"""ReasonSeg reader: folders of NAME.jpg + NAME.json pairs into records, masks and samples.

Layout (LISA's ReasonSeg): one folder per split holding NAME.jpg (or .jpeg/.png) with NAME.json
beside it. The JSON holds "text" (1-5 paraphrased queries), "is_sentence" (bool) and LabelMe
"shapes" labelled "target", "ignore" or "flag". Bad files never crash a run: each one is skipped
with one warning on the "lisa_demo.data" logger and counted in a ReadReport. Reading looks at
image headers only; pixels and masks are decoded lazily, per sample.
"""

from __future__ import annotations

import json
import logging
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger("lisa_demo.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
BACKGROUND_VALUE = 0
TARGET_VALUE = 1
IGNORE_VALUE = 255
QUERY_MODES = ("all", "first", "random")
EXPECTED_LAYOUT = "a ReasonSeg folder of NAME.jpg + NAME.json pairs (NAME.jpeg/.png also read)"

EXIF_ORIENTATION_TAG = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_INT32_LIMIT = 2.0**31  # polygon coordinates must convert to int32 pixels
# What PIL raises on a corrupt or truncated header, depending on the format plugin.
_HEADER_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)


class DataError(ValueError):
    """A dataset that cannot be used at all; the message says what was expected."""


# ---------------------------------------------------------------------------------------------
# Shapes and rasterising


def shape_label(shape: dict) -> str:
    """The shape's label, stripped and lower-cased; a shape without a label is a target."""
    return str(shape.get("label", "target")).strip().lower()


def is_ignore_shape(shape: dict) -> bool:
    """True when the label contains "ignore" (painted 255, excluded from evaluation)."""
    return "ignore" in shape_label(shape)


def is_flag_shape(shape: dict) -> bool:
    """True for LabelMe "flag" shapes, which ReasonSeg uses as markers and LISA drops."""
    return shape_label(shape) == "flag"


def polygon_points(shape: object) -> np.ndarray | None:
    """The shape's points as float64 [N, 2] (x, y), or None unless N >= 1 finite points.

    One or two points are kept: LISA paints them too (a dot, a line). Points may lie outside
    the image (annotators click past the border); only coordinates beyond the int32 range,
    where the pixel conversion is undefined, make a polygon unusable.
    """
    if not isinstance(shape, dict):
        return None
    try:
        points = np.asarray(shape.get("points"), dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 1:
        return None
    usable = np.isfinite(points).all() and (np.abs(points) < _INT32_LIMIT).all()
    return points if usable else None


def usable_shapes(shapes: Sequence[object]) -> tuple[dict, ...]:
    """Shapes that rasterise: flag shapes and polygons without usable points dropped."""
    return tuple(
        shape
        for shape in shapes
        if isinstance(shape, dict)
        and not is_flag_shape(shape)
        and polygon_points(shape) is not None
    )


def _pixel_points(points: np.ndarray) -> np.ndarray:
    """int32 [N, 2] pixels of float (x, y) points, truncated toward zero (-1.7 -> -1,
    -0.5 -> 0, 2.9 -> 2) and not clipped, as LISA's int32 conversion gives them."""
    return points.astype(np.int32)


def _paint_polygon(canvas: np.ndarray, points: np.ndarray, value: int) -> None:
    """Paint a closed polygon in place: its 1-pixel outline, then its filled inside.

    OpenCV paints only the part inside the canvas; a polygon leaving it keeps its shape.
    """
    cv2.polylines(canvas, [points], isClosed=True, color=int(value), thickness=1)
    cv2.fillPoly(canvas, [points], color=int(value))


def _painted_area(points: np.ndarray, height: int, width: int) -> int:
    """Pixels a polygon covers inside the image (painted on an image-size canvas, as LISA
    measures it: the part outside the image does not count)."""
    canvas = np.zeros((height, width), dtype=np.uint8)
    _paint_polygon(canvas, points, 1)
    return int(np.count_nonzero(canvas))


def rasterize_shapes(shapes: Sequence[dict], height: int, width: int) -> np.ndarray:
    """Paint LabelMe polygons into a ReasonSeg mask exactly as LISA does.

    Flag shapes and polygons without usable points are dropped (one or two points paint a
    dot or a line, as in the reference). Points become pixels by
    int32 conversion (truncation toward zero), with no clipping: a polygon that leaves the
    image keeps its shape and only its inside part is painted. Each polygon's area is the
    pixels it covers inside the image; the paint order is np.argsort(areas)[::-1] over the
    areas in file order (largest first, so smaller shapes painted later win; on equal areas
    numpy's default sort decides, as in the reference). Each polygon is painted as its
    1-pixel outline, then filled.

    Returns:
        uint8 [height, width]: 0 background, 1 target, 255 ignore (label containing "ignore").
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"mask size must be positive, got {height}x{width}")
    usable = usable_shapes(shapes)
    polygons = [_pixel_points(polygon_points(shape)) for shape in usable]
    # uint64, the dtype of the reference's canvas sums: numpy's sort, and so the order of
    # equal areas, is then the same.
    areas = np.array([_painted_area(points, height, width) for points in polygons], np.uint64)
    mask = np.full((height, width), BACKGROUND_VALUE, dtype=np.uint8)
    for index in np.argsort(areas)[::-1]:
        value = IGNORE_VALUE if is_ignore_shape(usable[index]) else TARGET_VALUE
        _paint_polygon(mask, polygons[index], value)
    return mask


# ---------------------------------------------------------------------------------------------
# Records, samples and the read report


@dataclass(frozen=True)
class ImageRecord:
    """One annotated image of a ReasonSeg folder; pixels and mask load on demand."""

    name: str  # file stem
    image_path: Path
    json_path: Path
    queries: tuple[str, ...]  # 1-5 paraphrases, stripped, non-empty
    is_sentence: bool  # sentence query (True) or short phrase (False)
    shapes: tuple[dict, ...]  # usable LabelMe shapes (flags and point-less polygons dropped)
    height: int  # pixels, after EXIF orientation
    width: int
    family: str | None = None  # optional top-level "family" key (synthetic data)

    @property
    def has_target(self) -> bool:
        """True when at least one shape paints target pixels."""
        return any(not is_ignore_shape(shape) for shape in self.shapes)

    def load_image(self) -> np.ndarray:
        """Decode the image: uint8 [height, width, 3] RGB (L/RGBA/P converted, EXIF applied)."""
        with Image.open(self.image_path) as image:
            rgb = ImageOps.exif_transpose(image).convert("RGB")
        pixels = np.array(rgb, dtype=np.uint8)
        if pixels.shape[:2] != (self.height, self.width):
            raise DataError(
                f"{self.image_path} is {pixels.shape[1]}x{pixels.shape[0]} now but was "
                f"{self.width}x{self.height} when the folder was read; re-read the folder"
            )
        return pixels

    def load_mask(self) -> np.ndarray:
        """Rasterise the shapes: uint8 [height, width], 0 background, 1 target, 255 ignore."""
        return rasterize_shapes(self.shapes, self.height, self.width)


@dataclass(frozen=True)
class Sample:
    """One (image, query) pair; explanation is the optional answer text after [SEG]."""

    record: ImageRecord
    query_index: int
    query: str
    explanation: str | None = None


@dataclass
class ReadReport:
    """What read_records found, used and skipped in one folder."""

    folder: Path
    images_found: int = 0  # distinct names with an image or a JSON file
    images_used: int = 0
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    empty_targets: int = 0  # kept with an empty mask, as the reference does
    dropped_polygons: int = 0  # polygons without usable (finite, int32) points

    def skip(self, reason: str, path: Path, detail: str) -> None:
        """Count one skipped file and log one warning line about it."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        logger.warning("skipping %s (%s): %s", path, reason, detail)

    def summary(self) -> str:
        """One line, e.g. "val: 200 images, 200 samples; skipped 3 (missing image: 3)"."""
        total = sum(self.skipped.values())
        line = f"{self.folder.name}: {self.images_used} images, {self.samples} samples"
        line += f"; skipped {total}"
        if total:
            line += " (" + ", ".join(f"{k}: {n}" for k, n in sorted(self.skipped.items())) + ")"
        if self.empty_targets:
            line += f"; {self.empty_targets} with an empty target"
        if self.dropped_polygons:
            line += f"; dropped {self.dropped_polygons} polygons without usable points"
        return line


# ---------------------------------------------------------------------------------------------
# Reading a folder


def _index_folder(folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Map stem -> JSON path and stem -> image path (first of IMAGE_EXTENSIONS wins)."""
    jsons: dict[str, Path] = {}
    images: dict[str, Path] = {}
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        if path.name.startswith(".") or not path.is_file():
            continue
        if suffix == ".json":
            jsons[path.stem] = path
        elif suffix in rank:
            best = images.get(path.stem)
            if best is None or rank[suffix] < rank[best.suffix.lower()]:
                images[path.stem] = path
    return jsons, images


def _load_json(path: Path, report: ReadReport) -> dict | None:
    """Parse an annotation file; None (skipped, logged) unless it is a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        report.skip("malformed json", path, str(error))
        return None
    if not isinstance(data, dict) or not isinstance(data.get("shapes", []), list):
        report.skip("malformed json", path, "expected an object with a list of shapes")
        return None
    return data


def _queries(text: object) -> tuple[str, ...]:
    """Stripped non-empty queries from a "text" value (a list of strings, or one string)."""
    items = [text] if isinstance(text, str) else text if isinstance(text, list) else []
    return tuple(item.strip() for item in items if isinstance(item, str) and item.strip())


def _as_bool(value: object) -> bool:
    """JSON booleans, plus the strings "true"/"false" some tools write."""
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value)


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) after EXIF orientation, read from the header only (no pixel decoding).

    Raises:
        DataError: the file is not a readable image.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except _HEADER_ERRORS as error:
        raise DataError(f"{path} is not a readable image: {error}") from error
    if orientation in TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return height, width


def _read_record(
    stem: str, json_path: Path | None, image_path: Path | None, report: ReadReport
) -> ImageRecord | None:
    """Build one record, or count and log why the pair is skipped."""
    if json_path is None:
        report.skip("missing json", image_path, f"expected {stem}.json beside the image")
        return None
    data = _load_json(json_path, report)
    if data is None:
        return None
    if image_path is None:
        report.skip("missing image", json_path, f"expected {stem}.jpg beside the JSON file")
        return None
    queries = _queries(data.get("text"))
    if not queries:
        report.skip("empty text", json_path, 'no non-empty query in "text"')
        return None
    try:
        height, width = image_size(image_path)
    except DataError as error:
        report.skip("unreadable image", image_path, str(error.__cause__))
        return None
    raw_shapes = data.get("shapes", [])
    shapes = usable_shapes(raw_shapes)
    flags = sum(1 for shape in raw_shapes if isinstance(shape, dict) and is_flag_shape(shape))
    report.dropped_polygons += len(raw_shapes) - flags - len(shapes)
    family = data.get("family")
    record = ImageRecord(
        name=stem,
        image_path=image_path,
        json_path=json_path,
        queries=queries,
        is_sentence=_as_bool(data.get("is_sentence", False)),
        shapes=shapes,
        height=height,
        width=width,
        family=family if isinstance(family, str) else None,
    )
    if not record.has_target:
        report.empty_targets += 1
        logger.warning("%s has no usable target polygon; kept with an empty mask", json_path)
    return record


def read_records(folder: Path | str) -> tuple[list[ImageRecord], ReadReport]:
    """Read a ReasonSeg folder: records sorted by name, and a report of what was skipped.

    Raises:
        DataError: the folder is missing, holds no JSON/image files, or no usable sample.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"dataset folder {folder} does not exist; expected {EXPECTED_LAYOUT}")
    jsons, images = _index_folder(folder)
    stems = sorted(set(jsons) | set(images))
    if not stems:
        raise DataError(f"{folder} holds no .json or image files; expected {EXPECTED_LAYOUT}")
    report = ReadReport(folder=folder, images_found=len(stems))
    records = []
    for stem in stems:
        record = _read_record(stem, jsons.get(stem), images.get(stem), report)
        if record is not None:
            records.append(record)
    report.images_used = len(records)
    report.samples = sum(len(record.queries) for record in records)
    if not records:
        raise DataError(
            f"no usable sample in {folder} ({report.summary()}); expected {EXPECTED_LAYOUT}"
        )
    return records, report


def load_explanations(path: Path | str) -> dict[tuple[str, str], str]:
    """Read an explanations file: a JSON list of {"image", "query", "outputs"}.

    Returns:
        (image stem, stripped query) -> explanation text.
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read explanations file {path}: {error}") from error
    if not isinstance(entries, list):
        raise DataError(f'{path}: expected a JSON list of {{"image", "query", "outputs"}}')
    explanations = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        image, query, outputs = (entry.get(key) for key in ("image", "query", "outputs"))
        if isinstance(image, str) and isinstance(query, str) and isinstance(outputs, str):
            explanations[(Path(image).stem, query.strip())] = outputs.strip()
    return explanations


# ---------------------------------------------------------------------------------------------
# The dataset


class ReasonSegDataset(Sequence[Sample]):
    """A plain sequence of Samples over one ReasonSeg folder (no torch needed).

    queries: "all" = one sample per paraphrase (LISA training), "first" = the first query of
    each image (LISA evaluation), "random" = one query per image, re-drawn by set_epoch().
    """

    def __init__(
        self,
        folder: Path | str,
        queries: str = "all",
        explanations: Path | str | None = None,
        seed: int = 0,
    ) -> None:
        if queries not in QUERY_MODES:
            raise ValueError(f"queries must be one of {QUERY_MODES}, got {queries!r}")
        self.records, report = read_records(folder)
        self.query_mode = queries
        self.seed = seed
        self.epoch = 0
        self._explanations = {} if explanations is None else load_explanations(explanations)
        self._pairs: list[tuple[int, int]] = []
        self.set_epoch(0)
        self.report = replace(report, samples=len(self._pairs), skipped=dict(report.skipped))

    def set_epoch(self, epoch: int) -> None:
        """Choose the (record, query) pairs of this epoch; only "random" changes with it."""
        self.epoch = epoch
        if self.query_mode == "all":
            self._pairs = [
                (r, q) for r, record in enumerate(self.records) for q in range(len(record.queries))
            ]
        elif self.query_mode == "first":
            self._pairs = [(r, 0) for r in range(len(self.records))]
        else:
            rng = random.Random(f"reasonseg/{self.seed}/{epoch}")
            self._pairs = [
                (r, rng.randrange(len(rec.queries))) for r, rec in enumerate(self.records)
            ]

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if not isinstance(index, int):
            raise TypeError(f"dataset indices must be integers, got {type(index).__name__}")
        record_index, query_index = self._pairs[index]
        record = self.records[record_index]
        query = record.queries[query_index]
        return Sample(
            record=record,
            query_index=query_index,
            query=query,
            explanation=self._explanations.get((record.name, query)),
        )
