"""Metrics on small masks counted by hand (gIoU = mean per-mask IoU, cIoU = total I / total U)."""

import numpy as np
import pytest
import torch

from lisa_demo.metrics import (
    IGNORE_INDEX,
    IoUAccumulator,
    intersection_union,
    mask_dice,
    mask_iou,
)

X = IGNORE_INDEX

# Prediction: 6 pixels, two of them on ignore pixels of the target.
PRED_A = np.array(
    [
        [1, 1, 1, 0],
        [1, 1, 0, 0],
        [1, 0, 0, 0],
        [0, 0, 0, 0],
    ],
    dtype=bool,
)
TARGET_A = np.array(
    [
        [1, 1, X, 0],
        [1, 0, 0, 0],
        [X, 0, 0, 1],
        [0, 0, 0, 1],
    ],
    dtype=np.uint8,
)
# Ignore removed: |P| = 4, |T| = 5, I = 3 ((0,0), (0,1), (1,0)), U = 4 + 5 - 3 = 6.
# Without removing ignore pixels it would be I = 3, U = 8.

PRED_B = np.zeros((4, 4), dtype=np.uint8)
PRED_B[3, 3] = 1
TARGET_B = np.zeros((4, 4), dtype=np.uint8)
TARGET_B[2:, 2:] = 1  # I = 1, U = 4

EMPTY = np.zeros((4, 4), dtype=np.uint8)


def test_intersection_union_removes_ignore_pixels_from_both():
    assert intersection_union(PRED_A, TARGET_A) == (3, 6)
    assert mask_iou(PRED_A, TARGET_A) == pytest.approx(3 / 6)


def test_dice_removes_ignore_pixels():
    assert mask_dice(PRED_A, TARGET_A) == pytest.approx(2 * 3 / (4 + 5))
    assert mask_dice(EMPTY, EMPTY) == 1.0
    assert mask_dice(EMPTY, TARGET_B) == 0.0


def test_empty_versus_empty_is_one_and_empty_versus_target_is_zero():
    assert mask_iou(EMPTY, EMPTY) == 1.0
    assert mask_iou(EMPTY, TARGET_B) == 0.0
    assert mask_iou(TARGET_B, EMPTY) == 0.0
    only_ignore = np.full((4, 4), X, dtype=np.uint8)
    assert mask_iou(np.ones((4, 4)), only_ignore) == 1.0  # nothing left to score


def test_giou_and_ciou_differ_on_a_hand_example():
    acc = IoUAccumulator()
    assert acc.add(PRED_A, TARGET_A) == pytest.approx(1 / 2)
    assert acc.add(PRED_B, TARGET_B) == pytest.approx(1 / 4)
    assert acc.giou == pytest.approx((1 / 2 + 1 / 4) / 2)  # 3/8
    assert acc.ciou == pytest.approx((3 + 1) / (6 + 4))  # 2/5
    acc.add(EMPTY, EMPTY)  # IoU 1, adds nothing to I or U
    assert acc.as_dict() == {"giou": pytest.approx(7 / 12), "ciou": pytest.approx(2 / 5), "n": 3}


def test_accepts_torch_tensors_and_never_mutates_inputs():
    pred, target = torch.from_numpy(PRED_A.copy()), torch.from_numpy(TARGET_A.copy())
    logits = torch.where(pred, 3.0, 0.0).to(torch.bfloat16)
    assert intersection_union(pred, target) == (3, 6)
    assert intersection_union(logits, target) == (3, 6)
    assert torch.equal(pred, torch.from_numpy(PRED_A)) and torch.equal(
        target, torch.from_numpy(TARGET_A)
    )
    pred_np, target_np = PRED_A.copy(), TARGET_A.copy()
    mask_iou(pred_np, target_np)
    assert np.array_equal(pred_np, PRED_A) and np.array_equal(target_np, TARGET_A)
    assert isinstance(mask_iou(pred, target), float)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        mask_iou(np.zeros((4, 4)), np.zeros((4, 5), dtype=np.uint8))


def test_empty_accumulator_and_empty_unions():
    assert IoUAccumulator().as_dict() == {"giou": 0.0, "ciou": 0.0, "n": 0}
    acc = IoUAccumulator()
    acc.add(EMPTY, EMPTY)
    assert (acc.giou, acc.ciou) == (1.0, 1.0)
    with pytest.raises(ValueError):
        acc.add_counts(5, 3)


def test_merge_and_tensor_round_trip():
    first, second = IoUAccumulator(), IoUAccumulator()
    first.add(PRED_A, TARGET_A)
    second.add(PRED_B, TARGET_B)
    second.add(EMPTY, EMPTY)
    merged = first.merge(second)
    assert (first.count, second.count, merged.count) == (1, 2, 3)
    assert merged.giou == pytest.approx(7 / 12) and merged.ciou == pytest.approx(2 / 5)

    tensor = merged.as_tensor()
    assert tensor.dtype == torch.float64 and tensor.shape == (4,)
    assert IoUAccumulator.from_tensor(tensor) == merged
    summed = IoUAccumulator.from_tensor(first.as_tensor() + second.as_tensor())  # all-reduce
    assert summed == merged
