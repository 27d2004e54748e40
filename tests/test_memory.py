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
    # SAM decoder: 24 * 4 channels * 4^2 cells * 2 bytes = 3072, + 8 fp32 maps of 16^2 = 8192.
    assert step["SAM decoder + mask losses"] == 3072 + 8192
    assert step["dequantized weight"] == 192 * 2  # the largest 4-bit layer, in bf16
    assert step["autocast copies of trainable weights"] == 100 * 2
    encoder = plan.as_dict()["transients"]["SAM image encoder"]
    assert encoder == {"global-attention bias": 2 * 16 * 16 * 2, "encoder tensors": 8 * 16 * 4 * 2}
    # Step: 480 + 6400 + 1500 + 800 + 11264 + 384 + 200 = 21028, more than the encoder's 2048.
    # Resident: 516 + 400 + 200 + 400 + 400 + 800 = 2716.
    assert plan.largest_transient == ("step activations", 21028)
    assert plan.allocated == 2716 + 21028
    assert plan.overhead == GIB // 2 + round(0.1 * 23744)
    assert plan.total == 23744 + GIB // 2 + 2374
    assert plan.card == "8 GB"


def test_checkpointing_and_paged_optimizer_arithmetic():
    checkpointed = _estimate(gradient_checkpointing=True).training
    step = checkpointed.as_dict()["transients"]["step activations"]
    assert step["one layer recomputed in backward"] == 10 * 320  # instead of 2 layers' 6400
    assert checkpointed.allocated == 23744 - 3200
    paged = _estimate(optimizer="paged_adamw_8bit").training
    assert paged.as_dict()["resident"]["optimizer state"] == 100 * 2
    assert paged.allocated == 23744 - 600
    # Batch 2: per-token and per-mask terms double; the weight copies (800 + 384 + 200) do not.
    batch2 = _estimate(batch_size=2).training
    assert batch2.allocated == 2716 + 2 * (21028 - 1384) + 1384


def test_heads_only_training_has_no_language_model_backward():
    plan = estimate_from_counts(
        replace(FAKE, lora=0, seg_rows=0, lora_inputs_per_layer=0), {}, **SETTING
    ).training
    step = plan.as_dict()["transients"]["step activations"]
    assert step["LM layer activations"] == 0
    assert step["merged lm_head copy"] == 0
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
    assert no_prefix.inference.allocated < base.training.allocated
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
