"""python -m lisa_demo.infer on the tiny random model: JSON output, mask files, user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lisa_demo.config import PROJECT_ROOT
from lisa_demo.infer.cli import main

QUESTION = "Can you segment the red square in this image?"


@pytest.fixture
def image_path(tmp_path, scene_image) -> Path:
    path = tmp_path / "scene.png"
    Image.fromarray(scene_image).save(path)
    return path


def run_module(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "lisa_demo.infer", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_json_output_and_mask_pngs(image_path, tmp_path, capsys, force_answer, monkeypatch):
    from lisa_demo.loading import load_lisa

    # The CLI loads its own model; make its generation write two [SEG] tokens.
    def load_forced(*args, **kwargs):
        loaded = load_lisa(*args, **kwargs)
        force_answer(loaded, "Sure, [SEG] and [SEG].")
        return loaded

    monkeypatch.setattr("lisa_demo.infer.pipeline.load_lisa", load_forced)
    out_dir = tmp_path / "masks"
    argv = ["--image", str(image_path), "--query", QUESTION, "--preset", "tiny-random"]
    code = main([*argv, "--out-dir", str(out_dir), "--json", "--threshold=1e-12"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["answer"] == "Sure, [SEG] and [SEG]."
    assert report["cache_hit"] is False
    assert set(report["timings"]) == {"image_encoding", "generation", "mask_decoding", "total"}
    assert "message" in report
    assert [(m["number"], m["file"]) for m in report["masks"]] == [
        (1, str(out_dir / "mask_1.png")),
        (2, str(out_dir / "mask_2.png")),
    ]
    for entry in report["masks"]:
        png = np.array(Image.open(entry["file"]))
        assert png.shape == (48, 64) and png.dtype == np.uint8
        assert set(np.unique(png)) <= {0, 255}
        assert entry["area"] == int((png == 255).sum()) == 48 * 64  # probability 1e-12: all in
        assert entry["area_fraction"] == pytest.approx(1.0)
        assert isinstance(entry["score"], float)


def test_default_out_dir_and_human_summary(image_path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--image", str(image_path), "--query", QUESTION, "--preset", "tiny-random"]
    code = main([*argv, "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("answer: ") and "time: " in out
    assert (tmp_path / "outputs" / "scene").is_dir()


def test_many_masks_are_printed_as_the_first_few_and_one_line(
    image_path, tmp_path, capsys, force_answer, monkeypatch
):
    from lisa_demo.loading import load_lisa

    def load_forced(*args, **kwargs):
        loaded = load_lisa(*args, **kwargs)
        force_answer(loaded, "Sure," + " [SEG] and" * 5 + " [SEG].")
        return loaded

    monkeypatch.setattr("lisa_demo.infer.pipeline.load_lisa", load_forced)
    argv = ["--image", str(image_path), "--query", QUESTION, "--preset", "tiny-random"]
    assert main([*argv, "--out-dir", str(tmp_path), "--threshold", "0.999999"]) == 0
    lines = capsys.readouterr().out.splitlines()
    numbered = [line.split(":")[0] for line in lines if line.startswith("mask ")]
    assert numbered == ["mask 1", "mask 2", "mask 3", "mask 4"]
    assert "... and 2 more masks (2 of them empty), also in the folder" in lines
    assert sorted(p.name for p in tmp_path.glob("mask_*.png"))[0] == "mask_1.png"


def test_bad_llava_prints_one_error_line_and_exits_2(image_path, tmp_path):
    result = run_module(
        "--image", str(image_path), "--query", QUESTION,
        "--preset", "tiny-random", "--llava", "nobody/no-such-model",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "nobody/no-such-model" in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--image", "MISSING", "--query", QUESTION], "not found"),
        (["--image", "IMAGE", "--query", "   "], "empty"),
        (["--image", "IMAGE", "--query", QUESTION, "--checkpoint", "NOPE"], "does not exist"),
        (["--image", "IMAGE", "--query", QUESTION, "--threshold", "0"], "mask probability"),
        (["--image", "IMAGE", "--query", QUESTION, "--threshold", "2"], "mask probability"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, expected, image_path, tmp_path, capsys):
    paths = {"MISSING": str(tmp_path / "missing.png"), "IMAGE": str(image_path)}
    paths["NOPE"] = str(tmp_path / "no-checkpoint")
    argv = [paths.get(a, a) for a in argv] + ["--preset", "tiny-random"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err


def test_only_one_source_overridden_keeps_the_presets_other(image_path, tmp_path, capsys):
    from lisa_demo.config import preset
    from lisa_demo.loading import resolve_sources

    sam_dir = resolve_sources(preset("tiny-random"))[1]
    argv = ["--image", str(image_path), "--query", QUESTION, "--preset", "tiny-random"]
    code = main([*argv, "--sam", sam_dir, "--max-new-tokens", "2", "--out-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("answer: ")


@pytest.mark.parametrize(
    ("query", "extra", "expected"),
    [
        ("   ", [], "the query is empty"),
        ("why? " * 300, [], "the limit is 1000"),
        (QUESTION, ["--threshold", "nan"], "--threshold must be a finite number"),
        (QUESTION, ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ],
)
def test_a_bad_query_or_option_costs_no_model_load(
    query, extra, expected, image_path, tmp_path, capsys, monkeypatch
):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("lisa_demo.infer.pipeline.load_lisa", no_model)
    monkeypatch.setattr("lisa_demo.infer.cli.model_config", no_model)  # may build tiny models
    argv = ["--image", str(image_path), "--query", query, "--preset", "tiny-random", *extra]
    assert main([*argv, "--out-dir", str(tmp_path / "masks")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and expected in err
    assert not (tmp_path / "masks").exists()
