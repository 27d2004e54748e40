"""The app's example scenes: one synthetic scene per query family, with ground-truth masks.

    python -m lisa_demo.data.examples --out assets/examples --seed 2026

Writes NAME.jpg, NAME_mask.png (0 / 255, the target) and NAME.json ({"query", "mask",
"family", "is_sentence", "held_out"}). The scenes come from a seed never used for training.
One extra scene shows the concept the bundled model never saw (`held_out`), for the
fine-tuning demo.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from lisa_demo.data.reasonseg import TARGET_VALUE, rasterize_shapes
from lisa_demo.data.synthetic import FAMILIES, generate_scene
from lisa_demo.paths import OUTPUT_FOLDER, check_cli_paths

HELD_OUT_CONCEPT = "heart"  # left out of the bundled model's pretraining data


def write_example(out: Path, name: str, image: np.ndarray, annotation: dict, held_out) -> None:
    height, width = image.shape[:2]
    mask = rasterize_shapes(annotation["shapes"], height, width) == TARGET_VALUE
    Image.fromarray(image).save(out / f"{name}.jpg", quality=95)
    Image.fromarray((mask * 255).astype(np.uint8)).save(out / f"{name}_mask.png")
    meta = {
        "query": annotation["text"][0],
        "mask": f"{name}_mask.png",
        "family": annotation["family"],
        "is_sentence": annotation["is_sentence"],
        "held_out": held_out,
    }
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2))


def write_examples(out: Path | str, seed: int = 2026) -> list[str]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"examples/{seed}")
    names = []
    for index, family in enumerate(FAMILIES, start=1):
        image, annotation = generate_scene(rng, exclude_concept=HELD_OUT_CONCEPT, family=family)
        names.append(f"example_{index}")
        write_example(out, names[-1], image, annotation, None)
    image, annotation = generate_scene(rng, focus_concept=HELD_OUT_CONCEPT, family="uniqueness")
    names.append(f"example_{len(FAMILIES) + 1}")
    write_example(out, names[-1], image, annotation, HELD_OUT_CONCEPT)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    if check_cli_paths(("--out", args.out, OUTPUT_FOLDER)):
        return 2
    names = write_examples(args.out, args.seed)
    print(f"wrote {len(names)} examples to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
