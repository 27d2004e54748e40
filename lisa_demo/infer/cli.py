"""Command line segmentation: one image, one question, one PNG per mask.

    python -m lisa_demo.infer --image cat.jpg --query "Which animal could catch mice?"
    python -m lisa_demo.infer --image cat.jpg --query "..." --preset tiny-random --json
    python -m lisa_demo.infer --image cat.jpg --query "..." --checkpoint runs/x/checkpoints/best

Errors a user can cause (a bad image, query, model source, checkpoint or option) print one
line "error: ..." on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from lisa_demo.config import (
    PRECISIONS,
    PRESETS,
    QUANTIZATIONS,
    ConfigError,
    ModelConfig,
    base_model_config,
)
from lisa_demo.paths import (
    CHECKPOINT,
    CHECKPOINT_FOLDER,
    FILE,
    MODEL,
    OUTPUT_FOLDER,
    check_cli_paths,
)

EXIT_USER_ERROR = 2
MASKS_PRINTED = 4  # then one line about the rest (an answer that repeats [SEG] has dozens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lisa_demo.infer",
        description="Segment what a question asks about in an image (LISA: LLaVA + SAM).",
    )
    parser.add_argument("--image", required=True, help="image file (PNG, JPEG, WebP, ...)")
    parser.add_argument("--query", required=True, help="the question, used verbatim")
    parser.add_argument("--checkpoint", help="fine-tuned checkpoint folder written by training")
    parser.add_argument(
        "--model",
        metavar="DIR",
        help="full-model folder (assets/tiny-lisa, a converted LISA; default: the bundled model)",
    )
    parser.add_argument(
        "--preset", choices=list(PRESETS), help="model preset instead of --model (default: tiny)"
    )
    parser.add_argument("--llava", help="LLaVA Hub id or local folder (overrides the preset's)")
    parser.add_argument("--sam", help="SAM Hub id or local folder (overrides the preset's)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, help="default: the preset's")
    parser.add_argument("--precision", choices=PRECISIONS, help="default: the preset's")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="mask probability above which a pixel is in the mask, between 0 and 1 (default: 0.5)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=48, help="answer length limit (default: 48)"
    )
    parser.add_argument(
        "--out-dir", type=Path, help="where mask_<i>.png go (default: ./outputs/<image stem>)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The preset, with the sources, quantization and precision the user overrode."""
    cfg = base_model_config(args.preset, args.model, args.llava, args.sam, args.checkpoint)
    if args.llava or args.sam:
        llava, sam = cfg.llava, cfg.sam
        if cfg.build_tiny and not (args.llava and args.sam):
            from lisa_demo.loading import resolve_sources

            llava, sam = resolve_sources(cfg)
        # The preset's projection belongs to the preset's LLaVA: drop it with another LLaVA.
        heads = None if args.llava else cfg.heads
        cfg = cfg.replace(
            llava=args.llava or llava, sam=args.sam or sam, heads=heads, build_tiny=False
        )
    changes = {}
    if args.quantization:
        changes["quantization"] = args.quantization
    if args.precision:
        changes["precision"] = args.precision
    return cfg.replace(**changes) if changes else cfg


def _check_device(device: str | None) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda, but no CUDA GPU is available; use --device cpu")


def write_masks(masks: list, out_dir: Path) -> list[Path]:
    """One 0/255 grayscale PNG per mask, at the original image size: mask_1.png, mask_2.png,
    ... (masks are numbered from 1 everywhere: files, the printed lines, the app)."""
    import numpy as np
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, result in enumerate(masks):
        path = out_dir / f"mask_{i + 1}.png"
        Image.fromarray(result.mask.astype(np.uint8) * 255).save(path)
        files.append(path)
    return files


def summary(result, files: list[Path]) -> dict:
    return {
        "answer": result.answer,
        "masks": [
            {
                "number": number,
                "file": str(path),
                "score": mask.score,
                "area": int(mask.mask.sum()),
                "area_fraction": mask.area_fraction,
            }
            for number, (mask, path) in enumerate(zip(result.masks, files, strict=True), start=1)
        ],
        "timings": result.timings,
        "cache_hit": result.cache_hit,
        "message": result.message,
    }


def print_human(report: dict) -> None:
    print(f"answer: {report['answer']}")
    masks = report["masks"]
    for mask in masks[:MASKS_PRINTED]:
        print(
            f"mask {mask['number']}: {mask['file']}  score {mask['score']:.3f}  "
            f"area {mask['area']} px ({100 * mask['area_fraction']:.1f}%)"
        )
    rest = masks[MASKS_PRINTED:]
    if rest:
        empty = sum(1 for mask in rest if not mask["area"])
        print(f"... and {len(rest)} more masks ({empty} of them empty), also in the folder")
    t = report["timings"]
    print(
        f"time: {t['total']:.2f} s (image encoding {t['image_encoding']:.2f}, "
        f"generation {t['generation']:.2f}, mask decoding {t['mask_decoding']:.2f})"
    )
    if report["message"]:
        print(f"note: {report['message']}")


def mask_folder(args: argparse.Namespace) -> Path:
    return args.out_dir or Path("outputs") / Path(args.image).stem


def path_arguments(args: argparse.Namespace) -> list[tuple]:
    """(flag, value, kind) of every path the command reads or writes, for lisa_demo.paths."""
    return [
        ("--image", args.image, FILE, "an image file"),
        ("--checkpoint", args.checkpoint, CHECKPOINT, CHECKPOINT_FOLDER),
        ("--model", args.model, MODEL),
        ("--llava", args.llava, MODEL),
        ("--sam", args.sam, MODEL),
        ("--out-dir", mask_folder(args), OUTPUT_FOLDER),
    ]


def run(args: argparse.Namespace) -> int:
    from lisa_demo.infer.pipeline import LisaPipeline, check_query, load_image, probability_to_logit

    check_query(args.query)  # every argument is checked before a model loads
    if not 0.0 < args.threshold < 1.0:
        raise ConfigError(
            f"--threshold is a mask probability between 0 and 1, got {args.threshold}"
        )
    cfg = model_config(args)
    _check_device(args.device)
    image = load_image(args.image)
    pipeline = LisaPipeline.from_config(
        cfg, checkpoint=args.checkpoint, device=args.device, max_new_tokens=args.max_new_tokens
    )
    result = pipeline.segment(image, args.query, threshold=probability_to_logit(args.threshold))
    out_dir = mask_folder(args)
    try:
        files = write_masks(result.masks, out_dir)
    except OSError as err:
        message = f"cannot write masks to {out_dir}: {err}; pick another --out-dir"
        raise ConfigError(message) from err
    report = summary(result, files)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_human(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        print("error: --max-new-tokens must be at least 1", file=sys.stderr)
        return EXIT_USER_ERROR
    if not math.isfinite(args.threshold):
        print(f"error: --threshold must be a finite number, got {args.threshold}", file=sys.stderr)
        return EXIT_USER_ERROR
    if check_cli_paths(*path_arguments(args)):
        return EXIT_USER_ERROR
    from lisa_demo.checkpoint import CheckpointError
    from lisa_demo.infer.pipeline import InputError
    from lisa_demo.loading import ModelLoadError, quiet_library_output

    quiet_library_output()

    try:
        return run(args)
    except (InputError, ModelLoadError, CheckpointError, ConfigError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
