"""Every path argument of every command-line tool is checked before any work: a file where a
folder is expected (and the reverse), a missing input or an output that cannot be created is
one line `error: ...`, exit status 2, no model loaded and nothing written."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lisa_demo.paths import (
    CHECKPOINT,
    FILE,
    FOLDER,
    MODEL,
    OUTPUT_FILE,
    OUTPUT_FOLDER,
    PathError,
    check_path,
)

# (command, flag, kind): every path argument of every CLI.
ARGUMENTS = [
    ("train", "--output-dir", OUTPUT_FOLDER),
    ("train", "--dataset", FOLDER),
    ("train", "--explanations", FILE),
    ("train", "--resume", CHECKPOINT),
    ("train", "--init-from", CHECKPOINT),
    ("train", "--model", MODEL),
    ("train", "--embedding-cache-dir", OUTPUT_FOLDER),
    ("train", "--llava", MODEL),
    ("train", "--sam", MODEL),
    ("infer", "--image", FILE),
    ("infer", "--checkpoint", CHECKPOINT),
    ("infer", "--model", MODEL),
    ("infer", "--llava", MODEL),
    ("infer", "--sam", MODEL),
    ("infer", "--out-dir", OUTPUT_FOLDER),
    ("eval", "--dataset", FOLDER),
    ("eval", "--predictions", FOLDER),
    ("eval", "--checkpoint", CHECKPOINT),
    ("eval", "--model", MODEL),
    ("eval", "--per-sample", OUTPUT_FILE),
    ("eval", "--llava", MODEL),
    ("eval", "--sam", MODEL),
    ("bench", "--model", MODEL),
    ("synthetic", "--out", OUTPUT_FOLDER),
    ("tiny", "--out", OUTPUT_FOLDER),
    ("examples", "--out", OUTPUT_FOLDER),
    ("bundle", "--model", FOLDER),
    ("bundle", "--run", FOLDER),
    ("bundle", "--out", OUTPUT_FOLDER),
    ("convert", "--lisa", MODEL),
    ("convert", "--clip", MODEL),
    ("convert", "--out", OUTPUT_FOLDER),
    ("tiny_lisa", "--out", OUTPUT_FOLDER),
    ("app", "--llava", MODEL),
    ("app", "--sam", MODEL),
    ("app", "--checkpoint", CHECKPOINT),
]

# For each kind: (bad value, what the message says).
BAD_VALUES = {
    FOLDER: [("FILE", "is a file"), ("MISSING", "does not exist")],
    CHECKPOINT: [("FILE", "is a file"), ("MISSING", "does not exist")],
    FILE: [("DIR", "is a folder"), ("MISSING", "not found")],
    OUTPUT_FOLDER: [("FILE", "is a file"), ("UNDER_FILE", "is a file")],
    OUTPUT_FILE: [("DIR", "is a folder"), ("UNDER_FILE", "is a file")],
    MODEL: [("FILE", "is a file"), ("MISSING", "does not exist")],
}
CASES = [
    pytest.param(cli, flag, bad, message, id=f"{cli}{flag}={bad}")
    for cli, flag, kind in ARGUMENTS
    for bad, message in BAD_VALUES[kind]
]


def main_of(cli: str):
    """The command's main(argv) -> exit status."""
    if cli == "train":
        from lisa_demo.train.__main__ import main
    elif cli == "infer":
        from lisa_demo.infer.cli import main
    elif cli == "eval":
        from lisa_demo.eval import main
    elif cli == "synthetic":
        from lisa_demo.data.synthetic import main
    elif cli == "tiny":
        from lisa_demo.tiny import main
    elif cli == "examples":
        from lisa_demo.data.examples import main
    elif cli == "bundle":
        from lisa_demo.bundle import main
    elif cli == "bench":
        from lisa_demo.bench import main
    elif cli == "convert":
        from lisa_demo.convert import main
    elif cli == "tiny_lisa":
        from lisa_demo.tiny_lisa import main
    else:
        import app

        def main(argv: list[str]) -> int:
            try:
                app.main(argv)
            except SystemExit as exit_:
                return int(exit_.code)
            raise AssertionError("the app started")

    return main


def good_arguments(cli: str, flag: str, root: Path) -> list[str]:
    """Arguments that pass every path check, in the mode that reads `flag`."""
    data, image = root / "data", root / "scene.png"
    model = [] if flag == "--model" else ["--preset", "tiny-random"]  # --model excludes it
    if cli == "train":
        source = [] if flag == "--dataset" else ["--synthetic", "4"]
        return [*source, "--output-dir", str(root / "out"), *model]
    if cli == "infer":
        return ["--image", str(image), "--query", "the red square", *model]
    if cli == "eval":
        if flag == "--predictions":
            return ["--dataset", str(data)]
        mode = [] if flag == "--checkpoint" else ["--model-only"]
        return ["--dataset", str(data), *mode, *model]
    if cli == "convert":
        return ["--lisa", str(root / "model"), "--out", str(root / "out")]
    if cli in ("synthetic", "tiny", "examples", "tiny_lisa"):
        counts = ["--train", "1", "--val", "1"] if cli == "synthetic" else []
        return ["--out", str(root / "out"), *counts]
    if cli == "bundle":
        return ["--model", str(root / "model"), "--out", str(root / "out")]
    return model  # bench, app


def with_value(argv: list[str], flag: str, value: str) -> list[str]:
    if flag in argv:
        argv = list(argv)
        argv[argv.index(flag) + 1] = value
        return argv
    return [*argv, flag, value]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch) -> dict[str, str]:
    """Existing inputs, and the bad values: a file, a folder, a missing path, a path under a
    file. Loading a model fails the test."""
    (tmp_path / "data").mkdir()
    (tmp_path / "model").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "scene.png")
    (tmp_path / "a-file.txt").write_text("not a folder")
    (tmp_path / "a-folder").mkdir()

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for target in ("lisa_demo.loading.load_lisa", "lisa_demo.infer.pipeline.load_lisa",
                   "lisa_demo.train.loop.load_lisa"):  # fmt: skip
        monkeypatch.setattr(target, no_model)
    monkeypatch.chdir(tmp_path)
    return {
        "FILE": str(tmp_path / "a-file.txt"),
        "DIR": str(tmp_path / "a-folder"),
        "MISSING": str(tmp_path / "missing" / "thing"),
        "UNDER_FILE": str(tmp_path / "a-file.txt" / "sub"),
    }


@pytest.mark.parametrize(("cli", "flag", "bad", "message"), CASES)
def test_a_bad_path_is_one_line_and_exit_2_before_any_work(
    cli, flag, bad, message, workspace, tmp_path, capsys
):
    argv = with_value(good_arguments(cli, flag, tmp_path), flag, workspace[bad])
    before = tree(tmp_path)
    assert main_of(cli)(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert flag in lines[0] and message in lines[0], lines[0]
    assert out == ""
    recorded = {"out", "out/events.jsonl"} if cli == "train" else set()  # the app reads why
    after = [p for p in tree(tmp_path) if p not in recorded]
    assert after == before, "something was written"


def path_options(parser: argparse.ArgumentParser) -> set[str]:
    """The long flags of a parser that take a path (typed Path, or a model/image/checkpoint)."""
    named = ("llava", "sam", "checkpoint", "image", "model", "lisa", "clip")
    return {
        next(f for f in action.option_strings if f.startswith("--") and "_" not in f)
        for action in parser._actions
        if action.option_strings
        and (action.type is Path or (action.dest in named and action.choices is None))
    }


def test_the_table_covers_every_path_option_of_every_parser():
    from lisa_demo.bench import build_parser as bench
    from lisa_demo.convert import build_parser as convert
    from lisa_demo.data.synthetic import _parser as synthetic
    from lisa_demo.eval import build_parser as eval_
    from lisa_demo.infer.cli import build_parser as infer
    from lisa_demo.train.options import build_parser as train

    parsers = {"train": train, "infer": infer, "eval": eval_, "bench": bench}
    parsers |= {"synthetic": synthetic, "convert": convert}
    for cli, build in parsers.items():
        covered = {flag for name, flag, _ in ARGUMENTS if name == cli}
        assert path_options(build()) == covered, cli


def test_model_sources_may_be_hub_ids_and_outputs_may_be_new(tmp_path):
    check_path("--llava", "llava-hf/llava-1.5-7b-hf", MODEL)  # a Hub id: the loader checks it
    check_path("--sam", "gpt2", MODEL)
    with pytest.raises(PathError, match="does not exist"):
        check_path("--sam", "./models/sam", MODEL)  # a local path, missing
    check_path("--out", tmp_path / "new" / "deeper", OUTPUT_FOLDER)
    check_path("--per-sample", tmp_path / "new" / "scores.json", OUTPUT_FILE)
    check_path("--out", tmp_path, OUTPUT_FOLDER)  # an existing folder is fine
    with pytest.raises(PathError, match="pass a ReasonSeg folder"):
        check_path("--dataset", tmp_path / "none", FOLDER, "a ReasonSeg folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_output_folder_that_cannot_be_written(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(PathError, match="not writable"):
        check_path("--out", locked / "run", OUTPUT_FOLDER)
