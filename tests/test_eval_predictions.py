"""Scoring a folder of PNG predictions with python -m lisa_demo.eval."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from lisa_demo.data.reasonseg import read_records
from lisa_demo.data.synthetic import generate_dataset
from lisa_demo.eval import main, score_prediction_folder


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, {"val": 5}, seed=0)
    return root / "val"


def write_perfect(val_dir: Path, pred_dir: Path, all_queries: bool = False) -> None:
    """Ground truth as predictions; ignore pixels predicted too (evaluation excludes them)."""
    pred_dir.mkdir()
    for record in read_records(val_dir)[0]:
        mask = Image.fromarray(np.where(record.load_mask() != 0, 255, 0).astype(np.uint8))
        names = [f"{record.name}_q{i}" for i in range(len(record.queries))]
        for name in names if all_queries else [record.name]:
            mask.save(pred_dir / f"{name}.png")


def run_json(argv: list[str], capsys) -> tuple[int, dict, str]:
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def test_perfect_predictions_score_one(val_dir, tmp_path, capsys):
    records, _ = read_records(val_dir)
    assert any(255 in r.load_mask() for r in records)  # the set has ignore pixels to exclude
    write_perfect(val_dir, tmp_path / "pred")
    argv = ["--dataset", str(val_dir), "--predictions", str(tmp_path / "pred")]
    code, result, _ = run_json(argv, capsys)
    assert code == 0
    assert result == {"giou": 1.0, "ciou": 1.0, "n": 5, "missing": []}
    assert main(argv) == 0
    assert capsys.readouterr().out == "gIoU 1.0000  cIoU 1.0000  n 5\n"


def test_missing_prediction_counts_as_empty_and_is_reported(val_dir, tmp_path, capsys):
    pred_dir = tmp_path / "pred"
    write_perfect(val_dir, pred_dir)
    (pred_dir / "val_00002.png").unlink()
    code, result, err = run_json(
        ["--dataset", str(val_dir), "--predictions", str(pred_dir)], capsys
    )
    assert code == 0
    assert result["missing"] == ["val_00002.png"] and "val_00002.png" in err
    assert result["n"] == 5 and result["giou"] == pytest.approx(4 / 5)  # the empty one scores 0

    accumulator, missing, per_sample = score_prediction_folder(val_dir, pred_dir)
    unions = [s["union"] for s in per_sample]
    assert missing == ["val_00002.png"] and [s["missing"] for s in per_sample].count(True) == 1
    expected_ciou = (sum(unions) - unions[2]) / sum(unions)
    assert accumulator.ciou == pytest.approx(expected_ciou) and result["ciou"] == pytest.approx(
        expected_ciou
    )


def test_all_queries_reads_one_file_per_query(val_dir, tmp_path, capsys):
    write_perfect(val_dir, tmp_path / "pred", all_queries=True)
    total = sum(len(r.queries) for r in read_records(val_dir)[0])
    argv = ["--dataset", str(val_dir), "--predictions", str(tmp_path / "pred"), "--all-queries"]
    code, result, _ = run_json(argv, capsys)
    assert (code, result["n"], result["giou"], result["missing"]) == (0, total, 1.0, [])


def test_wrong_size_prediction_names_the_file_and_both_sizes(val_dir, tmp_path, capsys):
    write_perfect(val_dir, tmp_path / "pred")
    record = read_records(val_dir)[0][0]
    Image.new("L", (7, 9)).save(tmp_path / "pred" / f"{record.name}.png")
    assert main(["--dataset", str(val_dir), "--predictions", str(tmp_path / "pred")]) == 1
    err = capsys.readouterr().err
    assert f"{record.name}.png" in err and "7x9" in err and f"{record.width}x{record.height}" in err


def test_alpha_is_not_foreground(val_dir, tmp_path):
    pred_dir = tmp_path / "pred"
    write_perfect(val_dir, pred_dir)
    record = read_records(val_dir)[0][0]
    Image.new("RGBA", (record.width, record.height), (0, 0, 0, 255)).save(
        pred_dir / f"{record.name}.png"
    )
    _, _, per_sample = score_prediction_folder(val_dir, pred_dir)
    assert per_sample[0]["intersection"] == 0 and per_sample[0]["iou"] == 0.0


def test_checkpoint_scoring_is_exclusive_with_predictions(val_dir, tmp_path, capsys):
    # Model scoring: a folder that is no checkpoint is one clear line, not a traceback.
    assert main(["--dataset", str(val_dir), "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not a LISA Studio checkpoint" in err
    with pytest.raises(SystemExit):
        main(["--dataset", str(val_dir), "--checkpoint", "a", "--predictions", "b"])


def test_bad_dataset_is_a_clear_error(tmp_path, capsys):
    # A missing folder is a bad path argument (2); a folder without samples is bad data (1).
    assert main(["--dataset", str(tmp_path / "none"), "--predictions", str(tmp_path)]) == 2
    assert "NAME.jpg + NAME.json" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--dataset", str(tmp_path / "empty"), "--predictions", str(tmp_path)]) == 1
    assert "NAME.jpg + NAME.json" in capsys.readouterr().err


def test_module_runs_as_a_script(val_dir, tmp_path):
    write_perfect(val_dir, tmp_path / "pred")
    command = [sys.executable, "-m", "lisa_demo.eval", "--dataset", str(val_dir)]
    command += ["--predictions", str(tmp_path / "pred"), "--json"]
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=repo)
    assert json.loads(done.stdout) == {"giou": 1.0, "ciou": 1.0, "n": 5, "missing": []}


# --- LISA's rasterising and scores, written out independently of lisa_demo ------------------


def lisa_reference_mask(shapes: list[dict], height: int, width: int) -> np.ndarray:
    """LISA's ground truth: flags dropped; int32 points, no clipping; areas on an image-size
    canvas; np.argsort(areas)[::-1]; outline then fill; 255 for ignore labels, else 1."""
    kept = [shape for shape in shapes if shape["label"].lower() != "flag"]
    areas = []
    for shape in kept:
        canvas = np.zeros((height, width), dtype=np.uint8)
        points = np.array([shape["points"]], dtype=np.int32)
        cv2.polylines(canvas, points, True, 1, 1)
        cv2.fillPoly(canvas, points, 1)
        areas.append(canvas.sum())
    mask = np.zeros((height, width), dtype=np.uint8)
    for index in np.argsort(areas)[::-1]:
        shape = kept[index]
        value = 255 if "ignore" in shape["label"].lower() else 1
        points = np.array([shape["points"]], dtype=np.int32)
        cv2.polylines(mask, points, True, value, 1)
        cv2.fillPoly(mask, points, value)
    return mask


def random_polygon(rng: np.random.Generator, height: int, width: int) -> list[list[float]]:
    """3-6 fractional vertices around a centre in the image, reaching up to 60% past it."""
    centre = rng.uniform((0, 0), (width, height))
    count = int(rng.integers(3, 7))
    angles = np.sort(rng.uniform(0, 2 * np.pi, count))
    radii = rng.uniform(0.2, 0.9, count) * max(height, width)
    points = centre + np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii[:, None]
    return np.round(points, 2).tolist()


@pytest.fixture(scope="module")
def border_crossing(tmp_path_factory) -> tuple[Path, Path, list[tuple[int, int]]]:
    """12 annotated images whose polygons cross the border, predictions for 11 of them, and
    the reference's (intersection, union) per image."""
    root = tmp_path_factory.mktemp("border")
    data, pred = root / "val", root / "pred"
    data.mkdir()
    pred.mkdir()
    rng = np.random.default_rng(30)
    counts = []
    for index in range(12):
        height, width = (int(n) for n in rng.integers(20, 48, size=2))
        labels = rng.choice(["target", "target", "ignore", "flag"], size=int(rng.integers(1, 5)))
        shapes = [
            {"label": str(label), "points": random_polygon(rng, height, width)} for label in labels
        ]
        shapes[0]["label"] = "target"
        if index % 4 == 1:  # a two-point "polygon" across the image: the reference paints a line
            line = [[-5.5, 3.2], [width + 4.7, height - 2.1]]
            shapes.append({"label": "ignore" if index % 8 == 1 else "target", "points": line})
        name = f"img_{index:02d}"
        Image.new("RGB", (width, height), (90, 120, 30)).save(data / f"{name}.jpg")
        annotation = {"text": ["the thing"], "is_sentence": False, "shapes": shapes}
        (data / f"{name}.json").write_text(json.dumps(annotation))
        truth = lisa_reference_mask(shapes, height, width)
        prediction = np.zeros((height, width), dtype=bool)
        if index != 5:  # no file: scored as an empty mask
            y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
            prediction[y0 : y0 + height // 2, x0 : x0 + width // 2] = True
            prediction |= truth == 1
            prediction[rng.random((height, width)) < 0.3] = False
            Image.fromarray(prediction.astype(np.uint8) * 255).save(pred / f"{name}.png")
        scored = truth != 255
        target = truth == 1
        counts.append(
            (
                int((prediction & target & scored).sum()),
                int(((prediction | target) & scored).sum()),
            )
        )
    return data, pred, counts


def test_scores_equal_lisa_reference_on_border_crossing_polygons(border_crossing, capsys):
    data, pred, counts = border_crossing
    # The set exercises the rule: polygons past every border, ignore regions, flags.
    shapes = [json.loads(path.read_text())["shapes"] for path in sorted(data.glob("*.json"))]
    points = np.concatenate([np.array(s["points"]) for file in shapes for s in file])
    assert (points < 0).any(axis=0).all() and (points > 48).any(axis=0).all()
    labels = {s["label"] for file in shapes for s in file}
    assert labels == {"target", "ignore", "flag"}

    _, missing, per_sample = score_prediction_folder(data, pred)
    assert missing == ["img_05.png"]
    assert [(s["intersection"], s["union"]) for s in per_sample] == counts
    ious = [i / u if u else 1.0 for i, u in counts]
    code, result, _ = run_json(["--dataset", str(data), "--predictions", str(pred)], capsys)
    assert code == 0 and result["n"] == 12
    assert result["giou"] == pytest.approx(sum(ious) / 12, rel=1e-12)
    total_i, total_u = (sum(column) for column in zip(*counts, strict=True))
    assert result["ciou"] == pytest.approx(total_i / total_u, rel=1e-12)


# --- EXIF orientation -------------------------------------------------------------------------


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


@pytest.fixture()
def rotated_image(tmp_path) -> Path:
    """A JPEG stored 8 wide x 6 high with EXIF orientation 6: displayed 6 wide x 8 high, with
    the target square x 0..2, y 0..3 (12 pixels) in display coordinates."""
    data = tmp_path / "val"
    data.mkdir()
    Image.new("RGB", (8, 6), (90, 120, 30)).save(data / "turned.jpg", exif=exif(6))
    shapes = [{"label": "target", "points": [[0, 0], [2, 0], [2, 3], [0, 3]]}]
    (data / "turned.json").write_text(json.dumps({"text": ["it"], "shapes": shapes}))
    return data


def test_prediction_with_its_own_exif_orientation_is_read_as_displayed(rotated_image, tmp_path):
    # As displayed (6 wide x 8 high) the prediction covers rows 0-1, columns 0-2: 6 of the 12
    # target pixels, IoU 0.5. Orientation 6 rotates the stored pixels 90 degrees clockwise
    # for display (displayed[y, x] = stored[5 - x, y]), so the file holds rows 3-5, columns 0-1.
    stored = np.zeros((6, 8), dtype=np.uint8)
    stored[3:6, 0:2] = 255
    pred = tmp_path / "pred"
    pred.mkdir()
    Image.fromarray(stored).save(pred / "turned.png", exif=exif(6))
    _, _, (sample,) = score_prediction_folder(rotated_image, pred)
    assert (sample["intersection"], sample["union"], sample["iou"]) == (6, 12, 0.5)


def test_prediction_at_the_stored_size_names_the_exif_orientation(rotated_image, tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    Image.new("L", (8, 6)).save(pred / "turned.png")  # the image's stored size, no EXIF
    assert main(["--dataset", str(rotated_image), "--predictions", str(pred)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: prediction") and "turned.png is 8x6" in err
    assert "image is 6x8 as displayed (EXIF orientation 6" in err
