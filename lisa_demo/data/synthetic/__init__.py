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

With look-alikes (hard negatives, e.g. diamonds for a set of heart targets), a share of the
scenes shows at least one shape of those kinds or colours beside the target; the other scenes
are the ones written without them.

CLI: python -m lisa_demo.data.synthetic --out DIR --train N --val M [--test K] --seed S

    shapes.py       looks, outlines and placement of the shapes on a canvas
    queries.py      the query families: a placed scene and every paraphrase of its query
    annotations.py  rendering, the ReasonSeg annotation, and what it says about the target
    __init__.py     generate_scene, generate_dataset and the CLI (this module)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lisa_demo.data.synthetic.annotations import (
    DESCRIPTION_CLASSES,
    REGIONS,
    _annotate,
    _image_size,
    _render,
    explanations_for,
    object_classes,
    target_classes,
    target_description,
    where,
)
from lisa_demo.data.synthetic.queries import (
    _BUILDERS,
    DEFAULT_EXTRA_FAMILIES,
    EXTRA_FAMILIES,
    FAMILIES,
    FUNCTIONS,
    _Draft,
    _extra_annotations,
)
from lisa_demo.data.synthetic.shapes import (
    COLOURS,
    CONCEPTS,
    SHAPE_KINDS,
    SIZE_WORDS,
    SIZES,
    SceneObject,
    _Canvas,
    _Vocabulary,
)
from lisa_demo.paths import OUTPUT_FOLDER, check_cli_paths

__all__ = [
    "COLOURS",
    "CONCEPTS",
    "DEFAULT_EXTRA_FAMILIES",
    "DESCRIPTION_CLASSES",
    "EXPLANATIONS_SUFFIX",
    "EXTRA_FAMILIES",
    "FAMILIES",
    "FUNCTIONS",
    "LOOK_ALIKE_SHARE",
    "REGIONS",
    "SHAPE_KINDS",
    "SIZES",
    "SIZE_WORDS",
    "SceneObject",
    "check_look_alikes",
    "explanations_for",
    "generate_dataset",
    "generate_scene",
    "generate_scene_queries",
    "main",
    "object_classes",
    "scene_families",
    "target_classes",
    "target_description",
    "where",
]

EXPLANATIONS_SUFFIX = "explanations.json"  # OUT/SPLIT_explanations.json
LOOK_ALIKE_SHARE = 0.5  # share of the scenes that show one of the look-alikes, when given
JPEG_QUALITY = 95
_ATTEMPTS = 200

# ---------------------------------------------------------------------------------------------
# Generating scenes and sets


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
    look_alikes: Sequence[str] = (),
    look_alike_share: float = LOOK_ALIKE_SHARE,
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

    `look_alikes` (kinds or colours; hard negatives): in `look_alike_share` of the scenes,
    drawn at random, at least one shape other than the target has one of them, so that the
    set shows the target next to what it is mistaken for. The other scenes are the ones the
    call writes without look-alikes.

    Returns:
        split -> number of scenes written.
    """
    _vocabulary(exclude_concept, focus_concept)  # fail before writing anything
    look_alikes = check_look_alikes(look_alikes, look_alike_share, exclude_concept, focus_concept)
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
            # drawn apart from the scene's own generator: the scenes not chosen stay as they are
            wanted: set[str] = set()
            if look_alikes:
                draw = random.Random(f"look-alike/{seed}/{split}/{index}").random()
                wanted = set(look_alikes) if draw < look_alike_share else set()
            for _ in range(_ATTEMPTS):
                extra_rng = random.Random(f"extra/{seed}/{split}/{index}")
                image, annotations = generate_scene_queries(
                    scene_rng, exclude_concept, focus_concept, family, extra, extra_rng,
                    extra_families,
                )  # fmt: skip
                if not wanted or _shows_any(annotations[0], wanted):
                    break
            else:
                raise RuntimeError(f"no scene with one of {sorted(wanted)} in {_ATTEMPTS} attempts")
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


def check_look_alikes(
    look_alikes: Sequence[str], share: float, exclude: str | None, focus: str | None
) -> tuple[str, ...]:
    """The look-alike concepts, checked; ValueError (one line) for a wrong one."""
    look_alikes = tuple(dict.fromkeys(look_alikes))
    for concept in look_alikes:
        if concept not in CONCEPTS:
            raise ValueError(
                f"unknown look-alike {concept!r}; known concepts: {', '.join(CONCEPTS)}"
            )
        if concept in (exclude, focus):
            raise ValueError(
                f"{concept!r} cannot be a look-alike and the excluded or focus concept"
            )
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"the look-alike share must be in [0, 1], got {share}")
    return look_alikes


def _shows_any(annotation: dict, concepts: set[str]) -> bool:
    """Whether a shape other than the target has one of `concepts` (kind or colour)."""
    return any(
        not obj["target"] and (obj["kind"] in concepts or obj["colour"] in concepts)
        for obj in annotation["objects"]
    )


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
    parser.add_argument(
        "--look-alikes", nargs="+", metavar="WORD", default=[],
        help="kinds or colours the target is mistaken for: a share of the scenes shows one",
    )  # fmt: skip
    parser.add_argument(
        "--look-alike-share", type=float, default=LOOK_ALIKE_SHARE, metavar="P",
        help=f"share of the scenes with a look-alike (default {LOOK_ALIKE_SHARE})",
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
            args.families, args.extra_queries, args.extra_families, args.look_alikes,
            args.look_alike_share,
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
            ("look-alikes", " ".join(args.look_alikes)),
        )  # fmt: skip
        if value
    )
    print(f"wrote {written} scenes to {args.out} (seed {args.seed}{options})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
