"""LISA Studio: `python app.py` serves the reasoning-segmentation workbench.

Flags override the LISA_* environment variables (see lisa_demo/ui/settings.py). No model is
loaded here: the first segmentation loads the chosen one.

    python app.py                              the bundled tiny model (CPU, offline)
    python app.py --model models/lisa-7b-v1    a converted LISA (python -m lisa_demo.convert)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lisa_demo.config import PRESETS, QUANTIZATIONS, ConfigError, read_full_model_manifest
from lisa_demo.paths import CHECKPOINT, CHECKPOINT_FOLDER, MODEL, check_cli_paths
from lisa_demo.ui import AppSettings, allowed_paths, build_app, default_host
from lisa_demo.ui.models import is_hub_repo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LISA Studio: reasoning segmentation workbench")
    p.add_argument("--port", type=int, default=None, help="default: GRADIO_SERVER_PORT or 7860")
    p.add_argument("--host", default=None, help="default: 0.0.0.0 on a Space, else 127.0.0.1")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument(
        "--model",
        default=None,
        metavar="DIR_OR_REPO",
        help="full-model folder (a converted LISA) or Hub repo holding one, served as the "
        "default model; excludes --preset, --llava, --sam",
    )
    p.add_argument(
        "--models-dir",
        default=None,
        metavar="DIR",
        help="offer every full-model folder in DIR (default: LISA_MODELS_DIR or models/)",
    )
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="model preset")
    p.add_argument("--llava", default=None, help="LLaVA Hub id or folder (overrides the preset)")
    p.add_argument("--sam", default=None, help="SAM Hub id or folder (overrides the preset)")
    p.add_argument("--checkpoint", default=None, help="fine-tuned checkpoint folder")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=None)
    return p.parse_args(argv)


def model_error(args: argparse.Namespace) -> str | None:
    """One line saying why --model or --models-dir cannot work, or None."""
    if args.models_dir is not None and Path(args.models_dir).expanduser().is_file():
        return f"--models-dir {args.models_dir} is a file; pass the folder that holds full models"
    if args.model is None:
        return None
    if args.preset or args.llava or args.sam:
        return "--model names the whole model: drop --preset, --llava and --sam"
    if is_hub_repo(args.model):
        return None  # downloaded (and checked) on first use
    try:
        read_full_model_manifest(args.model)
    except ConfigError as err:
        return f"--model: {err}"
    return None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if check_cli_paths(
        ("--model", args.model, MODEL),
        ("--llava", args.llava, MODEL),
        ("--sam", args.sam, MODEL),
        ("--checkpoint", args.checkpoint, CHECKPOINT, CHECKPOINT_FOLDER),
    ):
        raise SystemExit(2)
    problem = model_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    try:
        settings = AppSettings.from_env(
            model=args.model,
            models_dir=args.models_dir,
            preset=args.preset,
            llava=args.llava,
            sam=args.sam,
            checkpoint=args.checkpoint,
            quantization=args.quantization,
        )
    except ValueError as err:  # LISA_* variables that contradict each other
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    demo = build_app(settings)
    demo.queue(default_concurrency_limit=1).launch(
        server_name=args.host or default_host(),
        server_port=args.port,
        share=args.share,
        show_error=True,
        allowed_paths=allowed_paths(settings),
    )


if __name__ == "__main__":
    main()
