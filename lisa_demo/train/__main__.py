"""`python -m lisa_demo.train` and `accelerate launch -m lisa_demo.train`: one loop for both."""

from __future__ import annotations

import logging
import sys

from lisa_demo.checkpoint import CheckpointError
from lisa_demo.config import ConfigError
from lisa_demo.data.reasonseg import DataError
from lisa_demo.loading import ModelLoadError

USER_ERRORS = (ConfigError, DataError, CheckpointError, ModelLoadError)


def _record_early_failure(argv: list[str] | None, error: Exception) -> None:
    """A run refused before it started still tells events.jsonl readers (the app) why."""
    from lisa_demo.paths import OUTPUT_FOLDER, PathError, check_path
    from lisa_demo.train.events import EventLog
    from lisa_demo.train.options import build_parser

    known, _ = build_parser().parse_known_args(argv)
    try:
        check_path("--output-dir", known.output_dir, OUTPUT_FOLDER)
    except PathError:
        return  # nowhere to record it: the error line says why
    log = EventLog(known.output_dir)
    log.emit("end", status="failed", error=str(error), step=0)
    log.close()


def main(argv: list[str] | None = None) -> int:
    from lisa_demo.train.options import parse_args

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_args(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        _record_early_failure(argv, err)
        return 2
    try:
        from lisa_demo.loading import quiet_library_output
        from lisa_demo.train.loop import train
        from lisa_demo.train.pretrain.recipe import recipe_for

        quiet_library_output()  # a refusal after loading is one line, as before it
        result = train(cfg, recipe_for(cfg.pretrain, cfg.seed))  # records its own failures
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result.status != "estimated":  # an estimate's last line is its JSON
        print(f"training {result.status}: see {cfg.output_dir}/events.jsonl")
    if result.warning:
        print(f"warning: {result.warning}")  # the last line, where it is seen
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
