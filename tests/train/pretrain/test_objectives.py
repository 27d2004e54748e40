"""The pretraining recipe's loss terms beside LISA's: seg words, clicks, target, pointing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lisa_demo.config import ConfigError, LossWeights, preset
from lisa_demo.data.synthetic import DESCRIPTION_CLASSES
from lisa_demo.losses import dice_per_mask, sigmoid_bce_per_mask
from lisa_demo.model import LisaModel, seg_query_mask
from lisa_demo.train.pretrain import PretrainOptions
from lisa_demo.train.pretrain.objectives import (
    PretrainingModel,
    attach,
    click_prompts,
    target_loss,
)
from lisa_demo.train.pretrain.targets import interior_point

QUESTION = "Can you segment the red square in this image?"


def _targets(shape: tuple[int, int], n: int, seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.random((n, *shape)) > 0.5).float()]


def _recipe_model(loaded, weights: LossWeights | None = None, **options) -> PretrainingModel:
    """The tiny model's LLaVA and SAM (shared, not changed) with a fresh projection, the
    recipe's heads attached, inside the module the loop trains."""
    base = loaded.model
    lisa = LisaModel(base.llava, base.sam, base.seg_token_id, hidden_size=256,
                     loss_weights=weights)  # fmt: skip
    chosen = PretrainOptions(**options)
    attach(lisa, chosen)
    return PretrainingModel(lisa, chosen)


class _Training:
    """Train mode for a wrapper around the shared tiny model; eval again afterwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> torch.nn.Module:
        self.model.train()
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.eval()


def _lisa_total(out, weights: LossWeights) -> torch.Tensor:
    return weights.ce * out.ce_loss + weights.bce * out.bce_loss + weights.dice * out.dice_loss


# Seg words ------------------------------------------------------------------------------------
def test_seg_word_loss_matches_a_hand_computation_and_only_counts_explained_masks(
    tiny_loaded, make_inputs, scene_image
):
    """Each mask query state predicts the answer tokens after its [SEG]: the mean of
    -log softmax(head(state)) over that bag. A bag of under three tokens (no explanation) is
    skipped, so the first [SEG] here does not count."""
    torch.manual_seed(0)
    weights = LossWeights(ce=1.0, bce=2.0, dice=0.5)
    model = _recipe_model(tiny_loaded, weights, seg_words=3.0)
    head = model.lisa.seg_word_head
    answer = "Sure, [SEG] and [SEG]. It is the red square."
    inputs = make_inputs(tiny_loaded, scene_image, QUESTION, answer)
    gt = _targets(scene_image.shape[:2], 2)
    with _Training(model), torch.no_grad():
        out = model(**inputs, gt_masks=gt)
        states = model.lisa.llava(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            output_hidden_states=True,
        ).hidden_states[-1][0]
    ids, labels = inputs["input_ids"][0], inputs["labels"][0]
    second_seg = int((ids == tiny_loaded.seg_token_id).nonzero()[1])
    bag = labels[second_seg + 1 :]
    bag = bag[bag != -100]
    assert len(bag) >= 6  # ". It is the red square." and the end token
    query_states = states[seg_query_mask(inputs["input_ids"], tiny_loaded.seg_token_id)[0]]
    torch.testing.assert_close(out.seg_states, query_states)
    with torch.no_grad():
        expected = -torch.log_softmax(head(query_states[1]), dim=-1)[bag].mean()
    assert out.seg_word_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    total = _lisa_total(out, weights) + 3.0 * out.seg_word_loss
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-6)

    # No explanation: nothing to predict, the total is LISA's. In eval mode: never computed.
    plain = make_inputs(tiny_loaded, scene_image, QUESTION, "Sure, [SEG].")
    with _Training(model), torch.no_grad():
        out = model(**plain, gt_masks=_targets(scene_image.shape[:2], 1))
    assert out.seg_word_loss is None
    assert out.loss.item() == pytest.approx(_lisa_total(out, weights).item(), rel=1e-6)
    with torch.no_grad():
        assert model(**inputs, gt_masks=gt).seg_word_loss is None


def test_heads_are_attached_only_when_weighted_and_weights_are_validated():
    from lisa_demo.loading import load_lisa

    plain = load_lisa(preset("tiny-random"), device="cpu").model
    assert not any(hasattr(plain, n) for n in ("seg_word_head", "target_head"))
    recipe = PretrainOptions(seg_words=1.0, target=1.0)
    model = load_lisa(preset("tiny-random"), device="cpu", for_training=True,
                      attach=lambda m: attach(m, recipe)).model  # fmt: skip
    names = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert {"seg_word_head", "target_head", "description_prompts"} <= names
    assert model.seg_word_head.out_features == model.llava.get_input_embeddings().num_embeddings
    for name in ("seg_words", "point", "prompt", "target", "pointing"):
        with pytest.raises(ConfigError, match=name):
            PretrainOptions(**{name: -0.5})
    with pytest.raises(ConfigError, match="seg_words"):
        PretrainOptions(seg_words=float("nan"))


# Clicks ---------------------------------------------------------------------------------------
def test_interior_point_is_the_pixel_deepest_inside_the_target():
    mask = np.zeros((7, 9), dtype=np.uint8)
    mask[1:6, 2:7] = 1  # a 5x5 square: its centre (4, 3) is farthest from the outline
    mask[0, 0] = 255  # ignore pixels are not target
    assert interior_point(mask) == (4.0, 3.0)
    assert interior_point(np.zeros((4, 6), dtype=np.uint8)) == (2.5, 1.5)


def test_click_prompt_is_sams_own_embedding_of_a_positive_click(tiny_loaded):
    model = tiny_loaded.model
    points = torch.tensor([[10.0, 20.0], [200.0, 31.5]])
    with torch.no_grad():
        ours = click_prompts(model, points)
        sparse, _ = model.sam.prompt_encoder(
            points.view(1, 2, 1, 2), torch.ones(1, 2, 1), None, None
        )
    # SAM appends a "not a point" padding token to point-only prompts; ours is the click alone.
    assert sparse.shape == (1, 2, 2, ours.shape[1])
    assert torch.allclose(ours, sparse[0, :, 0], atol=1e-6)


def test_click_losses_add_a_click_mask_loss_and_a_prompt_pull(
    tiny_loaded, make_inputs, scene_image
):
    model = _recipe_model(tiny_loaded, point=0.5, prompt=2.0)
    lisa = model.lisa
    inputs = make_inputs(tiny_loaded, scene_image, QUESTION, "Sure, [SEG].")
    gt = _targets(scene_image.shape[:2], 1)
    clicks = [torch.tensor([[12.0, 20.0]])]
    with _Training(model), torch.no_grad():
        plain = model(**inputs, gt_masks=gt)
        out = model(**inputs, gt_masks=gt, click_points=clicks)
        click = click_prompts(lisa, clicks[0])
        embeddings = lisa.encode_images(inputs["sam_pixel_values"])
        logits, _ = lisa.decode_masks(
            [click], embeddings, inputs["input_sizes"], inputs["original_sizes"]
        )
    point = 2.0 * sigmoid_bce_per_mask(logits[0], gt[0]) + 0.5 * dice_per_mask(logits[0], gt[0])
    prompt = torch.nn.functional.mse_loss(out.prompts[0], click)
    assert out.point_loss.item() == pytest.approx(point.mean().item(), rel=1e-5)
    assert out.prompt_loss.item() == pytest.approx(prompt.item(), rel=1e-5)
    expected = plain.loss + 0.5 * out.point_loss + 2.0 * out.prompt_loss
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert plain.point_loss is None and plain.prompt_loss is None


# Target loss ----------------------------------------------------------------------------------
def test_target_loss_is_four_cross_entropies_plus_the_pull_to_the_description(tiny_loaded):
    """With a zero head every class is equally likely: CE = sum of log(class count). The pull
    is the MSE between the given prompts and the description prompts (kind + colour + size +
    region rows of the tables); rows marked -1 do not count."""
    model = _recipe_model(tiny_loaded, target=1.0).lisa
    torch.nn.init.zeros_(model.target_head.weight)
    torch.nn.init.zeros_(model.target_head.bias)
    states = torch.randn(3, 256)
    prompts = torch.randn(3, 128)
    classes = [torch.tensor([[1, 2, 0, 4]]), torch.tensor([[-1, -1, -1, -1]]),
               torch.tensor([[3, 0, 2, 8]])]  # fmt: skip
    loss = target_loss(model, states, prompts, classes)
    tables = [t.weight.detach() for t in model.description_prompts.tables]
    d0 = tables[0][1] + tables[1][2] + tables[2][0] + tables[3][4]
    d2 = tables[0][3] + tables[1][0] + tables[2][2] + tables[3][8]
    mse = (((prompts[0] - d0) ** 2).sum() + ((prompts[2] - d2) ** 2).sum()) / (2 * 128)
    expected = sum(math.log(n) for n in DESCRIPTION_CLASSES) + mse
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert target_loss(model, states[:1], prompts[:1], classes[1:2]) is None


# Pointing loss --------------------------------------------------------------------------------
def test_pointing_loss_is_the_cross_entropy_of_the_real_last_layer_attention(
    tiny_loaded, make_inputs
):
    """Head 0 of the last layer, at each [SEG] query position, against the target's share of
    each CLIP patch. The reference is the attention transformers itself returns (eager), on
    a batch of two answers of different lengths (right padding). The 48x64 image splits into
    an 8x8 grid of 6x8 px cells: mask A fills cells (0,0), (0,1), (1,0), (1,1) (a quarter
    each); mask B fills cell (0,0) and half of (0,1) (shares 2/3 and 1/3)."""
    from lisa_demo.inputs import collate_text
    from tests.conftest import draw_scene

    model = _recipe_model(tiny_loaded, pointing=1.0)
    image = draw_scene()
    one = make_inputs(tiny_loaded, image, "Where is the red square?", "[SEG].")
    two = make_inputs(tiny_loaded, image, "Where is the blue disc?", "Sure, it is [SEG].")
    ids = [one["input_ids"][0].tolist(), two["input_ids"][0].tolist()]
    labels = [one["labels"][0].tolist(), two["labels"][0].tolist()]
    batch = collate_text(ids, labels, tiny_loaded.tokenizer.pad_token_id)
    mask_a = torch.zeros(1, 48, 64)
    mask_a[:, 0:12, 0:16] = 1
    mask_b = torch.zeros(1, 48, 64)
    mask_b[:, 0:6, 0:12] = 1
    inputs = {**batch, "pixel_values": torch.cat([one["pixel_values"], two["pixel_values"]]),
              "sam_pixel_values": torch.cat([one["sam_pixel_values"], two["sam_pixel_values"]]),
              "input_sizes": one["input_sizes"] * 2, "original_sizes": one["original_sizes"] * 2,
              "gt_masks": [mask_a, mask_b]}  # fmt: skip
    llava = tiny_loaded.model.llava
    try:
        with _Training(model), torch.no_grad():
            loss = model(**inputs).pointing_loss
        with torch.no_grad():
            assert model(**inputs).pointing_loss is None  # training only
            llava.set_attn_implementation("eager")
            attentions = llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               pixel_values=inputs["pixel_values"], output_attentions=True,
                               return_dict=True).attentions[-1]  # fmt: skip
    finally:
        llava.set_attn_implementation("sdpa")
    image_id = llava.config.image_token_id
    query = seg_query_mask(batch["input_ids"], tiny_loaded.seg_token_id)
    shares = [{0: 0.25, 1: 0.25, 8: 0.25, 9: 0.25}, {0: 2 / 3, 1: 1 / 3}]
    terms = []
    for row, share in enumerate(shares):
        t = int(query[row].nonzero()[0])
        images = (batch["input_ids"][row] == image_id).nonzero().flatten()
        attention = attentions[row, 0, t, images]
        terms.append(-sum(w * math.log(float(attention[cell])) for cell, w in share.items()))
    assert loss.item() == pytest.approx(sum(terms) / 2, rel=1e-4)
