"""Score segmentation masks on a ReasonSeg folder with LISA's gIoU and cIoU.

    python -m lisa_demo.eval --dataset DIR/val --predictions PRED_DIR [--json] [--all-queries]

PRED_DIR holds one PNG per scored query: NAME.png for each image's first query (LISA's
protocol), or NAME_q{index}.png (0-based query index) for every query with --all-queries.
Non-zero pixels are foreground; masks are read as displayed (their EXIF orientation applied)
and must match the image as displayed. A missing file counts as an empty mask and is reported
on stderr. Ignore pixels of the ground truth are excluded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from lisa_demo.atomic import complete_folder
from lisa_demo.config import PRECISIONS, QUANTIZATIONS
from lisa_demo.data.reasonseg import (
    EXIF_ORIENTATION_TAG,
    EXPECTED_LAYOUT,
    TRANSPOSED_ORIENTATIONS,
    DataError,
    ReasonSegDataset,
    Sample,
)
from lisa_demo.metrics import IoUAccumulator, intersection_union
from lisa_demo.paths import (
    CHECKPOINT,
    CHECKPOINT_FOLDER,
    FOLDER,
    MODEL,
    OUTPUT_FILE,
    check_cli_paths,
)


class PredictionError(ValueError):
    """A prediction file that cannot be scored; the message names the file."""


def prediction_name(sample: Sample, all_queries: bool) -> str:
    """File name of the sample's prediction: NAME.png, or NAME_q{index}.png for all queries."""
    name = sample.record.name
    return f"{name}_q{sample.query_index}.png" if all_queries else f"{name}.png"


def load_prediction(
    path: Path, height: int, width: int, image_path: Path | None = None
) -> np.ndarray:
    """Read a prediction mask: bool [height, width], True where any non-alpha band is non-zero.

    The mask is read as displayed: an EXIF orientation in the PNG itself is applied, as it is
    to the images. height and width are the image's size after its own EXIF orientation.

    Args:
        image_path: the scored image; when given, a prediction saved at the image's stored size
            (its EXIF orientation not applied) is named as such in the error.

    Raises:
        PredictionError: unreadable file, or a size other than the image's.
    """
    try:
        with Image.open(path) as image:
            oriented = ImageOps.exif_transpose(image)
            pixels = np.array(oriented)
            colour_bands = [i for i, band in enumerate(oriented.getbands()) if band != "A"]
    except (OSError, SyntaxError, ValueError) as error:
        raise PredictionError(f"cannot read prediction {path}: {error}") from error
    if pixels.shape[:2] != (height, width):
        found = f"{pixels.shape[1]}x{pixels.shape[0]}"
        mismatch = f"prediction {path} is {found} (WxH) but its image is {width}x{height}"
        orientation = None if image_path is None else _transposing_orientation(image_path)
        if orientation is not None and pixels.shape[:2] == (width, height):
            raise PredictionError(
                f"{mismatch} as displayed (EXIF orientation {orientation}; the file stores "
                f"{found}); save masks in the displayed orientation (PIL.ImageOps.exif_transpose)"
            )
        raise PredictionError(f"{mismatch}; save masks at the original image size")
    if pixels.ndim == 3:
        return pixels[..., colour_bands].any(axis=-1)  # alpha is not a foreground signal
    return pixels != 0


def _transposing_orientation(image_path: Path) -> int | None:
    """The image file's EXIF orientation when it swaps width and height, else None."""
    try:
        with Image.open(image_path) as image:
            orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError):
        return None
    return orientation if orientation in TRANSPOSED_ORIENTATIONS else None


def score_prediction_folder(
    dataset: ReasonSegDataset | Path | str, pred_dir: Path | str, all_queries: bool = False
) -> tuple[IoUAccumulator, list[str], list[dict]]:
    """Score the PNG masks in pred_dir against a ReasonSeg folder.

    Args:
        dataset: a ReasonSeg folder, or a dataset whose samples are scored as they are.
        all_queries: score every query (NAME_q{index}.png) instead of the first (NAME.png).

    Returns:
        the accumulator (gIoU, cIoU, n), the missing prediction file names (scored as empty
        masks), and one dict per sample: name, query_index, query, prediction, intersection,
        union, iou, missing.
    """
    if not isinstance(dataset, ReasonSegDataset):
        dataset = ReasonSegDataset(dataset, queries="all" if all_queries else "first")
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise PredictionError(f"prediction folder {pred_dir} does not exist")
    accumulator, missing, per_sample = IoUAccumulator(), [], []
    for sample in dataset:
        record = sample.record
        file_name = prediction_name(sample, all_queries)
        path = pred_dir / file_name
        found = path.is_file()
        if found:
            pred = load_prediction(path, record.height, record.width, record.image_path)
        else:
            missing.append(file_name)
            pred = np.zeros((record.height, record.width), dtype=bool)
        intersection, union = intersection_union(pred, record.load_mask())
        iou = accumulator.add_counts(intersection, union)
        per_sample.append(
            {
                "name": record.name,
                "query_index": sample.query_index,
                "query": sample.query,
                "prediction": file_name,
                "intersection": intersection,
                "union": union,
                "iou": iou,
                "missing": not found,
            }
        )
    return accumulator, missing, per_sample


def build_parser() -> argparse.ArgumentParser:
    """The CLI: a dataset, and either a prediction folder or (later) a checkpoint to run."""
    parser = argparse.ArgumentParser(
        prog="python -m lisa_demo.eval",
        description="gIoU and cIoU on a ReasonSeg folder (ignore pixels excluded).",
    )
    parser.add_argument("--dataset", type=Path, required=True, help="ReasonSeg split folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--predictions", type=Path, metavar="PRED_DIR", help="folder of NAME.png masks"
    )
    source.add_argument("--checkpoint", type=Path, help="score a fine-tuned checkpoint")
    source.add_argument(
        "--model-only",
        action="store_true",
        help="score the --model (or --preset / --llava --sam) model itself",
    )
    model = parser.add_argument_group("model scoring (with --checkpoint or --model-only)")
    model.add_argument("--model", type=Path, metavar="DIR", help="full-model folder to score")
    model.add_argument("--preset", default=None, help="base model preset (default: tiny)")
    model.add_argument("--llava", default=None, help="LLaVA Hub id or folder (overrides)")
    model.add_argument("--sam", default=None, help="SAM Hub id or folder (overrides)")
    model.add_argument("--quantization", choices=QUANTIZATIONS, default=None)
    model.add_argument("--precision", choices=PRECISIONS, default=None)
    model.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    model.add_argument("--batch-size", type=int, default=4)
    model.add_argument(
        "--seg-rate",
        type=int,
        default=0,
        metavar="N",
        help="also generate answers for N samples and report the share containing [SEG]",
    )
    model.add_argument(
        "--per-sample",
        type=Path,
        default=None,
        help="write per-sample IoUs here (default: eval_<split>.json beside the checkpoint)",
    )
    parser.add_argument(
        "--all-queries",
        action="store_true",
        help="score every query (NAME_q{index}.png) instead of each image's first (NAME.png)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _report(accumulator: IoUAccumulator, missing: list[str], as_json: bool) -> None:
    if missing:
        shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        print(f"missing {len(missing)} predictions, scored as empty: {shown}", file=sys.stderr)
    if as_json:
        print(json.dumps({**accumulator.as_dict(), "missing": missing}))
    else:
        print(f"gIoU {accumulator.giou:.4f}  cIoU {accumulator.ciou:.4f}  n {accumulator.count}")


def score_model_cli(args: argparse.Namespace) -> int:
    """Run a model on the split with the training-time validation code and print its scores."""
    from lisa_demo.checkpoint import CheckpointError
    from lisa_demo.config import ConfigError, base_model_config
    from lisa_demo.loading import ModelLoadError, load_lisa, quiet_library_output
    from lisa_demo.train.evaluate import score_model

    quiet_library_output()
    try:
        queries = "all" if args.all_queries else "first"
        dataset = ReasonSegDataset(args.dataset, queries=queries)
        print(dataset.report.summary(), file=sys.stderr)
        cfg = base_model_config(args.preset, args.model, args.llava, args.sam, args.checkpoint)
        overrides = {k: getattr(args, k) for k in ("quantization", "precision") if getattr(args, k)}
        if args.llava or args.sam:
            overrides.update(llava=args.llava or cfg.llava, sam=args.sam or cfg.sam)
            overrides.update(build_tiny=False, heads=None)
        loaded = load_lisa(cfg.replace(**overrides), checkpoint=args.checkpoint, device=args.device)
        samples = [dataset[i] for i in range(len(dataset))]
        result = score_model(loaded, samples, args.batch_size, args.seg_rate)
    except (DataError, ConfigError, CheckpointError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if not isinstance(error, DataError) else 1
    per_sample = result.pop("per_sample")
    target = per_sample_file(args)
    Path(target).write_text(json.dumps({**result, "per_sample": per_sample}, indent=2))
    print(f"per-sample IoUs written to {target}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        line = f"gIoU {result['giou']:.4f}  cIoU {result['ciou']:.4f}  n {result['n']}"
        if "seg_rate" in result:
            line += f"  [SEG] rate {result['seg_rate']:.3f} (of {result['seg_rate_n']})"
        print(line)
        for family, scores in result["families"].items():
            giou, ciou, n = scores["giou"], scores["ciou"], scores["n"]
            print(f"  {family:12s} gIoU {giou:.4f}  cIoU {ciou:.4f}  n {n}")
    return 0


def per_sample_file(args: argparse.Namespace) -> Path:
    """--per-sample, else eval_<split>.json beside the checkpoint (or in the current folder)."""
    if args.per_sample is not None:
        return args.per_sample
    home = Path.cwd() if args.checkpoint is None else complete_folder(args.checkpoint)
    return Path(home or args.checkpoint) / f"eval_{Path(args.dataset).name}.json"


def path_arguments(args: argparse.Namespace) -> list[tuple]:
    """(flag, value, kind) of every path the command reads or writes, for lisa_demo.paths."""
    scores_model = args.checkpoint is not None or args.model_only
    return [
        ("--dataset", args.dataset, FOLDER, EXPECTED_LAYOUT),
        ("--predictions", args.predictions, FOLDER, "a folder of NAME.png masks"),
        ("--checkpoint", args.checkpoint, CHECKPOINT, CHECKPOINT_FOLDER),
        ("--model", args.model, MODEL),
        ("--llava", args.llava, MODEL),
        ("--sam", args.sam, MODEL),
        ("--per-sample", per_sample_file(args) if scores_model else None, OUTPUT_FILE),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 bad data, 2 unsupported request or
    a path argument that cannot work)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if check_cli_paths(*path_arguments(args)):
        return 2
    if args.checkpoint is not None or args.model_only:
        return score_model_cli(args)
    try:
        queries = "all" if args.all_queries else "first"
        dataset = ReasonSegDataset(args.dataset, queries=queries)
        print(dataset.report.summary(), file=sys.stderr)
        accumulator, missing, _ = score_prediction_folder(
            dataset, args.predictions, args.all_queries
        )
    except (DataError, PredictionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    _report(accumulator, missing, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
