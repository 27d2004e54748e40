"""LISA Studio: `python app.py` serves the reasoning-segmentation workbench.

Flags override the LISA_* environment variables (see lisa_demo/ui/settings.py). No model is
loaded here: the first segmentation loads the chosen one.
"""

from __future__ import annotations

import argparse

from lisa_demo.config import PRESETS, QUANTIZATIONS
from lisa_demo.paths import CHECKPOINT, CHECKPOINT_FOLDER, MODEL, check_cli_paths
from lisa_demo.ui import AppSettings, allowed_paths, build_app, default_host


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LISA Studio: reasoning segmentation workbench")
    p.add_argument("--port", type=int, default=None, help="default: GRADIO_SERVER_PORT or 7860")
    p.add_argument("--host", default=None, help="default: 0.0.0.0 on a Space, else 127.0.0.1")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="model preset")
    p.add_argument("--llava", default=None, help="LLaVA Hub id or folder (overrides the preset)")
    p.add_argument("--sam", default=None, help="SAM Hub id or folder (overrides the preset)")
    p.add_argument("--checkpoint", default=None, help="fine-tuned checkpoint folder")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if check_cli_paths(
        ("--llava", args.llava, MODEL),
        ("--sam", args.sam, MODEL),
        ("--checkpoint", args.checkpoint, CHECKPOINT, CHECKPOINT_FOLDER),
    ):
        raise SystemExit(2)
    settings = AppSettings.from_env(
        preset=args.preset,
        llava=args.llava,
        sam=args.sam,
        checkpoint=args.checkpoint,
        quantization=args.quantization,
    )
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
