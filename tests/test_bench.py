"""The benchmark's claims, checked for equality (never for speed): cached paths give the same
results as uncached ones, and the harness and the random-weight 7B model are wired right."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from lisa_demo import bench
from lisa_demo.config import IMAGE_TOKEN, ConfigError, preset
from lisa_demo.infer.pipeline import LisaPipeline
from lisa_demo.inputs import image_token_count

QUESTION = "Can you segment the red square in this image?"


# Inference: the image cache and the KV cache change nothing but time -----------------------
def test_cached_and_uncached_inference_give_identical_answers_and_masks(
    tiny_loaded, force_answer, scene_image
):
    cached = LisaPipeline(tiny_loaded, cache_size=4)
    uncached = LisaPipeline(tiny_loaded, cache_size=0)
    natural = [
        cached.segment(scene_image, QUESTION),  # miss: encodes and stores
        cached.segment(scene_image, QUESTION),  # hit
        uncached.segment(scene_image, QUESTION),  # never stored
    ]
    assert [r.cache_hit for r in natural] == [False, True, False]
    assert natural[0].answer == natural[1].answer == natural[2].answer

    force_answer(tiny_loaded, "Sure, [SEG] and [SEG].")
    forced = [
        uncached.segment(scene_image, QUESTION, keep_logits=True),
        cached.segment(scene_image, QUESTION, keep_logits=True),
    ]
    assert forced[1].cache_hit and not forced[0].cache_hit
    assert forced[0].answer == forced[1].answer
    assert len(forced[0].masks) == len(forced[1].masks) == 2
    for a, b in zip(forced[0].masks, forced[1].masks, strict=True):
        assert np.array_equal(a.mask, b.mask)
        assert np.array_equal(a.logits, b.logits)
        assert a.score == b.score


def test_kv_cache_and_no_cache_generate_the_same_tokens(tiny_loaded):
    result = bench.measure_generation(tiny_loaded, repeats=1, new_tokens=8)
    assert result["new_tokens"] == 8
    assert result["same_tokens"] is True


def test_forced_answer_writes_the_script_then_eos(tiny_loaded, scene_image):
    pipeline = LisaPipeline(tiny_loaded, cache_size=0)
    ids = tiny_loaded.tokenizer(" " + bench.FORCED_ANSWER, add_special_tokens=False).input_ids
    from transformers import LogitsProcessorList

    processor = bench.ForcedAnswer(ids, tiny_loaded.tokenizer.eos_token_id)
    pipeline.logits_processor = LogitsProcessorList([processor])
    result = pipeline.segment(scene_image, QUESTION)
    assert result.answer == bench.FORCED_ANSWER
    assert len(result.masks) == 1


# Training: cached SAM embeddings give the recomputed loss --------------------------------------
def test_training_loss_with_cached_embeddings_equals_recomputed(tmp_path):
    from lisa_demo.loading import load_lisa
    from lisa_demo.train.data import EmbeddingCache, training_targets

    loaded = load_lisa(
        preset("tiny-random").replace(use_lora=True), device="cpu", for_training=True
    )
    model = loaded.model.eval()  # no dropout: the two passes must see the same function
    batch = bench.training_batches(loaded, tmp_path / "data", batch_size=2, count=1)[0]
    common = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "labels": batch["labels"],
        "pixel_values": batch["pixel_values"],
        "input_sizes": batch["input_sizes"],
        "original_sizes": batch["original_sizes"],
        "gt_masks": training_targets(batch["masks"]),
    }
    cache = EmbeddingCache("test", disk_dir=tmp_path / "cache")
    cache.embeddings(batch, model.encode_images, torch.device("cpu"))  # fills (and writes)
    reread = EmbeddingCache("test", disk_dir=tmp_path / "cache")  # read back from disk
    embeddings = reread.embeddings(batch, model.encode_images, torch.device("cpu"))
    assert (reread.hits, reread.misses) == (2, 0)

    recomputed = model(**common, sam_pixel_values=batch["sam_pixel_values"])
    from_cache = model(**common, image_embeddings=embeddings)
    recomputed.loss.backward()
    from_cache.loss.backward()  # gradients flow the same way with cached embeddings
    for name in ("loss", "ce_loss", "bce_loss", "dice_loss"):
        torch.testing.assert_close(getattr(from_cache, name), getattr(recomputed, name))


def test_training_with_cached_vision_features_gives_the_recomputed_loss_and_gradients(tmp_path):
    """Both caches through training_inputs (what the loop and the benchmark call): LLaVA's
    vision features replace the CLIP pixels, and the loss and every LoRA / head gradient are
    those of the pass that runs both encoders."""
    from lisa_demo.loading import load_lisa
    from lisa_demo.train.data import EmbeddingCache, training_inputs

    loaded = load_lisa(
        preset("tiny-random").replace(use_lora=True), device="cpu", for_training=True
    )
    model = loaded.model.eval()
    batch = bench.training_batches(loaded, tmp_path / "data", batch_size=2, count=1)[0]
    cpu = torch.device("cpu")
    sam_cache, feature_cache = EmbeddingCache("t"), EmbeddingCache("t/vision")

    def loss_and_grads(*caches):
        inputs = training_inputs(batch, cpu, caches[0], model.encode_images, caches[1],
                                 model.encode_image_features)  # fmt: skip
        model.zero_grad(set_to_none=True)
        out = model(**inputs)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return inputs, out.loss.detach(), grads

    plain_inputs, plain_loss, plain_grads = loss_and_grads(None, None)
    assert plain_inputs["pixel_values"] is not None and "image_features" not in plain_inputs
    loss_and_grads(sam_cache, feature_cache)  # fills both caches
    cached_inputs, cached_loss, cached_grads = loss_and_grads(sam_cache, feature_cache)
    assert cached_inputs["pixel_values"] is None
    assert cached_inputs["image_features"].shape[:2] == (2, image_token_count(loaded.processor))
    assert (feature_cache.hits, feature_cache.misses) == (2, 2)
    torch.testing.assert_close(cached_loss, plain_loss)
    assert plain_grads.keys() == cached_grads.keys() and any("lora" in n for n in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, msg=name)


# The harness -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_json() -> dict:
    """The bench's JSON for gpu_check's first CPU run (the tiny random model in 4-bit with the
    memory savings, LoRA, checkpointing, batch 1), fewer repeats and shorter answers."""
    from lisa_demo.gpu_check import CPU_RUNS

    args = [*CPU_RUNS["tiny-random-4bit"], "--device", "cpu", "--json", "--repeats", "1",
            "--train-steps", "1", "--answer-tokens", "8"]  # fmt: skip
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            code = bench.main(args)
    finally:
        torch.set_flush_denormal(False)  # the run's --flush-denormal must not outlive it
    assert code == 0
    return json.loads(out.getvalue())


def test_bench_json_on_tiny_random_returns_every_figure(bench_json):
    from lisa_demo.gpu_check import missing_fields

    result = bench_json
    assert {"model", "device", "machine", "repeats", "inference", "generation", "lisa_way",
            "training", "memory", "notes", "targets", "elapsed_s"} <= set(result)  # fmt: skip
    assert missing_fields(result) == []
    assert result["model"]["quantization"] == "4bit" and result["model"]["lean_token_rows"]
    inference = result["inference"]
    for key in ("first_query_s", "second_query_s"):
        assert set(inference[key]) == {"image_encoding", "generation", "mask_decoding", "total"}
    assert inference["answer"] == bench.FORCED_ANSWER and inference["masks"] == 1
    for key in ("second_over_first", "batch_of_4_s", "four_single_queries_s"):
        assert inference[key] > 0
    assert result["generation"]["new_tokens"] == 8
    assert result["generation"]["same_tokens"] is True
    training = result["training"]
    assert training["cached_samples_per_s"] > 0 and training["uncached_samples_per_s"] > 0
    assert training["losses_finite"] is True and training["cache_hits"] > 0
    assert training["offload_sam_encoder"] and training["vision_quantization"] == "8bit"
    assert training["step_s"] > 0 and training["batch_size"] == 1
    assert result["memory"]["after_training_mib"] > 0
    memory = result["memory"]  # CPU: estimates without measured GPU peaks
    assert memory["inference_peak_mib"] is None and memory["training_estimate_mib"] > 0
    assert set(result["targets"]) == set(bench.TARGETS)
    for name, entry in result["targets"].items():
        assert {"value", "target", "met", "what"} <= set(entry)
        if name in ("qlora_training_peak_gib", "estimator_error"):  # GPU only
            assert entry["value"] is None and entry["met"] is None
        else:
            assert entry["met"] == _meets(entry["value"], *bench.TARGETS[name][:2])
    assert 4.0 < result["targets"]["qlora_training_peak_gib"]["estimated"] < 5.0


def test_lisa_way_answers_as_the_pipeline_does(bench_json):
    """LISA's own way (no KV cache, encoders per question) gives the pipeline's answer: the
    same forced tokens, the same greedy choices, the same mask."""
    way = bench_json["lisa_way"]
    assert way["new_tokens"] == 8
    assert way["answer_tokens_generated"] == {"ours": 8, "lisa_way": 8}
    assert way["lisa_way_over_ours"] == pytest.approx(way["lisa_way_s"] / way["first_question_s"])
    assert way["second_over_first"] == pytest.approx(
        way["second_question_s"] / way["first_question_s"]
    )  # fmt: skip
    parity = way["parity"]
    assert parity["dtype"] == "torch.float32" and parity["steps"] == 8
    # 4-bit on a CPU: bitsandbytes' one-token kernel differs from its many-token one
    assert parity["max_rel_logit_diff"] < 1e-2 and parity["greedy_agreement"] == 1.0
    assert parity["masks"] == [1, 1] and parity["mask_iou"] > 0.99


def test_gpu_check_report_holds_every_field_and_a_summary(bench_json, monkeypatch, tmp_path):
    """gpu_check's report and summary around the bench JSONs (its processes replaced by the
    JSON the same code wrote in this process)."""
    from lisa_demo import gpu_check

    commands = []

    def fake_run(command, timeout):
        commands.append(command)
        return {**bench_json, "wall_s": 1.0}

    monkeypatch.setattr(gpu_check, "run_bench", fake_run)
    code = gpu_check.main(["--cpu", "--out", str(tmp_path), "--repeats", "1"])
    assert code == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and set(report["runs"]) == set(gpu_check.CPU_RUNS)
    assert all(fields == [] for fields in report["missing_fields"].values())
    assert all("--device cpu" in " ".join(c) for c in commands)
    text = (tmp_path / "gpu_check.txt").read_text()
    assert "complete" in text and "LISA's way" in text and "parity" in text
    # A run that lacks a field, or failed, makes the report incomplete.
    broken = dict(bench_json)
    del broken["lisa_way"]
    assert "lisa_way.parity.mask_iou" in gpu_check.missing_fields(broken)
    monkeypatch.setattr(gpu_check, "run_bench", lambda c, t: {"error": "exit status 1"})
    assert gpu_check.main(["--cpu", "--out", str(tmp_path)]) == 1
    assert "FAILED" in (tmp_path / "gpu_check.txt").read_text()


def test_gpu_check_runs_the_real_size_presets_on_a_gpu():
    from lisa_demo.gpu_check import GPU_RUNS

    parser = bench.build_parser()
    for args in GPU_RUNS.values():
        cfg = bench.model_config(parser.parse_args(args), [])
        assert cfg.random_weights and cfg.quantization == "4bit" and cfg.gradient_checkpointing
        assert cfg.lean_token_rows and cfg.offload_sam_encoder
    llava, lisa = (bench.model_config(parser.parse_args(a), []) for a in GPU_RUNS.values())
    assert (llava.architecture, llava.sam) == ("llava-1.5-7b", "facebook/sam-vit-base")
    assert lisa.architecture == "lisa-7b"


def _meets(value: float, op: str, goal: float) -> bool:
    return value <= goal if op == "<=" else value >= goal


def test_default_preset_falls_back_to_tiny_random_when_the_bundle_is_missing(monkeypatch):
    monkeypatch.setattr(bench, "bundled_model_available", lambda: False)
    notes: list[str] = []
    cfg = bench.model_config(bench.build_parser().parse_args([]), notes)
    assert cfg.build_tiny and "tiny-random" in notes[0]


def test_lora_dropout_reaches_the_training_config_and_is_checked():
    parser = bench.build_parser()
    assert bench.model_config(parser.parse_args([]), []).lora_dropout == 0.05
    cfg = bench.model_config(parser.parse_args(["--lora-dropout", "0"]), [])
    assert cfg.lora_dropout == 0.0
    with pytest.raises(ConfigError, match="lora-dropout"):
        bench.model_config(parser.parse_args(["--lora-dropout", "1.5"]), [])


def test_lora_targets_reach_the_training_config_and_are_checked():
    parser = bench.build_parser()
    assert bench.model_config(parser.parse_args([]), []).lora_targets == ("q_proj", "v_proj")
    cfg = bench.model_config(parser.parse_args(["--lora-targets", "q_proj", "down_proj"]), [])
    assert cfg.lora_targets == ("q_proj", "down_proj") and cfg.use_lora
    with pytest.raises(ConfigError, match="q-proj"):
        bench.model_config(parser.parse_args(["--lora-targets", "q-proj"]), [])


def test_random_weights_and_sam_choice_need_a_full_size_preset():
    args = bench.build_parser().parse_args(["--preset", "llava-1.5-7b", "--random-weights",
                                            "--sam", "huge"])  # fmt: skip
    cfg = bench.model_config(args, [])
    assert cfg.random_weights and cfg.sam == "facebook/sam-vit-huge"
    assert bench.main(["--preset", "tiny-random", "--random-weights"]) == 2


# Random weights: the model the GPU benchmark measures ----------------------------------------
def test_random_weight_processors_give_576_image_tokens_and_sam_1024():
    from PIL import Image

    from lisa_demo.inputs import image_token_count
    from lisa_demo.loading import random_weight_processors

    processor, sam_processor = random_weight_processors()
    assert image_token_count(processor) == 576
    image = Image.new("RGB", (500, 375), (120, 30, 30))
    batch = processor(
        text=f"USER: {IMAGE_TOKEN}\nWhat? ASSISTANT:", images=image, return_tensors="pt"
    )
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (np.asarray(batch["input_ids"]) == image_id).sum() == 576
    assert tuple(batch["pixel_values"].shape[-2:]) == (336, 336)
    sam = sam_processor(images=image, return_tensors="pt")
    assert tuple(sam["pixel_values"].shape[-2:]) == (1024, 1024)
    assert sam["reshaped_input_sizes"][0].tolist() == [768, 1024]


def test_random_llava_7b_4bit_loads_end_to_end_on_the_meta_device():
    import bitsandbytes as bnb

    from lisa_demo.loading import load_lisa
    from lisa_demo.memory import count_parameters

    cfg = preset("llava-1.5-7b").replace(random_weights=True)
    loaded = load_lisa(cfg, device="meta", for_training=True)
    llava = loaded.model.llava.get_base_model()
    quantized = {n for n, m in llava.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 7 * 32
    assert all(n.startswith("model.language_model.layers.") for n in quantized)
    kept = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    kept_linears = [
        m for n, m in llava.named_modules() if n.startswith(kept) and isinstance(m, torch.nn.Linear)
    ]
    assert len(kept_linears) == 24 * 6 + 2 + 1  # CLIP q k v o fc1 fc2, projector, lm_head
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in kept_linears)
    assert llava.is_loaded_in_4bit
    assert llava.config.image_token_id == loaded.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert loaded.seg_token_id < llava.config.text_config.vocab_size
    assert "Linear4bit" in type(llava.model.language_model.layers[0].self_attn.q_proj).__name__
    trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    assert trainable == count_parameters(cfg, "base").trainable  # the estimator agrees


def test_random_weights_quantize_as_they_are_filled_and_run_on_cpu():
    import bitsandbytes as bnb

    from lisa_demo.loading import (
        materialize_random,
        quantization_config,
        random_llava_skeleton,
    )
    from lisa_demo.tiny import build_tokenizer, llava_config

    tokenizer = build_tokenizer()
    config = llava_config(
        2240, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id
    )
    quant = quantization_config(preset("tiny-random").replace(quantization="4bit"), torch.float32)
    model = random_llava_skeleton(config, quant)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * config.text_config.num_hidden_layers
    assert all(m.weight.is_meta for m in layers)

    materialize_random(model, torch.float32, torch.device("cpu"), std=0.02)
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    assert all(m.weight.bnb_quantized and m.weight.dtype == torch.uint8 for m in layers)
    norm = model.model.language_model.norm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 40, 41, 42]])).logits
    assert logits.shape == (1, 4, 2240) and torch.isfinite(logits).all()
    assert logits.std() > 0  # random, not zeros


def test_docs_name_the_gpu_command():
    text = (Path(__file__).parent.parent / "docs" / "BENCHMARKS.md").read_text()
    assert bench.GPU_COMMAND in text
    assert "no gpu was available" in text.lower()
