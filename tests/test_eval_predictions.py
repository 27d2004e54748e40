"""Scoring a folder of PNG predictions with python -m lisa_demo.eval."""

import json
import subprocess
import sys
from pathlib import Path

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
