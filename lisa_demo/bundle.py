"""Package a fully trained model (a run's OUT/model) as the bundled default in assets/.

    python -m lisa_demo.bundle --model runs/pretrain/model --run runs/pretrain \
        --out assets/tiny-lisa

Weights are stored as float16 safetensors (half the size; the loader computes in the
precision it is asked for). The model card (README.md in the folder) is written by hand from
the evaluation commands it quotes.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lisa_demo.checkpoint import write_atomically
from lisa_demo.loading import PROJECTION_FILE
from lisa_demo.paths import FOLDER, OUTPUT_FOLDER, check_cli_paths


def bundle(model_dir: Path, out: Path, run_dir: Path | None = None) -> Path:
    from transformers import AutoProcessor, LlavaForConditionalGeneration, SamModel, SamProcessor

    card = out / "README.md"
    card_text = card.read_text() if card.exists() else None

    def write(tmp: Path) -> None:
        llava = LlavaForConditionalGeneration.from_pretrained(
            model_dir / "llava", dtype=torch.float16
        )
        llava.save_pretrained(tmp / "llava")
        AutoProcessor.from_pretrained(model_dir / "llava").save_pretrained(tmp / "llava")
        sam = SamModel.from_pretrained(model_dir / "sam", dtype=torch.float16)
        sam.save_pretrained(tmp / "sam")
        SamProcessor.from_pretrained(model_dir / "sam").save_pretrained(tmp / "sam")
        projection = load_file(str(model_dir / PROJECTION_FILE))
        save_file({k: v.half() for k, v in projection.items()}, str(tmp / PROJECTION_FILE))
        manifest = {"format": "lisa-studio-bundle", "version": 1, "stored_dtype": "float16"}
        if run_dir is not None:
            lines = (run_dir / "events.jsonl").read_text().splitlines()
            events = (json.loads(line) for line in lines if line.strip())
            start = next((e for e in events if e.get("event") == "start"), {})
            manifest["training_config"] = start.get("config")
            manifest["training_dataset"] = start.get("dataset")
            manifest["trainable_params"] = start.get("trainable_params")
            shutil.copy(run_dir / "training_history.png", tmp / "training_history.png")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if card_text is not None:
            (tmp / "README.md").write_text(card_text)

    return write_atomically(out, write)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a run's OUT/model folder")
    parser.add_argument("--run", type=Path, default=None, help="the run folder (for metadata)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if check_cli_paths(
        ("--model", args.model, FOLDER, "a run's OUT/model folder"),
        ("--run", args.run, FOLDER, "a run folder"),
        ("--out", args.out, OUTPUT_FOLDER),
    ):
        return 2
    path = bundle(args.model, args.out, args.run)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    print(f"bundled {path} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
