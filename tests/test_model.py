"""The LISA forward pass: [SEG] selection, losses, masks per [SEG], what trains and what not."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch

from lisa_demo.config import ConfigError, LossWeights, preset
from lisa_demo.losses import dice_per_mask, sigmoid_bce_per_mask
from lisa_demo.model import seg_query_mask

QUESTION = "Can you segment the red square in this image?"
SEG = 99


# [SEG] positions ----------------------------------------------------------------------------
def test_query_positions_are_the_tokens_just_before_each_seg():
    pad = 0
    ids = torch.tensor(
        [
            [5, 6, SEG, 7, 8, SEG, 9],  # two [SEG]: queries at 1 and 4
            [pad, pad, 5, 6, 7, SEG, 2],  # left padding does not move the rule
            [SEG, 5, 6, 7, 8, 9, 10],  # a leading [SEG] has no state before it
            [5, SEG, SEG, 6, 7, 8, 9],  # adjacent [SEG]: the first [SEG] is itself a query
        ]
    )
    expected = torch.zeros_like(ids, dtype=torch.bool)
    expected[0, [1, 4]] = True
    expected[1, 4] = True
    expected[3, [0, 1]] = True
    assert torch.equal(seg_query_mask(ids, SEG), expected)
    assert torch.equal(ids, ids.clone())  # input untouched


# Loss terms ---------------------------------------------------------------------------------
def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


LOGITS = [[[0.0, 2.0], [-1.0, 3.0]], [[-4.0, -4.0], [-4.0, -4.0]]]
TARGETS = [[[0.0, 1.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]


def test_bce_matches_a_hand_computation():
    expected = []
    for logits, targets in zip(LOGITS, TARGETS, strict=True):
        terms = []
        for x, t in zip(sum(logits, []), sum(targets, []), strict=True):
            p = _sigmoid(x)
            terms.append(-(t * math.log(p) + (1 - t) * math.log(1 - p)))
        expected.append(sum(terms) / len(terms))
    logits, targets = torch.tensor(LOGITS), torch.tensor(TARGETS)
    got = sigmoid_bce_per_mask(logits, targets)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(logits, torch.tensor(LOGITS))  # inputs not modified


def test_dice_matches_the_reference_scaled_formula():
    scale, eps = 1000.0, 1e-6
    expected = []
    for logits, targets in zip(LOGITS, TARGETS, strict=True):
        probs = [_sigmoid(x) for x in sum(logits, [])]
        flat = sum(targets, [])
        numerator = 2 * sum(p / scale * t for p, t in zip(probs, flat, strict=True))
        denominator = sum(p / scale for p in probs) + sum(t / scale for t in flat)
        expected.append(1 - (numerator + eps) / (denominator + eps))
    got = dice_per_mask(torch.tensor(LOGITS), torch.tensor(TARGETS))
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    # The /1000 makes eps matter: for an empty target and small probabilities the loss is
    # clearly below 1, where unscaled sums would give 1 - 1e-5.
    assert 1e-3 < 1 - expected[1] < 0.1
    unscaled = dice_per_mask(torch.tensor(LOGITS), torch.tensor(TARGETS), scale=1.0)
    assert 1 - unscaled[1].item() < 1e-4
    # A certain, empty prediction of an empty target is a perfect Dice (0 loss), thanks to eps.
    empty = dice_per_mask(torch.full((1, 2, 2), -100.0), torch.zeros(1, 2, 2))
    assert empty.item() == pytest.approx(0.0, abs=1e-6)


def test_loss_weights_are_lisas_three_and_the_iou_option():
    assert dataclasses.astuple(LossWeights()) == (1.0, 2.0, 0.5, 0.0)  # ce, bce, dice, iou
    with pytest.raises(ConfigError, match="bce"):
        LossWeights(bce=-1.0)
    # A run recorded with a recipe's terms (older manifests and events) reads back LISA's.
    recorded = {"ce": 1.0, "bce": 2.0, "dice": 1.0, "iou": 1.0, "target": 1.0, "pointing": 2.0}
    assert LossWeights.from_fields(recorded) == LossWeights(1.0, 2.0, 1.0, 1.0)


# Forward pass -------------------------------------------------------------------------------
def _targets(shape: tuple[int, int], n: int, seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.random((n, *shape)) > 0.5).float()]


def _check_total(out, weights: LossWeights) -> None:
    expected = weights.ce * out.ce_loss + weights.bce * out.bce_loss + weights.dice * out.dice_loss
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_two_seg_tokens_give_two_masks_at_original_size_and_weighted_losses(
    tiny_loaded, make_inputs, scene_image, monkeypatch
):
    model = tiny_loaded.model
    inputs = make_inputs(tiny_loaded, scene_image, QUESTION, "Sure, [SEG] and [SEG].")
    assert int((inputs["input_ids"] == tiny_loaded.seg_token_id).sum()) == 2
    gt = _targets(scene_image.shape[:2], 2)
    with torch.no_grad():
        out = model(**inputs, gt_masks=gt)
    assert out.mask_count == 2
    assert out.mask_logits[0].shape == (2, *scene_image.shape[:2])
    assert out.scores[0].shape == (2,)
    assert not torch.allclose(out.mask_logits[0][0], out.mask_logits[0][1])
    # The [SEG] states and their projections (the prompts SAM's decoder got) come back too.
    assert out.seg_states.shape == (2, model.text_hidden_fcs[0].in_features)
    with torch.no_grad():
        torch.testing.assert_close(out.prompts[0], model.project(out.seg_states))
    bce = sigmoid_bce_per_mask(out.mask_logits[0], gt[0]).mean()
    dice = dice_per_mask(out.mask_logits[0], gt[0]).mean()
    assert out.bce_loss.item() == pytest.approx(bce.item(), rel=1e-6)
    assert out.dice_loss.item() == pytest.approx(dice.item(), rel=1e-6)
    assert out.ce_loss.item() > 0
    _check_total(out, LossWeights())
    assert out.loss.item() == pytest.approx(
        (out.ce_loss + 2.0 * out.bce_loss + 0.5 * out.dice_loss).item(), rel=1e-6
    )
    weights = LossWeights(ce=0.25, bce=3.0, dice=7.0)
    monkeypatch.setattr(model, "loss_weights", weights)
    with torch.no_grad():
        _check_total(model(**inputs, gt_masks=gt), weights)
    with pytest.raises(ValueError, match="2 \\[SEG\\] tokens but 1"):
        with torch.no_grad():
            model(**inputs, gt_masks=_targets(scene_image.shape[:2], 1))


def test_text_loss_scores_only_the_answer_and_matches_the_full_logits_loss(
    tiny_loaded, make_inputs, scene_image
):
    """Logits are computed only at answer positions; the loss equals LLaVA's own CE over
    the full logits with the same labels (prompt and image positions ignored)."""
    model = tiny_loaded.model
    inputs = make_inputs(tiny_loaded, scene_image, QUESTION, "Sure, [SEG].")
    with torch.no_grad():
        ours = model(**inputs).ce_loss
        full = model.llava(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            labels=inputs["labels"],
        )
    assert full.logits.shape[1] == inputs["input_ids"].shape[1]
    assert ours.item() == pytest.approx(full.loss.item(), rel=1e-5)
    answer_tokens = int((inputs["labels"] != -100).sum())
    assert 0 < answer_tokens < inputs["input_ids"].shape[1] // 4


# What trains --------------------------------------------------------------------------------
TRAINABLE = re.compile(
    r"llava\.base_model\.model\.model\.language_model\.layers\.\d+\.self_attn\."
    r"(q_proj|v_proj)\.lora_[AB]\.default\.weight"
    r"|llava\.base_model\.model\.(model\.language_model\.embed_tokens|lm_head)"
    r"\.token_adapter\.trainable_tokens_delta\.default"
    r"|text_hidden_fcs\..*"
    r"|sam\.mask_decoder\..*"
)


def _nonzero(param: torch.nn.Parameter) -> bool:
    return param.grad is not None and bool(param.grad.abs().sum() > 0)


def test_gradients_reach_exactly_what_lisa_trains(make_inputs, scene_image):
    from lisa_demo.loading import load_lisa

    weights = LossWeights(ce=0.7, bce=1.3, dice=0.9)
    cfg = preset("tiny-random").replace(use_lora=True, losses=weights)
    loaded = load_lisa(cfg, device="cpu", for_training=True)
    model = loaded.model
    assert model.loss_weights == weights
    inputs = make_inputs(loaded, scene_image, QUESTION, "Sure, [SEG].")
    gt = _targets(scene_image.shape[:2], 1)
    out = model(**inputs, gt_masks=gt)
    _check_total(out, weights)
    out.loss.backward()

    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    expected = {n for n in params if TRAINABLE.fullmatch(n)}
    assert trainable == expected
    for name, param in params.items():
        if name not in expected:
            assert param.grad is None, f"frozen {name} got a gradient"
    assert not any("vision_tower" in n or "sam.vision_encoder" in n for n in trainable)

    lora_a = [p for n, p in params.items() if ".lora_A." in n]
    lora_b = [p for n, p in params.items() if ".lora_B." in n]
    assert len(lora_a) == len(lora_b) == 2 * 4  # q_proj, v_proj in 4 layers
    assert all(_nonzero(p) for p in lora_b)
    assert not any(_nonzero(p) for p in lora_a)  # lora_B is zero at init
    tokens = [p for n, p in params.items() if "trainable_tokens_delta" in n]
    assert len(tokens) == 2 and all(p.shape[0] == 1 for p in tokens)  # the [SEG] rows only
    assert all(_nonzero(p) for p in tokens)
    assert all(_nonzero(p) for n, p in params.items() if n.startswith("text_hidden_fcs."))
    decoder = {n: p for n, p in params.items() if n.startswith("sam.mask_decoder.")}
    assert _nonzero(decoder["sam.mask_decoder.upscale_conv1.weight"])
    assert _nonzero(decoder["sam.mask_decoder.transformer.layers.0.self_attn.q_proj.weight"])
    assert sum(_nonzero(p) for p in decoder.values()) > len(decoder) // 2

    optimizer = torch.optim.AdamW([params[n] for n in sorted(trainable)], lr=1e-2)
    optimizer.step()
    optimizer.zero_grad()
    model(**inputs, gt_masks=gt).loss.backward()
    assert all(_nonzero(p) for p in lora_a)
    assert all(params[n].grad is None for n in params if n not in expected)


# The tiny SAM ------------------------------------------------------------------------------
def test_tiny_sam_position_features_have_sams_scale():
    """transformers draws them with std hidden_size // 2; SAM (and our tiny build) use 1."""
    from transformers import SamModel

    from lisa_demo.tiny import sam_config

    assert SamModel(sam_config()).shared_image_embedding.positional_embedding.std() > 20
    from lisa_demo.config import preset
    from lisa_demo.loading import load_lisa

    built = load_lisa(preset("tiny-random"), device="cpu").model.sam
    std = built.shared_image_embedding.positional_embedding.std().item()
    assert 0.7 < std < 1.3


# Mask post-processing -----------------------------------------------------------------------
def test_bilinear_matrix_matches_a_hand_worked_case():
    """2 -> 4 pixels: samples at 0 (clamped from -0.25), 0.25, 0.75 and 1.25 (past the last
    pixel, which then takes both weights)."""
    from lisa_demo.model import bilinear_matrix

    expected = torch.tensor(
        [[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64
    )
    assert torch.equal(bilinear_matrix(4, 2), expected)
    # 4 -> 2 (no antialiasing): samples at 0.5 and 2.5
    assert torch.equal(
        bilinear_matrix(2, 4),
        torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]], dtype=torch.float64),
    )


def _interpolate_chain(low_res, pad_size, input_size, original_size):
    """SAM's post-processing as F.interpolate calls (what upsample_mask_logits replaces), in
    float64: PyTorch's float32 interpolation computes its sample positions in float32, off
    by up to 3e-4 in value at 1024 pixels."""
    import torch.nn.functional as F

    x = F.interpolate(low_res[:, None].double(), size=(pad_size, pad_size), mode="bilinear",
                      align_corners=False)  # fmt: skip
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, size=tuple(original_size), mode="bilinear", align_corners=False)[:, 0]


@pytest.mark.parametrize(
    ("low", "pad_size", "input_size", "original_size"),
    [
        (64, 256, (256, 187), (320, 234)),  # upsampled, portrait
        (64, 256, (171, 256), (200, 300)),  # landscape
        (64, 256, (100, 256), (50, 128)),  # a small image: the last resize shrinks
        (64, 256, (256, 256), (256, 256)),
        (256, 1024, (683, 1024), (480, 720)),  # real SAM's sizes
        (4, 16, (10, 16), (3, 5)),
    ],
)
def test_upsample_mask_logits_equals_sams_interpolate_chain_and_its_gradient(
    low, pad_size, input_size, original_size
):
    from lisa_demo.model import upsample_mask_logits

    torch.manual_seed(0)
    low_res = (4 * torch.randn(3, low, low)).requires_grad_()
    ours = upsample_mask_logits(low_res, pad_size, input_size, original_size)
    reference = _interpolate_chain(low_res, pad_size, input_size, original_size)
    assert ours.shape == reference.shape == (3, *original_size)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours.double(), reference, atol=1e-5, rtol=0)
    weights = torch.randn_like(reference)
    (g_ours,) = torch.autograd.grad((ours.double() * weights).sum(), low_res)
    (g_reference,) = torch.autograd.grad((reference * weights).sum(), low_res)
    assert torch.allclose(g_ours, g_reference, atol=1e-4, rtol=1e-6)


def test_upsampling_first_used_under_inference_mode_still_trains():
    """The per-size matrices are cached: made under inference_mode (evaluation), they must
    still serve a training step's backward."""
    from lisa_demo.model import upsample_mask_logits

    with torch.inference_mode():
        upsample_mask_logits(torch.randn(1, 8, 8), 32, (29, 32), (31, 37))
    low_res = torch.randn(1, 8, 8, requires_grad=True)
    upsample_mask_logits(low_res, 32, (29, 32), (31, 37)).sum().backward()
    assert low_res.grad is not None and torch.isfinite(low_res.grad).all()
