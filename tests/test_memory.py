"""The memory estimator: its arithmetic on a hand-worked configuration, card choice, and the
parameter counts it reads from the real architectures."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from dataclasses import replace

import pytest

from lisa_demo.config import ConfigError, preset
from lisa_demo.memory import (
    GIB,
    ArchitectureCounts,
    count_parameters,
    estimate_from_counts,
    estimate_memory,
    smallest_card,
)

# A small, fake model whose every byte is worked out by hand below.
FAKE = ArchitectureCounts(
    quantizable=1000, quantizable_rows=10, largest_quantizable=192, llava_other=200,
    sam_frozen=100, sam_decoder=30, projection=20, lora=40, projector=0, seg_rows=10,
    lora_inputs_per_layer=16, hidden=8, intermediate=24, layers=2, kv_dim=8, vocab=50,
    image_tokens=4, sam_width=4, sam_heads=2, sam_grid=4, sam_image_size=16,
    sam_embedding_channels=4, decoder_width=4, vision_feature_dim=8,
)  # fmt: skip
NO_SAVINGS = dict(lean_token_rows=False, vision_quantization="none", offload_sam_encoder=False)
SETTING = dict(
    quantization="4bit", precision="bf16", batch_size=1, seq_len=10, gradient_checkpointing=False,
    optimizer="adamw", new_tokens=2, masks_per_sample=1, cache_images=1, prefix_caches=1,
    answer_tokens=3,
)  # fmt: skip


def _estimate(**changes):
    return estimate_from_counts(FAKE, {}, **{**SETTING, **changes})


def test_training_arithmetic_by_hand():
    plan = _estimate().training
    resident = plan.as_dict()["resident"]
    # Weights: 1000 NF4 weights x 4.126953125 bits / 8 = 515.87 -> 516 bytes; bf16 elsewhere.
    assert resident["language-model linears"] == 516
    assert resident["vision, projector, embeddings, lm_head"] == 200 * 2
    assert resident["SAM image + prompt encoder"] == 100 * 2
    # Trainable: LoRA 40 + [SEG] rows 10 + projection 20 + decoder 30 = 100 parameters.
    assert resident["trainable weights (fp32)"] == 100 * 4
    assert resident["gradients (fp32)"] == 100 * 4
    assert resident["optimizer state"] == 100 * 8  # AdamW: two fp32 moments
    step = plan.as_dict()["transients"]["step activations"]
    # Per token and layer: norms 2*4*8 = 64, LoRA 3*16 = 48, attention 2*(2*8 + 2*8) = 64,
    # MLP 3*2*24 = 144 -> 320 bytes; 10 tokens, 2 layers -> 6400.
    assert step["LM layer activations"] == 6400
    assert step["layer outputs (hidden states)"] == (2 + 1) * 10 * 8 * 2  # 480
    assert step["logits + fp32 loss copies"] == 3 * 50 * 10  # 1500: answer positions only
    assert step["merged lm_head copy"] == 50 * 8 * 2  # 800
    assert step["full gradient of that copy"] == 50 * 8 * 2  # 800, made in backward
    # SAM decoder: 24 * 4 channels * 4^2 cells * 2 bytes = 3072, + 8 fp32 maps of 16^2 = 8192.
    assert step["SAM decoder + mask losses"] == 3072 + 8192
    assert step["dequantized weight"] == 192 * 2  # the largest 4-bit layer, in bf16
    assert step["autocast copies of trainable weights"] == 100 * 2
    encoder = plan.as_dict()["transients"]["SAM image encoder"]
    assert encoder == {"global-attention bias": 2 * 16 * 16 * 2, "encoder tensors": 8 * 16 * 4 * 2}
    # Step: 480 + 6400 + 1500 + 800 + 800 + 11264 + 384 + 200 = 21828, more than the
    # encoder's 2048. Resident: 516 + 400 + 200 + 400 + 400 + 800 = 2716.
    assert plan.largest_transient == ("step activations", 21828)
    assert plan.allocated == 2716 + 21828
    assert plan.overhead == GIB // 2 + round(0.1 * 24544)
    assert plan.total == 24544 + GIB // 2 + 2454
    assert plan.card == "8 GB"


def test_checkpointing_and_paged_optimizer_arithmetic():
    checkpointed = _estimate(gradient_checkpointing=True).training
    step = checkpointed.as_dict()["transients"]["step activations"]
    assert step["one layer recomputed in backward"] == 10 * 320  # instead of 2 layers' 6400
    assert checkpointed.allocated == 24544 - 3200
    paged = _estimate(optimizer="paged_adamw_8bit").training
    assert paged.as_dict()["resident"]["optimizer state"] == 100 * 2
    assert paged.allocated == 24544 - 600
    # Batch 2: per-token and per-mask terms double; the weight copies and the lm_head copy's
    # gradient (800 + 800 + 384 + 200) do not.
    batch2 = _estimate(batch_size=2).training
    assert batch2.allocated == 2716 + 2 * (21828 - 2184) + 2184


def test_heads_only_training_has_no_language_model_backward():
    plan = estimate_from_counts(
        replace(FAKE, lora=0, seg_rows=0, lora_inputs_per_layer=0), {}, **SETTING
    ).training
    step = plan.as_dict()["transients"]["step activations"]
    assert step["LM layer activations"] == 0
    assert step["merged lm_head copy"] == step["full gradient of that copy"] == 0
    assert plan.as_dict()["resident"]["trainable weights (fp32)"] == 50 * 4
    assert step["autocast copies of trainable weights"] == 50 * 2


def test_inference_arithmetic_by_hand():
    plan = _estimate().inference
    resident = plan.as_dict()["resident"]
    assert resident["projection + mask decoder"] == (20 + 30) * 2
    assert resident["LoRA + [SEG] rows"] == (40 + 10) * 4
    assert resident["image cache"] == 1 * (4 * 16 + 4 * 8) * 2  # SAM embedding + features
    # One image's prompt prefix: 4 image tokens + BOS and "USER: " (4) = 8 positions, K and V.
    assert resident["prompt-prefix KV caches"] == 1 * 2 * 2 * 8 * 8 * 2  # 512
    generation = plan.as_dict()["transients"]["generation"]
    positions = 10 + 2
    assert generation["KV cache"] == 2 * 2 * positions * 8 * 2  # 768
    assert generation["hidden states kept by generate"] == 3 * positions * 8 * 2  # 576
    assert generation["prefill MLP transient"] == 3 * 10 * 24 * 2  # 1440
    assert generation["dequantized weight"] == 192 * 2
    assert plan.largest_transient == ("generation", 768 + 576 + 1440 + 384 + 800)
    assert plan.allocated == 516 + 400 + 200 + 100 + 200 + 192 + 512 + 3968


def test_8bit_and_unquantized_linears_and_fp32_compute():
    fp32 = _estimate(quantization="none", precision="fp32").training.as_dict()
    assert fp32["resident"]["language-model linears"] == 1000 * 4
    assert fp32["transients"]["step activations"]["dequantized weight"] == 0
    assert fp32["transients"]["step activations"]["autocast copies of trainable weights"] == 0
    assert _estimate(quantization="8bit").training.as_dict()["resident"][
        "language-model linears"
    ] == 1000 + 4 * 10  # fmt: skip
    assert _estimate(quantization="none").training.as_dict()["resident"][
        "language-model linears"
    ] == 1000 * 2  # fmt: skip


@pytest.mark.parametrize(
    ("gib", "card"),
    [(1, "8 GB"), (8, "8 GB"), (8.001, "12 GB"), (16, "16 GB"), (23.9, "24 GB"),
     (24.01, "more than 24 GB")],
)  # fmt: skip
def test_smallest_card(gib, card):
    assert smallest_card(round(gib * GIB)) == card


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="optimizer"):
        _estimate(optimizer="sgd")
    with pytest.raises(ConfigError, match="train-all"):
        estimate_memory(preset("tiny-random").replace(train_all=True))


def test_a_model_folder_without_config_json_is_a_config_error(tmp_path):
    empty = tmp_path / "llava"
    empty.mkdir()
    cfg = preset("llava-1.5-7b").replace(llava=str(empty))
    with pytest.raises(ConfigError, match="without config.json"):
        count_parameters(cfg)


# Counts from the real architectures (meta device) ----------------------------------------------
def test_llava_1_5_7b_counts_come_from_the_architecture():
    counts = count_parameters(preset("llava-1.5-7b"), "base")
    layers, h, inter = 32, 4096, 11008
    assert counts.quantizable == layers * (4 * h * h + 3 * h * inter)  # q k v o + gate up down
    assert counts.lora == layers * 2 * 8 * (h + h)  # r = 8 on q_proj and v_proj
    assert counts.projection == h * h + h + h * 256 + 256
    assert counts.seg_rows == 2 * h
    assert counts.image_tokens == 576 and counts.sam_grid == 64
    assert 93.6e6 < counts.sam_frozen + counts.sam_decoder < 93.9e6  # SAM ViT-B
    assert count_parameters(preset("llava-1.5-7b").replace(lora_r=16), "base").lora == (
        2 * counts.lora
    )
    # --train-projector: CLIP-L's 1024-wide features -> 4096 -> 4096, two Linear layers
    assert counts.projector == 0
    projector = count_parameters(preset("llava-1.5-7b").replace(train_projector=True), "base")
    assert projector.projector == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert projector.trainable - counts.trainable == projector.projector


def test_7b_qlora_estimate_orders_its_options():
    cfg = preset("llava-1.5-7b")
    base = estimate_memory(cfg, batch_size=1, gradient_checkpointing=True, sam_variant="base")
    assert base.setting["seq_len"] == 576 + 64
    no_gc = estimate_memory(cfg, batch_size=1, gradient_checkpointing=False, sam_variant="base")
    huge = estimate_memory(cfg, batch_size=1, gradient_checkpointing=True, sam_variant="huge")
    paged = estimate_memory(cfg, gradient_checkpointing=True, optimizer="paged_adamw_8bit")
    assert paged.training.allocated < base.training.allocated < huge.training.allocated
    assert base.training.allocated < no_gc.training.allocated
    # The pipeline keeps 2 prompt prefixes (576 image tokens + 4) by default; without them
    # inference needs less than a training step.
    no_prefix = estimate_memory(
        cfg, batch_size=1, gradient_checkpointing=True, sam_variant="base", prefix_caches=0
    )
    assert base.inference.allocated - no_prefix.inference.allocated == 2 * 2 * 32 * 580 * 4096 * 2
    plain = cfg.replace(**NO_SAVINGS)
    plain_step = estimate_memory(plain, gradient_checkpointing=True, sam_variant="base").training
    assert no_prefix.inference.allocated < plain_step.allocated
    table = base.as_table()
    assert "allocated peak" in table and "fits:" in table


def test_estimate_memory_cli_prints_json():
    from lisa_demo.bench import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["--estimate-memory", "--preset", "llava-1.5-7b", "--quantization", "4bit",
                     "--lora-r", "8", "--batch-size", "1", "--gradient-checkpointing",
                     "--sam", "huge", "--seq-len", "700", "--json"])  # fmt: skip
    assert code == 0
    result = json.loads(out.getvalue())
    assert result["setting"]["seq_len"] == 700 and result["setting"]["sam"] == "huge"
    assert result["training"]["card"] in ("8 GB", "12 GB")
    assert result["training"]["allocated_bytes"] < result["training"]["total_bytes"]


# The memory savings (lisa_demo.memory_savings) -------------------------------------------------
def test_each_saving_by_hand():
    counts = replace(FAKE, vision_linear=64, vision_linear_rows=8, sam_encoder=90)
    base = estimate_from_counts(counts, {}, **SETTING)
    plan = base.training.as_dict()
    assert plan["resident"]["vision, projector, embeddings, lm_head"] == 200 * 2
    assert "CLIP tower linears" not in plan["resident"]
    # Lean [SEG] rows: no merged copy and no full gradient of it (800 + 800), in training and
    # in inference (the copy only).
    lean = estimate_from_counts(counts, {}, **SETTING, lean_token_rows=True)
    assert base.training.allocated - lean.training.allocated == 1600
    assert base.inference.allocated - lean.inference.allocated == 800
    # CLIP's 64 Linear weights (8 rows) in 8-bit: 64 bytes + an fp32 scale per row, instead
    # of 64 x 2 bytes; in 4-bit: 64 x 4.127 / 8 = 33.02 -> 33 bytes.
    for kind, size in (("8bit", 64 + 4 * 8), ("4bit", 33)):
        quantized = estimate_from_counts(counts, {}, **SETTING, vision_quantization=kind)
        resident = quantized.training.as_dict()["resident"]
        assert resident["vision, projector, embeddings, lm_head"] == (200 - 64) * 2
        assert resident["CLIP tower linears"] == size
        for path in ("training", "inference"):
            saved = getattr(base, path).allocated - getattr(quantized, path).allocated
            assert saved == 64 * 2 - size
    # SAM's encoder (90 of the 100 frozen SAM parameters) off the GPU: the prompt encoder stays
    # (10 x 2 bytes); encoding every image first (encoder 180 bytes + its transient 2048) comes
    # before gradients and optimizer state exist (400 + 800, now part of the step group).
    offloaded = estimate_from_counts(counts, {}, **SETTING, offload_sam_encoder=True).training
    plan = offloaded.as_dict()
    assert plan["resident"]["SAM prompt encoder"] == 10 * 2
    assert "gradients (fp32)" in plan["transients"]["step (encoder offloaded)"]
    assert sum(plan["transients"]["encoding every image first"].values()) == 180 + 2048
    assert offloaded.largest_transient == ("step (encoder offloaded)", 21828 + 1200)
    assert base.training.allocated - offloaded.allocated == 180
    # The encoding phase wins when the step is small: then it alone sets the peak.
    small = replace(counts, sam_encoder=90, sam_grid=16)  # a 4x larger grid: 16^4 bias entries
    phase = estimate_from_counts(small, {}, **SETTING, offload_sam_encoder=True).training
    assert phase.largest_transient[0] == "encoding every image first"
    inference = estimate_from_counts(counts, {}, **SETTING, offload_sam_encoder=True).inference
    assert inference.allocated == base.inference.allocated  # inference keeps the encoder


def test_llava_7b_qlora_step_is_under_5_gib_with_the_savings():
    """The preset's savings against the step without them, each by independent arithmetic:
    lm_head 32064 x 4096 bf16 twice; CLIP-L's 24 x (4 x 1024^2 + 2 x 1024 x 4096) Linear
    weights from 2 bytes to 1 + 4 / row (24 x 9216 rows); SAM ViT-B's image encoder."""
    cfg = preset("llava-1.5-7b")
    assert (cfg.lean_token_rows, cfg.vision_quantization, cfg.offload_sam_encoder) == (
        True, "8bit", True
    )  # fmt: skip
    kwargs = dict(batch_size=1, gradient_checkpointing=True, sam_variant="base")
    plain = cfg.replace(**NO_SAVINGS)
    before = estimate_memory(plain, **kwargs).training.allocated
    after = estimate_memory(cfg, **kwargs).training.allocated
    assert after <= 5.0 * GIB < before
    counts = count_parameters(cfg, "base")
    clip = 24 * (4 * 1024**2 + 2 * 1024 * 4096)
    assert (counts.vision_linear, counts.vision_linear_rows) == (clip, 24 * 9216)
    assert 89.6e6 < counts.sam_encoder < 89.7e6  # SAM ViT-B's image encoder: 89.67 M
    lean = 2 * 32064 * 4096 * 2
    eight_bit = clip * 2 - (clip + 4 * 24 * 9216)
    assert before - after == lean + eight_bit + counts.sam_encoder * 2
    for name, change, saved in (
        ("lean", {"lean_token_rows": True}, lean),
        ("8-bit CLIP", {"vision_quantization": "8bit"}, eight_bit),
        ("offload", {"offload_sam_encoder": True}, counts.sam_encoder * 2),
    ):
        one = estimate_memory(plain.replace(**change), **kwargs).training.allocated
        assert before - one == saved, name
    four_bit = estimate_memory(cfg.replace(vision_quantization="4bit"), **kwargs).training
    assert four_bit.allocated < after


@pytest.mark.parametrize(
    "name", ["lisa-7b-v1", "lisa-7b-v1-explanatory", "lisa-13b-llama2-v1",
             "lisa-13b-llama2-v1-explanatory", "llava-1.5-7b", "llava-1.5-7b-sam-huge"],
)  # fmt: skip
def test_the_estimator_knows_every_full_size_preset(name):
    estimate = estimate_memory(preset(name))
    counts = estimate.counts
    lisa = name.startswith("lisa")
    assert counts.image_tokens == (256 if lisa else 576)
    assert counts.sam_width == (1280 if lisa or "huge" in name else 768)
    assert estimate.setting["seq_len"] == counts.image_tokens + (128 if lisa else 64)
    assert 0 < estimate.training.allocated and 0 < estimate.inference.allocated
    assert counts.hidden == (5120 if "13b" in name else 4096)


def test_lisa_13b_needs_more_than_lisa_7b():
    seven, thirteen = estimate_memory(preset("lisa-7b-v1")), estimate_memory(
        preset("lisa-13b-llama2-v1")
    )  # fmt: skip
    assert seven.training.allocated < thirteen.training.allocated
    assert seven.inference.allocated < thirteen.inference.allocated
    # LLaMA-2 13B's 40 x (4 x 5120^2 + 3 x 5120 x 13824) Linear weights in NF4
    assert thirteen.counts.quantizable == 40 * (4 * 5120**2 + 3 * 5120 * 13824)
