"""Synthetic scenes: determinism, ReasonSeg round trip, concept control, unique targets."""

import json
import random
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from lisa_demo.data.reasonseg import read_records
from lisa_demo.data.synthetic import (
    COLOURS,
    CONCEPTS,
    FAMILIES,
    FUNCTIONS,
    SHAPE_KINDS,
    generate_dataset,
    generate_scene,
    main,
)


def scenes(count: int, seed: int = 0, **kwargs) -> list[tuple[np.ndarray, dict]]:
    return [generate_scene(random.Random(seed * 10_000 + i), **kwargs) for i in range(count)]


def mentions(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE) is not None


def target_of(annotation: dict) -> dict:
    (target,) = [obj for obj in annotation["objects"] if obj["target"]]
    return target


def looks(annotation: dict, *keys: str) -> list[tuple]:
    return [tuple(obj[k] for k in keys) for obj in annotation["objects"]]


@pytest.fixture(scope="module")
def many() -> list[tuple[np.ndarray, dict]]:
    return scenes(150)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    splits = {"train": 4, "val": 2}
    for folder, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert generate_dataset(tmp_path / folder, splits, seed) == splits

    def contents(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.*"))}

    first, second, other = (contents(tmp_path / name) for name in "abc")
    assert len(first) == 14 and first == second  # 12 scene files + 2 explanation files
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)
    assert first["train/train_00000.json"] != first["val/val_00000.json"]  # split seeds differ


def test_output_reads_back_as_reasonseg_with_nonempty_targets(tmp_path):
    generate_dataset(tmp_path, {"train": 12, "val": 4, "test": 3}, seed=1)
    for split, count in (("train", 12), ("val", 4), ("test", 3)):
        records, report = read_records(tmp_path / split)
        assert report.skipped == {} and report.empty_targets == 0 and report.dropped_polygons == 0
        assert len(records) == count
        for record in records:
            assert record.family in FAMILIES and 1 <= len(record.queries) <= 5
            mask = record.load_mask()
            assert (mask == 1).any()
            target = target_of(json.loads(record.json_path.read_text()))
            # The annotation sits on the target's pixels: inner pixels have its colour.
            inner = cv2.erode((mask == 1).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            mean = record.load_image()[inner].mean(axis=0)
            assert np.abs(mean - COLOURS[target["colour"]]).max() < 25


def test_annotation_json_rasterises_back_to_the_rendered_target(monkeypatch):
    # The generator outlines the target's visible pixels; through JSON and LISA's rasterising
    # they must come back pixel for pixel, with ignore pixels never on the target.
    from lisa_demo.data import synthetic
    from lisa_demo.data.reasonseg import rasterize_shapes

    rendered = {}
    annotate = synthetic._annotate

    def recording_annotate(rng, objects, labels, target_index, *args):
        rendered["target"] = labels == target_index
        return annotate(rng, objects, labels, target_index, *args)

    monkeypatch.setattr(synthetic, "_annotate", recording_annotate)
    with_ignore = 0
    for seed in range(60):
        image, annotation = generate_scene(random.Random(seed))
        height, width = image.shape[:2]
        shapes = json.loads(json.dumps(annotation))["shapes"]
        mask = rasterize_shapes(shapes, height, width)
        np.testing.assert_array_equal(mask == 1, rendered["target"])
        assert not (rendered["target"] & (mask == 255)).any()
        with_ignore += (mask == 255).any()
    assert with_ignore >= 3


def test_scene_layout_sizes_and_query_mix(many):
    families, sentences, ignores = set(), 0, 0
    for image, annotation in many:
        height, width, _ = image.shape
        assert image.dtype == np.uint8 and 192 <= height <= 320 and 192 <= width <= 320
        assert height != width
        assert 3 <= len(annotation["objects"]) <= 6
        labels = {shape["label"] for shape in annotation["shapes"]}
        assert "target" in labels and labels <= {"target", "ignore"}
        ignores += "ignore" in labels
        families.add(annotation["family"])
        sentences += annotation["is_sentence"]
        texts = annotation["text"]
        assert 1 <= len(texts) <= 5 and len(set(texts)) == len(texts)
        assert all(text.endswith(("?", ".")) == annotation["is_sentence"] for text in texts)
    assert families == set(FAMILIES)
    assert 0.35 < sentences / len(many) < 0.65
    assert 0.05 < ignores / len(many) < 0.3


def test_targets_are_not_tiny(many):
    from lisa_demo.data.reasonseg import rasterize_shapes

    for image, annotation in many:
        height, width, _ = image.shape
        mask = rasterize_shapes(annotation["shapes"], height, width)
        assert np.count_nonzero(mask == 1) >= (0.1 * min(height, width)) ** 2


def test_queries_determine_the_target(many):
    for _, annotation in many:
        check_query(annotation)


def check_query(annotation: dict) -> None:
    """The annotation's queries pick out its target and no other shape."""
    target, family = target_of(annotation), annotation["family"]
    text = " ".join(annotation["text"])
    if family == "attribute":
        key = ("kind", "colour", "size")
        assert looks(annotation, *key).count(tuple(target[k] for k in key)) == 1
        assert mentions(text, target["kind"]) and mentions(text, target["colour"])
    elif family == "uniqueness":
        by = "kind" if mentions(text, target["kind"]) else "colour"
        assert mentions(text, target[by]) and looks(annotation, by).count((target[by],)) == 1
    elif family == "function":
        same_kind = looks(annotation, "kind").count((target["kind"],))
        assert same_kind == 1 or mentions(text, target["colour"])
        assert not mentions(text, target["kind"])
    elif family == "spatial":
        check_spatial(annotation)
    else:
        check_superlative(annotation)


DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "above": (0, -1), "below": (0, 1)}
WORDS = {"beneath": "below", "under": "below", "over": "above"}


def check_spatial(annotation: dict) -> None:
    """The reference look is unique; the target is nearest in its direction, by a margin."""
    query = annotation["text"][0]
    colour, kind = re.search(r"the (\w+) (\w+)[?.]?$", query).groups()
    assert looks(annotation, "colour", "kind").count((colour, kind)) == 1
    # "right above" means directly above: vertical words win over "right".
    vertical = re.search(r"\b(above|below|beneath|under|over)\b", query)
    word = (vertical or re.search(r"\b(left|right)\b", query)).group()
    dx, dy = DIRECTIONS[WORDS.get(word, word)]
    (ref,) = [o for o in annotation["objects"] if (o["colour"], o["kind"]) == (colour, kind)]
    distances = {}
    for obj in annotation["objects"]:
        vx, vy = obj["centre"][0] - ref["centre"][0], obj["centre"][1] - ref["centre"][1]
        distance = np.hypot(vx, vy)
        if obj is not ref and (vx * dx + vy * dy) >= distance * np.cos(np.radians(60)):
            distances[obj["target"]] = min(distances.get(obj["target"], np.inf), distance)
    assert distances[True] * 1.5 < distances.get(False, np.inf)


def check_superlative(annotation: dict) -> None:
    """No other shape of the named group matches the target on the superlative."""
    target, text = target_of(annotation), " ".join(annotation["text"])
    group = [
        o
        for o in annotation["objects"]
        if not o["target"]
        and all(o[k] == target[k] for k in ("colour", "kind") if mentions(text, target[k]))
    ]
    assert group
    if re.search(r"larg|big", text):
        assert target["size"] == "large" and all(o["size"] != "large" for o in group)
    elif re.search(r"small|tini", text):
        assert target["size"] == "small" and all(o["size"] != "small" for o in group)
    else:
        word = re.search(r"left|right|top|highest|bottom|lowest", text).group()
        axis, sign = {"left": (0, 1), "right": (0, -1), "top": (1, 1), "highest": (1, 1)}.get(
            word, (1, -1)
        )
        assert all(sign * (o["centre"][axis] - target["centre"][axis]) > 20 for o in group)


def test_function_descriptions_name_no_concept():
    for kind, clauses in FUNCTIONS.items():
        assert kind in SHAPE_KINDS
        for clause in clauses:
            assert not [c for c in CONCEPTS if mentions(clause, c)], clause


@pytest.mark.parametrize("concept", ["red", "star"])
def test_excluded_concept_never_appears(tmp_path, concept):
    generate_dataset(tmp_path, {"train": 40}, seed=2, exclude_concept=concept)
    for path in (tmp_path / "train").glob("*.json"):
        annotation = json.loads(path.read_text())
        assert not any(mentions(text, concept) for text in annotation["text"])
        assert all(concept not in (obj["kind"], obj["colour"]) for obj in annotation["objects"])
        assert all(shape["label"] in ("target", "ignore") for shape in annotation["shapes"])


@pytest.mark.parametrize("concept", ["triangle", "blue"])
def test_focus_concept_is_in_every_target_and_query(concept):
    for _, annotation in scenes(40, seed=3, focus_concept=concept):
        target = target_of(annotation)
        assert concept in (target["kind"], target["colour"])
        assert all(mentions(text, concept) for text in annotation["text"])


def test_unknown_or_conflicting_concepts_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="known concepts: circle, square"):
        generate_dataset(tmp_path, {"val": 1}, seed=0, exclude_concept="unicorn")
    with pytest.raises(ValueError, match="both excluded"):
        generate_scene(random.Random(0), exclude_concept="red", focus_concept="red")
    assert main(["--out", str(tmp_path), "--train", "1", "--val", "1", "--focus-concept", "x"]) == 2
    assert "known concepts" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_writes_splits_and_refuses_a_non_empty_folder(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--train", "2", "--val", "1", "--test", "1", "--seed", "5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "2 train, 1 val, 1 test" in out
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == [
        "val_00000.jpg",
        "val_00000.json",
    ]
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err


def test_families_limit_the_query_families_and_are_validated(tmp_path, capsys):
    generate_dataset(tmp_path / "a", {"val": 12}, seed=4, focus_concept="heart",
                     families=["attribute", "uniqueness"])  # fmt: skip
    seen = {json.loads(p.read_text())["family"] for p in (tmp_path / "a" / "val").glob("*.json")}
    assert seen == {"attribute", "uniqueness"}
    # A focus kind has no function queries (they never name it): asking for them is refused.
    with pytest.raises(ValueError, match="families must be some of"):
        generate_dataset(tmp_path / "b", {"val": 1}, seed=0, focus_concept="heart",
                         families=["function"])  # fmt: skip
    argv = ["--out", str(tmp_path / "c"), "--train", "0", "--val", "2", "--families", "spatial"]
    assert main(argv) == 0
    assert "families spatial" in capsys.readouterr().out
    assert {json.loads(p.read_text())["family"] for p in (tmp_path / "c" / "val").glob("*.json")} \
        == {"spatial"}  # fmt: skip


def test_where_names_the_ninth_of_the_image():
    from lisa_demo.data.synthetic import where

    assert where(10, 10, 300, 200) == "at the top left"
    assert where(150, 10, 300, 200) == "at the top"
    assert where(299, 100, 300, 200) == "on the right"
    assert where(150, 100, 300, 200) == "in the middle"
    assert where(0, 199.9, 300, 200) == "at the bottom left"
    assert where(300, 200, 300, 200) == "at the bottom right"  # the far edge stays inside


def test_explanations_name_the_target_of_every_query(tmp_path):
    import random as _random

    from lisa_demo.data.prompts import training_answer
    from lisa_demo.data.reasonseg import ReasonSegDataset
    from lisa_demo.data.synthetic import generate_dataset, where

    generate_dataset(tmp_path, {"train": 4}, seed=5)
    entries = json.loads((tmp_path / "train_explanations.json").read_text())
    dataset = ReasonSegDataset(
        tmp_path / "train", explanations=tmp_path / "train_explanations.json"
    )
    assert dataset.report.skipped == {}  # the file beside the split is not read as a record
    assert len(entries) == len(dataset)
    for sample in dataset:
        annotation = json.loads(sample.record.json_path.read_text())
        target = next(obj for obj in annotation["objects"] if obj["target"])
        assert sample.explanation.startswith("It is the ")
        assert target["colour"] in sample.explanation and target["kind"] in sample.explanation
        assert sample.explanation.endswith(
            where(*target["centre"], annotation["imageWidth"], annotation["imageHeight"]) + "."
        )
        answer = training_answer(_random.Random(0), sample.explanation)
        assert answer.index("[SEG]") < answer.index(sample.explanation)


def test_extra_queries_ask_about_other_shapes_of_the_same_image(tmp_path):
    generate_dataset(tmp_path / "plain", {"train": 30, "val": 3}, seed=6)
    generate_dataset(tmp_path / "extra", {"train": 30, "val": 3}, seed=6, extra_queries=2)
    plain, extra = tmp_path / "plain", tmp_path / "extra"
    # The scenes and their first queries do not change; val gets no extra samples.
    for path in plain.rglob("*_0*.*"):
        assert (extra / path.relative_to(plain)).read_bytes() == path.read_bytes()
    assert sorted(p.name for p in (extra / "val").iterdir()) == sorted(
        p.name for p in (plain / "val").iterdir()
    )
    firsts = sorted((extra / "train").glob("train_?????.json"))
    extras = sorted((extra / "train").glob("train_?????_x*.json"))
    assert len(firsts) == 30 and 50 <= len(extras) <= 60
    assert {p.stem[-3:] for p in extras} <= {"_x1", "_x2"}
    families = set()
    for path in extras:
        annotation = json.loads(path.read_text())
        first = json.loads((path.parent / f"{path.stem[:11]}.json").read_text())
        families.add(annotation["family"])
        check_query(annotation)
        # Same scene and image, another target.
        assert [(o["kind"], o["colour"], o["centre"]) for o in annotation["objects"]] == [
            (o["kind"], o["colour"], o["centre"]) for o in first["objects"]
        ]
        assert target_of(annotation)["centre"] != target_of(first)["centre"]
        image = path.with_suffix(".jpg")
        assert image.read_bytes() == (path.parent / f"{path.stem[:11]}.jpg").read_bytes()
    assert families == {"attribute", "uniqueness"}
    # Both queries of a scene read back as samples with their own masks and explanations.
    records, report = read_records(extra / "train")
    assert report.skipped == {} and len(records) == len(firsts) + len(extras)
    masks = {r.json_path.stem: r.load_mask() for r in records}
    for path in extras:
        assert not np.array_equal(masks[path.stem] == 1, masks[path.stem[:11]] == 1)
    entries = json.loads((extra / "train_explanations.json").read_text())
    assert {e["image"] for e in entries} == {r.image_path.name for r in records}


def test_extra_queries_of_every_family_pick_out_their_target():
    from lisa_demo.data.synthetic import EXTRA_FAMILIES, generate_scene_queries

    seen = {}
    for i in range(120):
        _, annotations = generate_scene_queries(
            random.Random(i), extra_queries=3, extra_rng=random.Random(-i),
            extra_families=EXTRA_FAMILIES,
        )  # fmt: skip
        targets = [target_of(a)["centre"] for a in annotations]
        assert len(set(map(tuple, targets))) == len(targets)  # each about another shape
        for annotation in annotations[1:]:
            check_query(annotation)
            seen[annotation["family"]] = seen.get(annotation["family"], 0) + 1
    assert set(seen) == set(EXTRA_FAMILIES) and min(seen.values()) >= 20, seen


def test_extra_queries_keep_a_focus_concept_and_are_validated(tmp_path, capsys):
    from lisa_demo.data.synthetic import EXTRA_FAMILIES

    generate_dataset(tmp_path / "a", {"train": 16}, seed=2, focus_concept="red",
                     extra_queries=2, extra_families=EXTRA_FAMILIES)  # fmt: skip
    extras = list((tmp_path / "a" / "train").glob("*_x?.json"))
    assert len(extras) >= 8
    for path in extras:
        annotation = json.loads(path.read_text())
        assert target_of(annotation)["colour"] == "red"
        assert all(mentions(text, "red") for text in annotation["text"])
        check_query(annotation)
    with pytest.raises(ValueError, match="extra_queries"):
        generate_dataset(tmp_path / "b", {"train": 1}, seed=0, extra_queries=-1)
    with pytest.raises(ValueError, match="extra families must be some of"):
        generate_dataset(tmp_path / "b", {"train": 1}, seed=0, extra_families=["spatial"])
    argv = ["--out", str(tmp_path / "c"), "--train", "2", "--val", "0", "--extra-queries", "1",
            "--extra-families", "function"]  # fmt: skip
    assert main(argv) == 0
    assert "extra queries 1" in capsys.readouterr().out
    extras = list((tmp_path / "c" / "train").glob("*_x1.json"))
    assert extras and {json.loads(p.read_text())["family"] for p in extras} == {"function"}


def _diamond_pixels_match(folder: Path, name: str, obj: dict) -> bool:
    """Whether the pixels inside a listed shape's outline have its colour (the JPEG's mean
    within 40 of the palette colour), read back from the written image."""
    image = cv2.cvtColor(cv2.imread(str(folder / f"{name}.jpg")), cv2.COLOR_BGR2RGB)
    inside = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(inside, [np.round(np.asarray(obj["outline"])).astype(np.int32)], 1)
    inside = cv2.erode(inside, np.ones((3, 3), np.uint8))
    mean = image[inside > 0].mean(axis=0)
    return bool(np.abs(mean - np.asarray(COLOURS[obj["colour"]])).max() < 40)


def test_look_alikes_put_a_hard_negative_beside_the_target(tmp_path, capsys):
    plain, alike = tmp_path / "plain", tmp_path / "alike"
    generate_dataset(plain, {"train": 40}, seed=3, focus_concept="heart")
    generate_dataset(alike, {"train": 40}, seed=3, focus_concept="heart", look_alikes=["diamond"],
                     look_alike_share=0.5)  # fmt: skip
    changed, with_diamond = 0, 0
    for path in sorted((alike / "train").glob("*.json")):
        annotation = json.loads(path.read_text())
        others = [o for o in annotation["objects"] if not o["target"]]
        diamonds = [o for o in others if o["kind"] == "diamond"]
        with_diamond += bool(diamonds)
        assert target_of(annotation)["kind"] == "heart"
        check_query(annotation)
        same = path.read_bytes() == (plain / "train" / path.name).read_bytes()
        if not same:
            changed += 1
            # a scene that was drawn again is one that shows a diamond, really painted
            assert diamonds and _diamond_pixels_match(alike / "train", path.stem, diamonds[0])
    plain_diamonds = sum(
        any(
            o["kind"] == "diamond" and not o["target"] for o in json.loads(p.read_text())["objects"]
        )
        for p in (plain / "train").glob("*.json")
    )
    # about half the scenes were asked for a diamond; the rest are the plain set's scenes
    assert with_diamond >= 15 and with_diamond > plain_diamonds + 5
    assert 0 < changed < 40
    generate_dataset(tmp_path / "all", {"val": 12}, seed=4, focus_concept="heart",
                     look_alikes=["diamond", "pink"], look_alike_share=1.0)  # fmt: skip
    for path in (tmp_path / "all" / "val").glob("*.json"):
        others = [o for o in json.loads(path.read_text())["objects"] if not o["target"]]
        assert any(o["kind"] == "diamond" or o["colour"] == "pink" for o in others)
    for bad, message in (
        ({"look_alikes": ["unicorn"]}, "unknown look-alike 'unicorn'"),
        ({"look_alikes": ["heart"]}, "cannot be a look-alike and the excluded or focus"),
        ({"look_alikes": ["star"], "look_alike_share": 1.5}, r"share must be in \[0, 1\]"),
    ):
        with pytest.raises(ValueError, match=message):
            generate_dataset(tmp_path / "bad", {"val": 1}, seed=0, focus_concept="heart", **bad)
    argv = ["--out", str(tmp_path / "cli"), "--train", "3", "--val", "0", "--focus-concept",
            "heart", "--look-alikes", "diamond", "--look-alike-share", "1"]  # fmt: skip
    assert main(argv) == 0
    assert "look-alikes diamond" in capsys.readouterr().out
