"""Shapes of the synthetic scenes: their looks, outlines and placement on a canvas."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

SHAPE_KINDS = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (35, 150, 50),
    "blue": (35, 80, 215),
    "yellow": (240, 205, 20),
    "purple": (125, 45, 165),
    "orange": (245, 130, 20),
    "pink": (240, 120, 185),
}
CONCEPTS: tuple[str, ...] = SHAPE_KINDS + tuple(COLOURS)
SIZES: dict[str, float] = {"small": 0.18, "medium": 0.25, "large": 0.34}  # sqrt(area) / short side

IMAGE_SIDES = (192, 320)  # width and height range, pixels
MAX_HIDDEN = 0.2  # at most this fraction of any shape is covered by others
SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium-sized",), "large": ("large", "big")}


@dataclass
class SceneObject:
    """One shape: what it is, and where (centre and side in pixels) once placed."""

    kind: str
    colour: str
    size: str
    side: float = 0.0  # sqrt of the area, pixels
    angle: float = 0.0  # rotation, degrees
    x: float = 0.0  # centre, pixels
    y: float = 0.0

    @property
    def radius(self) -> float:
        """Distance from the centre to the farthest outline point, pixels."""
        return self.side * _UNIT_RADIUS[self.kind]

    def outline(self) -> np.ndarray:
        """float64 [N, 2] (x, y) outline in image pixels."""
        theta = math.radians(self.angle)
        rotation = np.array(
            [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
        )
        return _UNIT_OUTLINES[self.kind] @ rotation.T * self.side + (self.x, self.y)

    def mask(self, height: int, width: int) -> np.ndarray:
        """bool [height, width]: the pixels the shape covers."""
        canvas = np.zeros((height, width), dtype=np.uint8)
        cv2.fillPoly(canvas, [np.round(self.outline()).astype(np.int32)], 1)
        return canvas.astype(bool)


@dataclass(frozen=True)
class _Vocabulary:
    """The kinds and colours a scene may use, and the concept every target must have."""

    kinds: tuple[str, ...]
    colours: tuple[str, ...]
    focus_kind: str | None = None
    focus_colour: str | None = None


# ---------------------------------------------------------------------------------------------
# Shape outlines, normalised to unit area and centred on their bounding box


def _regular(corners: int, start_degrees: float) -> np.ndarray:
    angles = np.radians(start_degrees + 360.0 * np.arange(corners) / corners)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    angles = np.radians(-90.0 + 36.0 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross() -> np.ndarray:
    a, b = 1 / 3, 1.0  # arm half-width, arm reach
    return np.array(
        [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a)]
        + [(-b, -a), (-a, -a)]
    )


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1)


def _raw_outline(kind: str) -> np.ndarray:
    return {
        "circle": lambda: _regular(48, 0),
        "square": lambda: np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64),
        "triangle": lambda: _regular(3, -90),
        "star": _star,
        "hexagon": lambda: _regular(6, 0),
        "diamond": lambda: np.array([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)], dtype=np.float64),
        "cross": _cross,
        "heart": _heart,
    }[kind]()


def _unit_outline(kind: str) -> np.ndarray:
    """float64 [N, 2] outline of area 1, centred on its bounding box."""
    points = _raw_outline(kind).astype(np.float64)
    x, y = points[:, 0], points[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    points = points / math.sqrt(area)
    return points - (points.min(axis=0) + points.max(axis=0)) / 2


_UNIT_OUTLINES = {kind: _unit_outline(kind) for kind in SHAPE_KINDS}
_UNIT_RADIUS = {kind: float(np.linalg.norm(o, axis=1).max()) for kind, o in _UNIT_OUTLINES.items()}


# ---------------------------------------------------------------------------------------------
# Placing shapes


class _Canvas:
    """Places shapes one by one so that no shape is more than MAX_HIDDEN covered by the others.

    The bound holds whatever order the shapes are painted in afterwards.
    """

    def __init__(self, width: int, height: int, rng: random.Random) -> None:
        self.width, self.height, self.rng = width, height, rng
        self.short_side = min(width, height)
        self.objects: list[SceneObject] = []
        self._masks: list[np.ndarray] = []
        self._coverage = np.zeros((height, width), dtype=np.uint8)  # shapes covering each pixel

    def place(self, obj: SceneObject, accept: Callable[[SceneObject], bool] | None = None) -> bool:
        """Find a centre inside the image that `accept` allows; False if none found."""
        obj.side = SIZES[obj.size] * self.short_side * self.rng.uniform(0.95, 1.05)
        obj.angle = self.rng.uniform(-8.0, 8.0)
        margin = obj.radius + 2
        if 2 * margin >= min(self.width, self.height):
            return False
        for _ in range(60):
            obj.x = self.rng.uniform(margin, self.width - margin)
            obj.y = self.rng.uniform(margin, self.height - margin)
            if accept is not None and not accept(obj):
                continue
            mask = obj.mask(self.height, self.width)
            if self._overlap_ok(mask):
                self.objects.append(obj)
                self._masks.append(mask)
                self._coverage += mask
                return True
        return False

    def _overlap_ok(self, mask: np.ndarray) -> bool:
        area = np.count_nonzero(mask)
        if np.count_nonzero(mask & (self._coverage > 0)) > MAX_HIDDEN * area:
            return False
        coverage = self._coverage + mask
        for other in self._masks:
            if np.count_nonzero(other & (coverage > 1)) > MAX_HIDDEN * np.count_nonzero(other):
                return False
        return True

    def place_all(
        self, objects: Sequence[SceneObject], accept: Callable[[SceneObject], bool] | None = None
    ) -> bool:
        """Place every object with the same constraint; False as soon as one does not fit."""
        return all(self.place(obj, accept) for obj in objects)


# ---------------------------------------------------------------------------------------------
# Choosing looks


def _pick(rng: random.Random, pool: Sequence[str], *avoid: str | None) -> str:
    return rng.choice([item for item in pool if item not in avoid])


def _random_size(rng: random.Random, *avoid: str) -> str:
    sizes = [s for s in SIZES if s not in avoid]
    weights = [{"small": 4, "medium": 4, "large": 2}[s] for s in sizes]
    return rng.choices(sizes, weights)[0]


def _target_look(rng: random.Random, vocab: _Vocabulary) -> SceneObject:
    """A random look that has the focus concept, if any."""
    kind = vocab.focus_kind or rng.choice(vocab.kinds)
    colour = vocab.focus_colour or rng.choice(vocab.colours)
    return SceneObject(kind, colour, _random_size(rng))


def _random_look(rng: random.Random, vocab: _Vocabulary) -> SceneObject:
    return SceneObject(rng.choice(vocab.kinds), rng.choice(vocab.colours), _random_size(rng))


def _fillers(
    rng: random.Random, vocab: _Vocabulary, count: int, allowed: Callable[[SceneObject], bool]
) -> list[SceneObject]:
    """`count` random looks that `allowed` accepts."""
    looks: list[SceneObject] = []
    while len(looks) < count:
        look = _random_look(rng, vocab)
        if allowed(look):
            looks.append(look)
    return looks


def _same_look(a: SceneObject, b: SceneObject, size: bool = False) -> bool:
    """Same kind and colour (and size, when asked)."""
    return (a.kind, a.colour) == (b.kind, b.colour) and (not size or a.size == b.size)
