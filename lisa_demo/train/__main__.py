"""`python -m lisa_demo.train` and `accelerate launch -m lisa_demo.train`: one loop for both."""

from __future__ import annotations

import logging
import sys

from lisa_demo.checkpoint import CheckpointError
from lisa_demo.config import ConfigError
from lisa_demo.data.reasonseg import DataError
from lisa_demo.loading import ModelLoadError

USER_ERRORS = (ConfigError, DataError, CheckpointError, ModelLoadError)


def main(argv: list[str] | None = None) -> int:
    from lisa_demo.train.options import parse_args

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_args(argv)
        from lisa_demo.train.loop import train

        status = train(cfg)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"training {status}: see {cfg.output_dir}/events.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
