"""How the answers name the target on a synthetic ReasonSeg split (each image's first query):
how many say a given word (e.g. a fine-tune's new concept on scenes that do not hold it) and
how many name another kind of shape than the target's.

    PYTHONPATH=. python scripts/answer_kinds.py --dataset runs/heldout/val \
        --checkpoint runs/heart-finetune/checkpoints/best --word heart
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from lisa_demo.config import preset
from lisa_demo.data.synthetic import SHAPE_KINDS
from lisa_demo.infer.pipeline import LisaPipeline, load_image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=None, help="none: the bundled model")
    parser.add_argument("--word", default="heart")
    parser.add_argument("--limit", type=int, default=0, help="first N images (0: all)")
    args = parser.parse_args()
    pipeline = LisaPipeline.from_config(preset("tiny"), checkpoint=args.checkpoint, device="cpu")
    files = sorted(args.dataset.glob("*.json"))[: args.limit or None]
    kinds = re.compile(r"\b(" + "|".join(SHAPE_KINDS) + r")s?\b")
    say_word = other_kind = 0
    for path in files:
        annotation = json.loads(path.read_text())
        text = annotation["text"]
        query = text[0] if isinstance(text, list) else text
        target = next(o for o in annotation["objects"] if o["target"])
        answer = pipeline.segment(load_image(path.with_suffix(".jpg")), query).answer
        say_word += re.search(rf"\b{re.escape(args.word)}\b", answer) is not None
        named = kinds.findall(answer)
        other_kind += bool(named) and named[-1] != target["kind"]
    print(
        f"{len(files)} answers: {say_word} say {args.word!r}; {other_kind} name another kind "
        "than the target's"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
