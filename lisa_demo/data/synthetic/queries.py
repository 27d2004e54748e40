"""Query families of the synthetic scenes: each places a scene whose target one query picks
out, with every paraphrase of that query; extra queries about a rendered scene's other shapes."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lisa_demo.data.synthetic.annotations import _annotate
from lisa_demo.data.synthetic.shapes import (
    SIZE_WORDS,
    SceneObject,
    _Canvas,
    _fillers,
    _pick,
    _random_look,
    _random_size,
    _same_look,
    _target_look,
    _Vocabulary,
)

FAMILIES = ("attribute", "function", "superlative", "spatial", "uniqueness")

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


@dataclass
class _Draft:
    """A placed scene and its target, with every paraphrase that picks out the target."""

    objects: list[SceneObject]
    target: SceneObject
    phrases: list[str]
    sentences: list[str]


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
