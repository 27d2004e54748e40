"""Rendering a placed scene, its ReasonSeg annotation, and what an annotation says about its
target (description, classes, explanation)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import cv2
import numpy as np

from lisa_demo.data.synthetic.shapes import (
    COLOURS,
    IMAGE_SIDES,
    SHAPE_KINDS,
    SIZE_WORDS,
    SIZES,
    SceneObject,
)

IGNORE_PROBABILITY = 0.15  # share of scenes whose target also gets an ignore region


# ---------------------------------------------------------------------------------------------
# Rendering and annotating


def _image_size(rng: random.Random) -> tuple[int, int]:
    """(width, height) in IMAGE_SIDES, never close to square."""
    while True:
        width, height = (rng.randint(*IMAGE_SIDES) for _ in range(2))
        if abs(width / height - 1) >= 0.12:
            return width, height


def _background(rng: random.Random, height: int, width: int) -> tuple[np.ndarray, str]:
    """float32 [height, width, 3] light background (plain, gradient, stripes or noise).

    Colours stay close to grey, so that no background reads as one of the named COLOURS.
    """
    grey = rng.uniform(222, 245)
    base = np.array([grey + rng.uniform(-8, 8) for _ in range(3)], dtype=np.float32)
    style = rng.choice(("plain", "gradient", "stripes", "noise"))
    image = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    along = xs * math.cos(theta) + ys * math.sin(theta)
    if style == "gradient":
        other = np.clip(
            base + rng.uniform(-25, 25) + [rng.uniform(-6, 6) for _ in range(3)], 195, 255
        )
        t = ((along - along.min()) / max(float(np.ptp(along)), 1.0))[..., None]
        image = base * (1 - t) + other * t
    elif style == "stripes":
        half_period = rng.uniform(6, 14)
        band = (np.floor(along / half_period) % 2)[..., None]
        image = image - band * rng.uniform(8, 18)
    return image, style


def _render(
    objects: Sequence[SceneObject], width: int, height: int, rng: random.Random
) -> tuple[np.ndarray, np.ndarray]:
    """Paint the objects in order (later on top).

    Returns:
        image uint8 [height, width, 3] RGB, and labels int16 [height, width]: the index of the
        object seen at each pixel, -1 for background.
    """
    np_rng = np.random.default_rng(rng.getrandbits(64))
    image, style = _background(rng, height, width)
    labels = np.full((height, width), -1, dtype=np.int16)
    for index, obj in enumerate(objects):
        mask = obj.mask(height, width)
        image[mask] = np.array(COLOURS[obj.colour]) + np_rng.uniform(-8, 8, size=3)
        labels[mask] = index
    if style == "noise":
        image = image + np_rng.normal(0.0, 5.0, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels


def _outer_polygons(mask: np.ndarray) -> tuple[list[list[list[int]]], bool]:
    """Outer contours of a bool mask as [[x, y], ...] polygons, and whether it has holes."""
    contours, hierarchy = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    if hierarchy is None:
        return [], False
    parents = hierarchy[0][:, 3]
    polygons = [c.reshape(-1, 2).tolist() for c, p in zip(contours, parents, strict=True) if p < 0]
    return [poly for poly in polygons if len(poly) >= 3], bool((parents >= 0).any())


def _shape(label: str, points: list[list[int]]) -> dict:
    return {"label": label, "points": points, "shape_type": "polygon"}


def _ignore_shapes(rng: random.Random, full: np.ndarray, visible: np.ndarray) -> list[dict]:
    """An ignore region: the target's hidden part, or a 2-pixel ring around its outline."""
    hidden = full & ~visible
    if np.count_nonzero(hidden) >= 20 and rng.random() < 0.5:
        region = hidden
    else:
        # Outside the outline only: the (smaller) target polygon is painted over it.
        kernel = np.ones((3, 3), dtype=np.uint8)
        region = cv2.dilate(visible.astype(np.uint8), kernel, iterations=2) > 0
    polygons, has_holes = _outer_polygons(region)
    return [] if has_holes else [_shape("ignore", poly) for poly in polygons]


def _describe(obj: SceneObject, is_target: bool, visible: np.ndarray) -> dict:
    polygons, _ = _outer_polygons(visible)
    return {
        "kind": obj.kind,
        "colour": obj.colour,
        "size": obj.size,
        "centre": [round(obj.x, 1), round(obj.y, 1)],
        "target": is_target,
        "outline": polygons,  # outer outlines of its visible pixels, [[[x, y], ...], ...]
    }


def _annotate(
    rng: random.Random,
    objects: Sequence[SceneObject],
    labels: np.ndarray,
    target_index: int,
    family: str,
    phrases: Sequence[str],
    sentences: Sequence[str],
) -> dict | None:
    """The ReasonSeg annotation of objects[target_index] in a rendered scene; None when its
    visible outline has a hole."""
    height, width = labels.shape
    target = objects[target_index]
    visible = labels == target_index
    polygons, has_holes = _outer_polygons(visible)
    if has_holes or not polygons:
        return None
    shapes = [_shape("target", poly) for poly in polygons]
    if rng.random() < IGNORE_PROBABILITY:
        shapes = _ignore_shapes(rng, target.mask(height, width), visible) + shapes
    is_sentence = rng.random() < 0.5
    pool = sentences if is_sentence else phrases
    return {
        "text": rng.sample(pool, min(rng.randint(1, 5), len(pool))),
        "is_sentence": is_sentence,
        "family": family,
        "shapes": shapes,
        "objects": [
            _describe(obj, obj is target, labels == index) for index, obj in enumerate(objects)
        ],
        "imageHeight": height,
        "imageWidth": width,
    }


def where(x: float, y: float, width: int, height: int) -> str:
    """Which ninth of the image a point is in: "at the top left", "on the right", "in the
    middle" (thirds of the width and of the height)."""
    column = ("left", None, "right")[min(2, int(3 * x / width))]
    row = ("top", None, "bottom")[min(2, int(3 * y / height))]
    if row and column:
        return f"at the {row} {column}"
    if row or column:
        return f"at the {row}" if row else f"on the {column}"
    return "in the middle"


REGIONS = tuple(where(x + 0.5, y + 0.5, 3, 3) for y in range(3) for x in range(3))
# Class spaces of an object's description: kind, colour, size and region (ninth of the image).
DESCRIPTION_CLASSES = (len(SHAPE_KINDS), len(COLOURS), len(SIZES), len(REGIONS))


def object_classes(obj: dict, width: int, height: int) -> tuple[int, int, int, int]:
    """Indices of an annotation object's kind, colour, size and region (DESCRIPTION_CLASSES)."""
    x, y = obj["centre"]
    return (
        SHAPE_KINDS.index(obj["kind"]),
        list(COLOURS).index(obj["colour"]),
        list(SIZES).index(obj["size"]),
        REGIONS.index(where(x, y, width, height)),
    )


def target_classes(annotation: dict) -> tuple[int, int, int, int] | None:
    """object_classes of the scene's target; None for annotations without synthetic objects."""
    targets = [
        o for o in annotation.get("objects") or [] if isinstance(o, dict) and o.get("target")
    ]
    if len(targets) != 1:
        return None
    try:
        return object_classes(targets[0], annotation["imageWidth"], annotation["imageHeight"])
    except (KeyError, ValueError, TypeError):
        return None


def target_description(annotation: dict) -> str:
    """'It is the small red triangle at the top left.' for the scene's target (what an
    explanation says): its size, colour and kind, and where its centre is."""
    target = next(obj for obj in annotation["objects"] if obj["target"])
    size = SIZE_WORDS[target["size"]][0]
    x, y = target["centre"]
    place = where(x, y, annotation["imageWidth"], annotation["imageHeight"])
    return f"It is the {size} {target['colour']} {target['kind']} {place}."


def explanations_for(image_name: str, annotation: dict) -> list[dict]:
    """ReasonSeg-style explanation entries ({image, query, outputs}), one per query."""
    outputs = target_description(annotation)
    return [{"image": image_name, "query": q, "outputs": outputs} for q in annotation["text"]]
