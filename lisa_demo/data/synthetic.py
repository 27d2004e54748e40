"""Synthetic reasoning-segmentation scenes, written in the ReasonSeg layout.

Each scene shows 3 to 6 coloured shapes on a light background; exactly one of them is the
target, picked out by a query that needs a little reasoning. Query families (the "family" key):

- attribute:   size + colour + kind, e.g. "the small red triangle" (distractors share two of them)
- function:    what the shape is like, e.g. "the shape that could roll down a slope" (a circle)
- superlative: "the largest blue object", "the leftmost circle"
- spatial:     "the shape just left of the green circle" (nearest in a cone, with a clear margin)
- uniqueness:  "the only star", "the only yellow object"

The annotation polygon is the outline of the target's visible pixels. About 15% of the images
also carry an "ignore" polygon: a thin ring around the target or its hidden (occluded) part.
With extra queries (training split only), a scene also gets NAME_xK samples: the same image,
another of its shapes as the target, named by an attribute, uniqueness, function or
superlative query.

CLI: python -m lisa_demo.data.synthetic --out DIR --train N --val M [--test K] --seed S
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from lisa_demo.paths import OUTPUT_FOLDER, check_cli_paths

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
EXPLANATIONS_SUFFIX = "explanations.json"  # OUT/SPLIT_explanations.json
FAMILIES = ("attribute", "function", "superlative", "spatial", "uniqueness")

IMAGE_SIDES = (192, 320)  # width and height range, pixels
MAX_HIDDEN = 0.2  # at most this fraction of any shape is covered by others
IGNORE_PROBABILITY = 0.15
JPEG_QUALITY = 95
_ATTEMPTS = 200

# Clauses that complete "the shape that ...": each describes one kind and no other.
FUNCTIONS: dict[str, tuple[str, ...]] = {
    "circle": ("could roll down a slope", "looks like a coin", "has no corners at all"),
    "square": ("has four equal sides and four right angles", "looks like a sticky note"),
    "triangle": ("has exactly three corners", "looks like a slice of pizza"),
    "star": ("twinkles in the night sky", "looks like a sheriff's badge", "has five points"),
    "hexagon": ("looks like a honeycomb cell", "has exactly six sides"),
    "diamond": ("looks like a kite", "stands on one of its corners like a rhombus"),
    "cross": ("looks like a plus sign", "looks like a first-aid symbol"),
    "heart": ("stands for love", "belongs on a valentine card"),
}
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


@dataclass
class _Draft:
    """A placed scene and its target, with every paraphrase that picks out the target."""

    objects: list[SceneObject]
    target: SceneObject
    phrases: list[str]
    sentences: list[str]


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


def _expand(templates: Sequence[str], **slots: Sequence[str]) -> list[str]:
    """Every template filled with every combination of slot values, without duplicates."""
    filled: list[str] = []
    for template in templates:
        results = [template]
        for name, values in slots.items():
            key = "{" + name + "}"
            if key in template:
                results = [r.replace(key, v) for r in results for v in values]
        filled += [r for r in results if r not in filled]
    return filled


# ---------------------------------------------------------------------------------------------
# Query families: each builds a placed scene and its paraphrases, or None to try again


def _attribute_scene(rng: random.Random, vocab: _Vocabulary, canvas: _Canvas) -> _Draft | None:
    """Size + colour + kind; distractors each share two of the three attributes."""
    target = _target_look(rng, vocab)
    t = target
    sharing = [
        SceneObject(t.kind, t.colour, _random_size(rng, t.size)),
        SceneObject(t.kind, _pick(rng, vocab.colours, t.colour), t.size),
        SceneObject(_pick(rng, vocab.kinds, t.kind), t.colour, t.size),
    ]
    rng.shuffle(sharing)
    count = rng.randint(2, 5)
    others = sharing[:count] + _fillers(
        rng, vocab, max(0, count - len(sharing)), lambda o: not _same_look(o, t, size=True)
    )
    if not canvas.place_all([target, *others]):
        return None
    return _Draft(canvas.objects, target, *_attribute_queries(target))


def _attribute_queries(t: SceneObject) -> tuple[list[str], list[str]]:
    """(phrases, sentences) naming t's size, colour and kind."""
    slots = {"s": SIZE_WORDS[t.size], "c": [t.colour], "k": [t.kind]}
    phrases = _expand(("the {s} {c} {k}", "the {c} {k} that is {s}", "the {s} {k} in {c}"), **slots)
    sentences = _expand(
        (
            "Which object is the {s} {c} {k}?",
            "Can you find the {s} {c} {k} in this picture?",
            "Where is the {s} {c} {k}?",
            "Show me the {c} {k} that is {s}.",
        ),
        **slots,
    )
    return phrases, sentences


def _function_scene(rng: random.Random, vocab: _Vocabulary, canvas: _Canvas) -> _Draft | None:
    """A description of what the kind is like; colour added when a same-kind shape is present."""
    target = _target_look(rng, vocab)
    t = target
    with_colour = vocab.focus_colour is not None or rng.random() < 0.5
    others = [SceneObject(_pick(rng, vocab.kinds, t.kind), t.colour, _random_size(rng))]
    if with_colour:
        others.append(SceneObject(t.kind, _pick(rng, vocab.colours, t.colour), _random_size(rng)))
    others += _fillers(
        rng,
        vocab,
        rng.randint(2, 5) - len(others),
        lambda o: o.kind != t.kind or (with_colour and o.colour != t.colour),
    )
    if not canvas.place_all([target, *others]):
        return None
    return _Draft(canvas.objects, target, *_function_queries(target, with_colour))


def _function_queries(t: SceneObject, with_colour: bool) -> tuple[list[str], list[str]]:
    """(phrases, sentences) saying what t's kind is like (never naming it), with its colour
    when asked."""
    slots = {"c": [f"{t.colour} " if with_colour else ""], "f": FUNCTIONS[t.kind]}
    phrases = _expand(
        ("the {c}shape that {f}", "the {c}object that {f}", "the {c}one that {f}"), **slots
    )
    sentences = _expand(
        (
            "Which {c}shape in the picture {f}?",
            "Can you find the {c}object that {f}?",
            "Show me the {c}shape that {f}.",
            "What is the {c}shape here that {f}?",
        ),
        **slots,
    )
    return phrases, sentences


_SUPERLATIVES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "largest": (
        ("the largest {g}", "the biggest {g}", "the {g} that is bigger than every other {g}"),
        ("Which {g} is the largest?", "Can you find the biggest {g}?", "Show me the largest {g}."),
    ),
    "smallest": (
        ("the smallest {g}", "the tiniest {g}", "the {g} that is smaller than every other {g}"),
        (
            "Which {g} is the smallest?",
            "Can you find the tiniest {g}?",
            "Show me the smallest {g}.",
        ),
    ),
    "leftmost": (
        ("the leftmost {g}", "the {g} furthest to the left", "the {g} nearest the left edge"),
        (
            "Which {g} is furthest to the left?",
            "Which {g} is closest to the left edge?",
            "Can you find the leftmost {g}?",
        ),
    ),
    "rightmost": (
        ("the rightmost {g}", "the {g} furthest to the right", "the {g} nearest the right edge"),
        (
            "Which {g} is furthest to the right?",
            "Which {g} is closest to the right edge?",
            "Can you find the rightmost {g}?",
        ),
    ),
    "topmost": (
        ("the topmost {g}", "the highest {g}", "the {g} nearest the top edge"),
        (
            "Which {g} is the highest in the image?",
            "Which {g} is closest to the top edge?",
            "Can you find the topmost {g}?",
        ),
    ),
    "bottommost": (
        ("the bottommost {g}", "the lowest {g}", "the {g} nearest the bottom edge"),
        (
            "Which {g} is the lowest in the image?",
            "Which {g} is closest to the bottom edge?",
            "Can you find the bottommost {g}?",
        ),
    ),
}
# For position superlatives: (axis, sign) so that sign * coordinate is smallest for the target.
_EXTREMES = {"leftmost": (0, 1), "rightmost": (0, -1), "topmost": (1, 1), "bottommost": (1, -1)}


def _extremeness(obj: SceneObject, measure: str, edge: bool = False) -> float:
    """Lower = further in the measure's direction; edge=True uses the outline's extreme."""
    axis, sign = _EXTREMES[measure]
    return sign * (obj.x, obj.y)[axis] - (obj.radius if edge else 0.0)


def _superlative_scene(rng: random.Random, vocab: _Vocabulary, canvas: _Canvas) -> _Draft | None:
    """Largest/smallest/leftmost/... within a group (all shapes, one colour or one kind)."""
    measure = rng.choice(tuple(_SUPERLATIVES))
    group = "colour" if vocab.focus_colour else "kind" if vocab.focus_kind else None
    group = group or rng.choice(("colour", "kind", None))
    target = _target_look(rng, vocab)
    t = target
    in_group = {
        "colour": lambda o: o.colour == t.colour,
        "kind": lambda o: o.kind == t.kind,
        None: lambda o: True,
    }[group]
    total = rng.randint(3, 6)
    n_group = total - 1 if group is None else rng.randint(1, min(3, total - 2))
    n_out = total - 1 - n_group
    members = [_random_look(rng, vocab) for _ in range(n_group)]
    for obj in members:
        if group is not None:
            setattr(obj, group, getattr(t, group))
    outsiders = _fillers(rng, vocab, n_out, lambda o: not in_group(o))
    if measure in ("largest", "smallest"):
        placed = _place_size_superlative(rng, canvas, measure, target, members, outsiders)
    else:
        placed = _place_position_superlative(canvas, measure, target, members, outsiders)
    if not placed:
        return None
    g = {"colour": [f"{t.colour} shape", f"{t.colour} object"], "kind": [t.kind]}
    slots = {"g": g.get(group, ["shape", "object"])}
    phrases, sentences = _SUPERLATIVES[measure]
    return _Draft(canvas.objects, target, _expand(phrases, **slots), _expand(sentences, **slots))


def _place_size_superlative(
    rng: random.Random,
    canvas: _Canvas,
    measure: str,
    target: SceneObject,
    members: list[SceneObject],
    outsiders: list[SceneObject],
) -> bool:
    """The target alone has the extreme size in its group; an outsider matches it."""
    extreme = "large" if measure == "largest" else "small"
    target.size = extreme
    for obj in members:
        obj.size = _random_size(rng, extreme)
    if outsiders:
        outsiders[0].size = extreme  # so the group word is needed
    return canvas.place_all([target, *members, *outsiders])


def _place_position_superlative(
    canvas: _Canvas,
    measure: str,
    target: SceneObject,
    members: list[SceneObject],
    outsiders: list[SceneObject],
) -> bool:
    """The target is clearly the most extreme of its group; an outsider is more extreme still."""
    axis, sign = _EXTREMES[measure]
    extent = (canvas.width, canvas.height)[axis]
    half = sign * extent / 2  # the target sits in the first half of that direction
    if not canvas.place(target, lambda o: _extremeness(o, measure) < half):
        return False
    centre, edge = _extremeness(target, measure), _extremeness(target, measure, edge=True)

    def behind(obj: SceneObject) -> bool:
        return (
            _extremeness(obj, measure) > centre + 0.15 * extent
            and _extremeness(obj, measure, edge=True) > edge + 0.06 * extent
        )

    def ahead(obj: SceneObject) -> bool:
        return _extremeness(obj, measure) < centre - 0.08 * extent

    if not canvas.place_all(members, behind):
        return False
    return not outsiders or (canvas.place(outsiders[0], ahead) and canvas.place_all(outsiders[1:]))


_DIRECTIONS: dict[str, tuple[tuple[float, float], tuple[str, ...]]] = {
    "left": ((-1.0, 0.0), ("just left of", "immediately to the left of", "directly left of")),
    "right": ((1.0, 0.0), ("just right of", "immediately to the right of", "directly right of")),
    "above": ((0.0, -1.0), ("right above", "directly above", "just above")),
    "below": ((0.0, 1.0), ("right below", "directly below", "just beneath")),
}


def _bearing(reference: SceneObject, obj: SceneObject, direction: str) -> tuple[float, float]:
    """(distance, angle in degrees off the direction) from the reference's centre to obj's."""
    (dx, dy), _ = _DIRECTIONS[direction]
    vx, vy = obj.x - reference.x, obj.y - reference.y
    distance = math.hypot(vx, vy)
    cosine = (vx * dx + vy * dy) / distance if distance else 1.0
    return distance, math.degrees(math.acos(max(-1.0, min(1.0, cosine))))


def _spatial_scene(rng: random.Random, vocab: _Vocabulary, canvas: _Canvas) -> _Draft | None:
    """The shape next to a unique reference shape: nearest in a narrow cone, others far away."""
    direction = rng.choice(tuple(_DIRECTIONS))
    target = _target_look(rng, vocab)
    t = target
    ref = SceneObject(rng.choice(vocab.kinds), rng.choice(vocab.colours), _random_size(rng))
    if _same_look(ref, t):
        return None
    others = [
        SceneObject(ref.kind, _pick(rng, vocab.colours, ref.colour), _random_size(rng)),
        SceneObject(_pick(rng, vocab.kinds, ref.kind), ref.colour, _random_size(rng)),
        SceneObject(t.kind, t.colour, _random_size(rng)),  # a look-alike of the target
    ]
    others = others[: rng.randint(1, 3)]
    others += _fillers(
        rng, vocab, rng.randint(0, 4 - len(others)), lambda o: not _same_look(o, ref)
    )
    if not canvas.place(ref):
        return None
    gap = 0.12 * canvas.short_side

    def next_to(obj: SceneObject) -> bool:
        distance, angle = _bearing(ref, obj, direction)
        return angle <= 25 and ref.radius + obj.radius < distance < ref.radius + obj.radius + gap

    if not canvas.place(target, next_to):
        return None
    reach = 1.8 * _bearing(ref, target, direction)[0]

    def elsewhere(obj: SceneObject) -> bool:
        distance, angle = _bearing(ref, obj, direction)
        return angle > 60 or distance > reach

    if not canvas.place_all(others, elsewhere):
        return None
    nouns = _spatial_nouns(rng, vocab, t)
    slots = {"t": nouns, "r": [f"{ref.colour} {ref.kind}"], "rel": _DIRECTIONS[direction][1]}
    phrases = _expand(("the {t} {rel} the {r}", "the {t} that is {rel} the {r}"), **slots)
    sentences = _expand(
        (
            "Which {t} is {rel} the {r}?",
            "Can you find the {t} {rel} the {r}?",
            "Show me the {t} that is {rel} the {r}.",
        ),
        **slots,
    )
    return _Draft(canvas.objects, target, phrases, sentences)


def _spatial_nouns(rng: random.Random, vocab: _Vocabulary, target: SceneObject) -> list[str]:
    """How the query names the target; it names the focus concept when there is one."""
    if vocab.focus_kind:
        return [target.kind]
    if vocab.focus_colour:
        return [f"{target.colour} shape", f"{target.colour} object"]
    return rng.choice(([target.kind], ["shape", "object"], [f"{target.colour} shape"]))


def _uniqueness_scene(rng: random.Random, vocab: _Vocabulary, canvas: _Canvas) -> _Draft | None:
    """The only shape of its kind (or colour); every other kind (colour) comes in pairs."""
    by = "kind" if vocab.focus_kind else "colour" if vocab.focus_colour else None
    by = by or rng.choice(("kind", "colour"))
    target = _target_look(rng, vocab)
    t = target
    count = rng.randint(2, 5)
    pool = vocab.kinds if by == "kind" else vocab.colours
    values = rng.sample([v for v in pool if v != getattr(t, by)], max(1, count // 2))
    others = [_random_look(rng, vocab) for _ in range(count)]
    for index, obj in enumerate(others):
        setattr(obj, by, values[index % len(values)])  # each other value at least twice
    if by == "kind":
        others[0].colour = t.colour  # another shape shares the target's colour
    else:
        others[0].kind = t.kind  # another shape shares the target's kind
    others[-1].size = t.size
    if not canvas.place_all([target, *others]):
        return None
    return _Draft(canvas.objects, target, *_uniqueness_queries(target, by))


def _uniqueness_queries(t: SceneObject, by: str) -> tuple[list[str], list[str]]:
    """(phrases, sentences) calling t the only shape of its kind (by="kind") or colour."""
    if by == "kind":
        slots = {"x": [t.kind], "y": [t.kind]}
    else:
        slots = {"x": [f"{t.colour} object", f"{t.colour} shape"], "y": [f"{t.colour} one"]}
    phrases = _expand(
        ("the only {x}", "the single {x} in the image", "the one and only {x}"), **slots
    )
    sentences = _expand(
        (
            "Which shape is the only {y}?",
            "Can you find the only {x} in this picture?",
            "There is exactly one {x} here; which is it?",
            "Show me the single {x}.",
        ),
        **slots,
    )
    return phrases, sentences


_BUILDERS = {
    "attribute": _attribute_scene,
    "function": _function_scene,
    "superlative": _superlative_scene,
    "spatial": _spatial_scene,
    "uniqueness": _uniqueness_scene,
}


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


def _finish(
    rng: random.Random, draft: _Draft, family: str, width: int, height: int
) -> tuple[np.ndarray, dict, list[SceneObject], np.ndarray] | None:
    """Render a draft and write its annotation; None when the target outline has a hole.

    Returns the image, the annotation, the objects in paint order and the label image.
    """
    objects = list(draft.objects)
    rng.shuffle(objects)  # paint order; every shape stays >= 80% visible in any order
    image, labels = _render(objects, width, height, rng)
    target_index = next(i for i, obj in enumerate(objects) if obj is draft.target)
    annotation = _annotate(
        rng, objects, labels, target_index, family, draft.phrases, draft.sentences
    )
    return None if annotation is None else (image, annotation, objects, labels)


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


EXTRA_FAMILIES = ("attribute", "uniqueness", "function", "superlative")
DEFAULT_EXTRA_FAMILIES = ("attribute", "uniqueness")


def _extra_annotations(
    rng: random.Random,
    objects: Sequence[SceneObject],
    labels: np.ndarray,
    target: SceneObject,
    count: int,
    vocab: _Vocabulary,
    families: Sequence[str] = DEFAULT_EXTRA_FAMILIES,
) -> list[dict]:
    """Up to `count` more annotations of a rendered scene, each about a different shape other
    than `target` that a query picks out by itself, in one of `families`: its size, colour and
    kind when no other shape has all three (attribute); the only shape of its kind or colour
    (uniqueness); what its kind is like, with its colour when another shape has its kind
    (function); the largest, smallest or furthest in a direction of all shapes, of its colour
    or of its kind, by the margins the superlative scenes use (superlative). With a focus
    concept, only shapes that have it, by queries that name it."""
    height, width = labels.shape
    needed = {"kind"} if vocab.focus_kind else {"colour"} if vocab.focus_colour else set()
    candidates = []
    for index, obj in enumerate(objects):
        if obj is target or (vocab.focus_kind or obj.kind) != obj.kind:
            continue
        if (vocab.focus_colour or obj.colour) != obj.colour:
            continue
        others = [o for o in objects if o is not obj]
        options = []  # (family, concepts the query names, (phrases, sentences))
        if "attribute" in families and not any(_same_look(o, obj, size=True) for o in others):
            options.append(("attribute", {"kind", "colour"}, _attribute_queries(obj)))
        for by in ("kind", "colour") if "uniqueness" in families else ():
            if all(getattr(o, by) != getattr(obj, by) for o in others):
                options.append(("uniqueness", {by}, _uniqueness_queries(obj, by)))
        if "function" in families:
            if all(o.kind != obj.kind for o in others):
                options.append(("function", set(), _function_queries(obj, with_colour=False)))
            elif not any(_same_look(o, obj) for o in others):
                options.append(("function", {"colour"}, _function_queries(obj, True)))
        if "superlative" in families:
            options += [
                ("superlative", named, queries)
                for named, queries in _superlative_options(obj, others, width, height)
            ]
        options = [(family, queries) for family, named, queries in options if needed <= named]
        if options:
            candidates.append((index, options))
    rng.shuffle(candidates)
    extras = []
    for index, options in candidates:
        family, (phrases, sentences) = rng.choice(options)
        annotation = _annotate(rng, objects, labels, index, family, phrases, sentences)
        if annotation is not None:
            extras.append(annotation)
        if len(extras) == count:
            break
    return extras


def _superlative_options(
    obj: SceneObject, others: Sequence[SceneObject], width: int, height: int
) -> list[tuple[set[str], tuple[list[str], list[str]]]]:
    """(concepts named, (phrases, sentences)) of every superlative that picks out obj among
    all shapes, those of its colour or those of its kind (a group of at least two)."""
    found = []
    for group in (None, "colour", "kind"):
        members = [o for o in others if group is None or getattr(o, group) == getattr(obj, group)]
        if not members:
            continue
        words = {"colour": [f"{obj.colour} shape", f"{obj.colour} object"], "kind": [obj.kind]}
        slots = {"g": words.get(group, ["shape", "object"])}
        for measure, (phrases, sentences) in _SUPERLATIVES.items():
            if measure in ("largest", "smallest"):
                extreme = "large" if measure == "largest" else "small"
                clear = obj.size == extreme and all(o.size != extreme for o in members)
            else:  # the margins of _place_position_superlative
                axis, sign = _EXTREMES[measure]
                extent = (width, height)[axis]
                centre = _extremeness(obj, measure)
                edge = _extremeness(obj, measure, edge=True)
                clear = centre < sign * extent / 2 and all(
                    _extremeness(o, measure) > centre + 0.15 * extent
                    and _extremeness(o, measure, edge=True) > edge + 0.06 * extent
                    for o in members
                )
            if clear:
                named = set() if group is None else {group}
                found.append((named, (_expand(phrases, **slots), _expand(sentences, **slots))))
    return found


# ---------------------------------------------------------------------------------------------
# Public API


def _vocabulary(exclude_concept: str | None, focus_concept: str | None) -> _Vocabulary:
    """Validate the concepts and build the pools of kinds and colours."""
    for concept in (exclude_concept, focus_concept):
        if concept is not None and concept not in CONCEPTS:
            raise ValueError(f"unknown concept {concept!r}; known concepts: {', '.join(CONCEPTS)}")
    if exclude_concept is not None and exclude_concept == focus_concept:
        raise ValueError(f"{exclude_concept!r} cannot be both excluded and the focus concept")
    return _Vocabulary(
        kinds=tuple(k for k in SHAPE_KINDS if k != exclude_concept),
        colours=tuple(c for c in COLOURS if c != exclude_concept),
        focus_kind=focus_concept if focus_concept in SHAPE_KINDS else None,
        focus_colour=focus_concept if focus_concept in COLOURS else None,
    )


def scene_families(focus_concept: str | None = None) -> tuple[str, ...]:
    """Families a scene may use. A focus kind drops "function", whose queries never name it."""
    return tuple(f for f in FAMILIES if not (f == "function" and focus_concept in SHAPE_KINDS))


def generate_scene(
    rng: random.Random,
    exclude_concept: str | None = None,
    focus_concept: str | None = None,
    family: str | None = None,
) -> tuple[np.ndarray, dict]:
    """One scene, drawn entirely from `rng` (same state -> same scene).

    Args:
        exclude_concept: a kind or colour that appears in no shape and no query.
        focus_concept: a kind or colour that the target has and the query names.
        family: one of scene_families(focus_concept); random when None.

    Returns:
        image: uint8 [H, W, 3] RGB, H and W in IMAGE_SIDES, never square.
        annotation: ReasonSeg JSON ("text", "is_sentence", "shapes") plus "family", "objects"
            (kind, colour, size, centre, target and the outline of the visible pixels; in
            paint order), "imageHeight", "imageWidth".
    """
    image, annotations = generate_scene_queries(rng, exclude_concept, focus_concept, family)
    return image, annotations[0]


def generate_scene_queries(
    rng: random.Random,
    exclude_concept: str | None = None,
    focus_concept: str | None = None,
    family: str | None = None,
    extra_queries: int = 0,
    extra_rng: random.Random | None = None,
    extra_families: Sequence[str] = DEFAULT_EXTRA_FAMILIES,
) -> tuple[np.ndarray, list[dict]]:
    """generate_scene's scene with its annotation first, then up to `extra_queries` more
    annotations of the same image, each about another shape by a query of one of
    `extra_families` (see _extra_annotations), drawn from `extra_rng` so that the scene and its
    first annotation do not depend on them."""
    vocab = _vocabulary(exclude_concept, focus_concept)
    families = scene_families(focus_concept)
    if family is not None and family not in families:
        raise ValueError(f"family must be one of {families}, got {family!r}")
    family = family or rng.choice(families)
    for _ in range(_ATTEMPTS):
        width, height = _image_size(rng)
        draft = _BUILDERS[family](rng, vocab, _Canvas(width, height, rng))
        scene = None if draft is None else _finish(rng, draft, family, width, height)
        if scene is not None:
            image, annotation, objects, labels = scene
            extras = []
            if extra_queries > 0:
                extra_rng = extra_rng or random.Random(rng.getrandbits(64))
                extras = _extra_annotations(
                    extra_rng, objects, labels, draft.target, extra_queries, vocab, extra_families
                )
            return image, [annotation, *extras]
    raise RuntimeError(f"no {family} scene fitted in {_ATTEMPTS} attempts")


def _split_seed(seed: int, split: str) -> int:
    """A seed per split, stable across runs and Python versions (str hashing is salted)."""
    digest = hashlib.sha256(f"lisa-synthetic/{seed}/{split}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _check_splits(out: Path, splits: dict[str, int]) -> None:
    for split, count in splits.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
            raise ValueError(f"split names are plain words like train/val/test, got {split!r}")
        if count < 0:
            raise ValueError(f"split {split!r} needs a count >= 0, got {count}")
        folder = out / split
        if count and folder.is_dir() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} is not empty; delete it or choose another --out")


def _write_pair(folder: Path, name: str, image: np.ndarray, annotation: dict) -> None:
    Image.fromarray(image).save(
        folder / f"{name}.jpg", format="JPEG", quality=JPEG_QUALITY, subsampling=0
    )
    (folder / f"{name}.json").write_text(json.dumps(annotation) + "\n", encoding="utf-8")


def _link_image(source: Path, link: Path) -> None:
    """link names the same image file as source (a hard link, or a copy where none is
    possible)."""
    try:
        os.link(source, link)
    except OSError:
        shutil.copyfile(source, link)


def generate_dataset(
    out: Path | str,
    splits: dict[str, int],
    seed: int,
    exclude_concept: str | None = None,
    focus_concept: str | None = None,
    families: Sequence[str] | None = None,
    extra_queries: int = 0,
    extra_families: Sequence[str] = DEFAULT_EXTRA_FAMILIES,
) -> dict[str, int]:
    """Write OUT/SPLIT/SPLIT_NNNNN.jpg + .json for each split (ReasonSeg layout).

    Each split draws from its own seed derived from (seed, split name), so the same call writes
    byte-identical files. Split folders must be empty or absent. `families` limits the query
    families (each scene draws one of them); None allows every family.

    `extra_queries` (train split only): each training scene also gets up to this many samples
    SPLIT_NNNNN_xK (the same image, hard-linked where the file system allows) about other
    shapes of it, picked out by queries of `extra_families` (some of EXTRA_FAMILIES), so that
    no image comes with one answer only. The scenes and their first queries are the same with
    or without them.

    Returns:
        split -> number of scenes written.
    """
    _vocabulary(exclude_concept, focus_concept)  # fail before writing anything
    if extra_queries < 0:
        raise ValueError(f"extra_queries must be >= 0, got {extra_queries}")
    if not extra_families or any(f not in EXTRA_FAMILIES for f in extra_families):
        raise ValueError(
            f"extra families must be some of {', '.join(EXTRA_FAMILIES)}, got {extra_families}"
        )
    allowed = scene_families(focus_concept)
    if families is not None:
        unknown = [f for f in families if f not in allowed]
        if unknown or not families:
            raise ValueError(f"families must be some of {', '.join(allowed)}, got {families}")
    out = Path(out)
    _check_splits(out, splits)
    for split, count in splits.items():
        if not count:
            continue
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        split_rng = random.Random(_split_seed(seed, split))
        explained = []
        for index in range(count):
            scene_rng = random.Random(split_rng.getrandbits(64))
            family = scene_rng.choice(tuple(families)) if families else None
            extra = extra_queries if split == "train" else 0
            extra_rng = random.Random(f"extra/{seed}/{split}/{index}")
            image, annotations = generate_scene_queries(
                scene_rng, exclude_concept, focus_concept, family, extra, extra_rng,
                extra_families,
            )  # fmt: skip
            name = f"{split}_{index:05d}"
            _write_pair(folder, name, image, annotations[0])
            explained += explanations_for(f"{name}.jpg", annotations[0])
            for number, annotation in enumerate(annotations[1:], start=1):
                extra_name = f"{name}_x{number}"
                _link_image(folder / f"{name}.jpg", folder / f"{extra_name}.jpg")
                (folder / f"{extra_name}.json").write_text(
                    json.dumps(annotation) + "\n", encoding="utf-8"
                )
                explained += explanations_for(f"{extra_name}.jpg", annotation)
        # Beside the split folder (a JSON inside it would be read as an annotation).
        text = json.dumps(explained, indent=1)
        (out / f"{split}_{EXPLANATIONS_SUFFIX}").write_text(text, encoding="utf-8")
    return dict(splits)


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lisa_demo.data.synthetic",
        description="Write a synthetic reasoning-segmentation set in the ReasonSeg layout.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for train/val/test")
    parser.add_argument("--train", type=int, required=True, help="number of training scenes")
    parser.add_argument("--val", type=int, required=True, help="number of validation scenes")
    parser.add_argument("--test", type=int, default=0, help="number of test scenes")
    parser.add_argument("--seed", type=int, default=0, help="same seed -> identical files")
    parser.add_argument("--exclude-concept", metavar="WORD", help="kind or colour never shown")
    parser.add_argument("--focus-concept", metavar="WORD", help="kind or colour of every target")
    parser.add_argument(
        "--families", nargs="+", metavar="FAMILY", choices=FAMILIES,
        help=f"only these query families (default: all of {', '.join(FAMILIES)})",
    )  # fmt: skip
    parser.add_argument(
        "--extra-queries", type=int, default=0, metavar="K",
        help="train split: up to K more samples per scene about its other shapes (same image)",
    )  # fmt: skip
    parser.add_argument(
        "--extra-families", nargs="+", metavar="FAMILY", choices=EXTRA_FAMILIES,
        default=list(DEFAULT_EXTRA_FAMILIES),
        help=f"query families of the extra samples (some of {', '.join(EXTRA_FAMILIES)}; "
        f"default: {' '.join(DEFAULT_EXTRA_FAMILIES)})",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if check_cli_paths(("--out", args.out, OUTPUT_FOLDER)):
        return 2
    splits = {"train": args.train, "val": args.val, "test": args.test}
    try:
        counts = generate_dataset(
            args.out, splits, args.seed, args.exclude_concept, args.focus_concept,
            args.families, args.extra_queries, args.extra_families,
        )  # fmt: skip
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    written = ", ".join(f"{n} {split}" for split, n in counts.items())
    options = "".join(
        f", {name} {value}"
        for name, value in (
            ("without", args.exclude_concept),
            ("focus", args.focus_concept),
            ("families", " ".join(args.families or ())),
            ("extra queries", args.extra_queries),
        )  # fmt: skip
        if value
    )
    print(f"wrote {written} scenes to {args.out} (seed {args.seed}{options})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
