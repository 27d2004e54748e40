"""scripts/diagnose_by_target.py: the held-out breakdown by target size and scene crowding."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "diagnose_by_target.py"


def _load():
    spec = importlib.util.spec_from_file_location("diagnose_by_target", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scene(split: Path, name: str, target_size: str, shapes: int) -> None:
    objects = [{"kind": "star", "size": "medium", "target": False} for _ in range(shapes - 1)]
    objects.append({"kind": "circle", "size": target_size, "target": True})
    (split / f"{name}.json").write_text(json.dumps({"objects": objects}))


def test_groups_hand_computed(tmp_path):
    _scene(tmp_path, "a", "small", 3)
    _scene(tmp_path, "b", "small", 4)
    _scene(tmp_path, "c", "large", 3)
    rows = [
        {"image": "a", "iou": 0.8, "intersection": 80, "union": 100},
        {"image": "b", "iou": 0.0, "intersection": 0, "union": 300},
        {"image": "c", "iou": 0.6, "intersection": 300, "union": 500},
    ]
    per_sample = tmp_path / "per-sample.json"
    per_sample.write_text(json.dumps({"per_sample": rows}))
    out = _load().breakdown(tmp_path, per_sample)

    small, large = out["size"]["small"], out["size"]["large"]
    assert (small["n"], small["right"]) == (2, 1)
    assert small["right_iou"] == pytest.approx(0.8)
    assert small["giou"] == pytest.approx(0.4)
    assert small["ciou"] == pytest.approx(80 / 400)  # the miss weighs by its union
    assert (large["n"], large["right"], large["ciou"]) == (1, 1, pytest.approx(0.6))
    three, four = out["shapes"]["3"], out["shapes"]["4"]
    assert (three["n"], three["right"]) == (2, 2)
    assert three["ciou"] == pytest.approx(380 / 600)
    assert (four["n"], four["right"], four["right_iou"], four["ciou"]) == (1, 0, 0.0, 0.0)
