"""`python -m lisa_demo.infer`: see lisa_demo.infer.cli."""

from lisa_demo.infer.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
