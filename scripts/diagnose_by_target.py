"""Where a held-out score is lost, by the target's size and the scene's crowding (diagnostic).

Reads a split of synthetic scenes and the per-sample file that `python -m lisa_demo.eval ...
--per-sample FILE` wrote for it, and prints, per target size (small, medium, large) and per
number of shapes in the scene: the queries, how many masks are on the right object (IoU above
0.5) and their mean IoU, gIoU and cIoU. cIoU pools intersections and unions, so a group's
misses weigh by their union (the target plus the wrongly masked shape). No model is loaded.

    python scripts/diagnose_by_target.py runs/heldout/val runs/heldout-per-sample.json
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path


def breakdown(split: Path, per_sample: Path) -> dict[str, dict[str, dict[str, float]]]:
    rows = json.loads(per_sample.read_text())["per_sample"]
    groups: dict[str, dict[str, list]] = {"size": {}, "shapes": {}}
    for row in rows:
        annotation = json.loads((split / f"{row['image']}.json").read_text())
        objects = annotation.get("objects") or []
        targets = [o for o in objects if o.get("target")]
        size = targets[0]["size"] if len(targets) == 1 else "?"
        for kind, key in (("size", size), ("shapes", str(len(objects)))):
            groups[kind].setdefault(key, []).append(row)
    out: dict[str, dict[str, dict[str, float]]] = collections.defaultdict(dict)
    for kind, by_key in groups.items():
        for key, members in sorted(by_key.items()):
            union = sum(r["union"] for r in members)
            right = [r["iou"] for r in members if r["iou"] > 0.5]
            out[kind][key] = {
                "n": len(members),
                "right": len(right),
                "right_iou": sum(right) / len(right) if right else 0.0,
                "giou": sum(r["iou"] for r in members) / len(members),
                "ciou": sum(r["intersection"] for r in members) / union if union else 0.0,
            }
    return dict(out)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    for kind, by_key in breakdown(Path(argv[0]), Path(argv[1])).items():
        print(f"by {kind}:")
        for key, s in by_key.items():
            print(
                f"  {key:>6}  n {s['n']:3d}  right {s['right']:3d} ({s['right'] / s['n']:.3f})"
                f" at IoU {s['right_iou']:.3f}  gIoU {s['giou']:.3f}  cIoU {s['ciou']:.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
