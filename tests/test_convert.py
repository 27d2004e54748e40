"""The LISA converter: a tiny random LISA in LISA's checkpoint layout, converted, must compute
what LISA computes (tests/lisa_reference.py, built without this project's model code)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lisa_demo.config import BUNDLED_MODEL_DIR, ConfigError, full_model_config
from lisa_demo.convert import ConvertError, convert, main, resolve_source
from lisa_demo.tiny_lisa import write_tiny_lisa
from tests.lisa_reference import SYSTEM, LisaReference, LisaTokenizer

MAX_NEW_TOKENS = 20
QUESTION = "Which object would you grab to open the door? Please output segmentation mask."


def _image() -> np.ndarray:
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:180, 0:260]
    base = np.stack([x * 0.9, y * 1.2, (x + y) * 0.5], axis=-1)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def _boost_seg_row(folder: Path, reference: LisaReference, image: np.ndarray) -> None:
    """Make the random model say [SEG]: its LM-head row becomes 1.3 x the row of the token the
    model generates most, so the answer holds [SEG] tokens whose masks can be compared."""
    tokens = reference.answer(image, QUESTION, MAX_NEW_TOKENS)["tokens"]
    common = Counter(tokens).most_common(1)[0][0]
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())["weight_map"]
    shard = folder / index["lm_head.weight"]
    state = torch.load(shard, weights_only=True)
    state["lm_head.weight"][reference.seg_id] = state["lm_head.weight"][common] * 1.3
    torch.save(state, shard)


@pytest.fixture(scope="module")
def lisa_source(tmp_path_factory) -> Path:
    folder = write_tiny_lisa(tmp_path_factory.mktemp("lisa") / "src", layout="7b", shards="bin")
    _boost_seg_row(folder, LisaReference(folder), _image())
    return folder


@pytest.fixture(scope="module")
def converted(lisa_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "tiny-lisa-v1"
    assert main(["--lisa", str(lisa_source), "--out", str(out), "--dtype", "fp32"]) == 0
    return out


@pytest.fixture(scope="module")
def reference(lisa_source) -> LisaReference:
    return LisaReference(lisa_source)


@pytest.fixture(scope="module")
def pipeline(converted):
    from lisa_demo.infer.pipeline import LisaPipeline
    from lisa_demo.loading import load_lisa

    loaded = load_lisa(full_model_config(converted), device="cpu")
    return LisaPipeline(loaded, max_new_tokens=MAX_NEW_TOKENS)


def test_converted_folder_is_a_full_model_with_lisas_prompt(converted):
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["prompt_format"] == "llava_v1"
    assert manifest["image_tokens"] == 256 and manifest["image_token"] == "<im_patch>"
    assert not list(converted.rglob("*.bin")) and not list(converted.rglob("*.pt"))
    cfg = full_model_config(converted)
    assert cfg.prompt_format == "llava_v1" and cfg.heads == str(converted.resolve())
    sam = json.loads((converted / "sam" / "config.json").read_text())
    assert sam["mask_decoder_config"]["layer_norm_eps"] == 1e-5
    assert sam["vision_config"]["global_attn_indexes"] == [1, 3]


def test_prompt_ids_equal_lisas(pipeline, lisa_source):
    from lisa_demo.inputs import encode_text

    loaded = pipeline.loaded
    ours, _ = encode_text(loaded.tokenizer, QUESTION, None, 256, loaded.prompt_format)
    before, after = LisaTokenizer(lisa_source).prompt(QUESTION)
    assert ours == before + [loaded.model.base_llava.config.image_token_id] * 256 + after


def test_logits_equal_the_reference(pipeline, reference):
    from lisa_demo.inputs import encode_text

    loaded, image = pipeline.loaded, _image()
    ids, _ = encode_text(loaded.tokenizer, QUESTION, None, 256, loaded.prompt_format)
    encoded = loaded.processor.image_processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = loaded.model.base_llava(input_ids=torch.tensor([ids]), pixel_values=encoded).logits[
            0
        ]
    theirs = reference.prompt_logits(image, QUESTION)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()


def test_greedy_tokens_and_masks_equal_the_reference(pipeline, reference):
    image = _image()
    expected = reference.answer(image, QUESTION, MAX_NEW_TOKENS)
    result = pipeline.segment(image, QUESTION, keep_logits=True)
    assert result.token_ids == expected["tokens"]
    n_seg = expected["tokens"].count(reference.seg_id)
    assert n_seg >= 1, "the fixture should make the model answer with [SEG]"
    assert len(result.masks) == n_seg == len(expected["mask_logits"])
    for ours, logits in zip(result.masks, expected["mask_logits"], strict=True):
        theirs = logits > 0
        assert ours.mask.shape == theirs.shape == image.shape[:2]
        assert theirs.any() and not theirs.all(), "a mask to compare should be partial"
        assert (ours.mask != theirs).mean() <= 0.001
        assert np.abs(ours.logits - logits).max() < 1e-4
    # A second question on the same image comes from the prefix KV cache: same arithmetic.
    again = pipeline.segment(image, QUESTION)
    assert again.cache_hit and again.token_ids == result.token_ids


def test_tokenization_of_prompt_and_answer_is_lisas_piecewise_rule(pipeline, lisa_source):
    """Hand-worked by LISA's rule: the text on each side of an added token is encoded alone
    (SentencePiece gives each piece its own leading space marker), with the whitespace next to
    the added token dropped; the image sits between <im_start> and <im_end>."""
    import sentencepiece as spm

    from lisa_demo.inputs import encode_text

    sp = spm.SentencePieceProcessor(model_file=str(lisa_source / "tokenizer.model"))
    added = json.loads((lisa_source / "added_tokens.json").read_text())
    loaded = pipeline.loaded
    ids, labels = encode_text(
        loaded.tokenizer, "Where is it?", "Sure, [SEG] and [SEG].", 3, loaded.prompt_format
    )
    prompt = (
        [1] + sp.encode(f"{SYSTEM} USER:") + [added["<im_start>"]] + [added["<im_patch>"]] * 3
        + [added["<im_end>"]] + sp.encode("Where is it? ASSISTANT:")
    )  # fmt: skip
    answer = (
        sp.encode("Sure,") + [added["[SEG]"]] + sp.encode("and") + [added["[SEG]"]]
        + sp.encode(".") + [2]
    )  # fmt: skip
    assert ids == prompt + answer
    assert labels == [-100] * len(prompt) + answer
    # The rule differs from plain tokenization: "." alone gets its own space marker.
    assert sp.encode(".") != sp.encode("a.")[1:]


def test_queries_with_lisas_added_tokens_are_refused(pipeline):
    from lisa_demo.infer.pipeline import InputError

    with pytest.raises(InputError, match="<im_end>"):
        pipeline.segment(_image(), "what is <im_end> here")


def test_13b_layout_adds_an_image_token_that_is_never_generated(tmp_path):
    source = write_tiny_lisa(tmp_path / "src13", layout="13b", shards="safetensors")
    out = tmp_path / "out13"
    manifest = convert(source, _mkdir(out), dtype_name="fp32", log=lambda _: None)
    assert manifest["image_token"] == "<image>" and manifest["seg_token_id"] == 320
    generation = json.loads((out / "llava" / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == [manifest["image_token_id"]]
    from lisa_demo.infer.pipeline import LisaPipeline
    from lisa_demo.loading import load_lisa

    pipeline = LisaPipeline(load_lisa(full_model_config(out), device="cpu"), max_new_tokens=4)
    result = pipeline.segment(_image(), "What is it?")
    assert manifest["image_token_id"] not in result.token_ids
    assert len(result.token_ids) == 4


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


# Refusals: one line, exit 2, nothing left behind -------------------------------------------
def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lisa_demo.convert", *args],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
        cwd=Path(__file__).resolve().parent.parent,
    )


def test_existing_output_is_refused_without_force(converted, lisa_source):
    before = sorted(p.name for p in converted.iterdir())
    result = _run_cli("--lisa", str(lisa_source), "--out", str(converted))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--force" in result.stderr
    assert sorted(p.name for p in converted.iterdir()) == before


def test_offline_hub_id_explains_how_to_download(tmp_path):
    result = _run_cli("--lisa", "xinlai/LISA-7B-v1", "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "hf download xinlai/LISA-7B-v1" in result.stderr and "--lisa DIR" in result.stderr
    assert not (tmp_path / "x").exists()


def test_lisa_plus_plus_is_refused_clearly():
    with pytest.raises(ConvertError, match="LISA\\+\\+"):
        resolve_source("Senqiao/LISA_Plus_7b")


def test_a_folder_that_is_not_lisa_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = _run_cli("--lisa", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "not a LISA checkpoint" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_key_is_named(lisa_source, tmp_path):
    import shutil

    source = tmp_path / "src"
    shutil.copytree(lisa_source, source)
    index_path = source / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    shard = source / index["weight_map"]["lm_head.weight"]
    state = torch.load(shard, weights_only=True)
    state["model.extra_head.weight"] = torch.zeros(2, 2)
    torch.save(state, shard)
    with pytest.raises(ConvertError, match="model.extra_head.weight"):
        convert(source, _mkdir(tmp_path / "out"), dtype_name="fp32", log=lambda _: None)


def test_a_checkpoint_folder_is_not_a_full_model(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "lisa-studio-checkpoint"}))
    with pytest.raises(ConfigError, match="--checkpoint"):
        full_model_config(tmp_path)


# Fine-tuning from a converted LISA -----------------------------------------------------------
def test_fine_tune_from_a_converted_lisa_continues_from_its_weights(converted, tmp_path):
    """QLoRA-style LoRA on the merged weights; [SEG] rows, projection and mask decoder start at
    LISA's values; the checkpoint records the converted base and reloads only onto it."""
    from safetensors.torch import load_file

    from lisa_demo.checkpoint import CheckpointError
    from lisa_demo.data.synthetic import generate_dataset
    from lisa_demo.infer.pipeline import LisaPipeline
    from lisa_demo.loading import load_lisa
    from lisa_demo.train.__main__ import main as train_main

    data = tmp_path / "data"
    generate_dataset(data, {"train": 2, "val": 2}, seed=5)
    run = tmp_path / "run"
    code = train_main(
        ["--model", str(converted), "--dataset", str(data), "--output-dir", str(run),
         "--max-steps", "2", "--eval-every", "2", "--batch-size", "1", "--seg-rate-samples", "0",
         "--mask-lr-scale", "1"]  # the mask side trains, as in LISA (a fine-tune's default: 0)
    )  # fmt: skip
    assert code == 0
    last = run / "checkpoints" / "last"
    manifest = json.loads((last / "manifest.json").read_text())
    assert manifest["llava"]["source"] == str(converted.resolve() / "llava")
    assert manifest["llava"]["fingerprint"]
    start = json.loads((run / "events.jsonl").read_text().splitlines()[0])
    assert start["config"]["model"]["prompt_format"] == "llava_v1"
    # The trained projection moved a little from LISA's, not from a fresh initialisation.
    lisa = load_file(str(converted / "projection.safetensors"))
    trained = load_file(str(last / "trainable.safetensors"))
    delta = (trained["text_hidden_fcs.0.weight"] - lisa["0.weight"]).abs().max()
    assert 0 < delta < 0.05
    pipeline = LisaPipeline(
        load_lisa(full_model_config(converted), checkpoint=last, device="cpu"), max_new_tokens=2
    )
    assert len(pipeline.segment(_image(), QUESTION).token_ids) == 2
    with pytest.raises(CheckpointError, match="made for"):
        load_lisa(full_model_config(BUNDLED_MODEL_DIR), checkpoint=last, device="cpu")
    # Given only the checkpoint, the command line loads it on the base it names.
    from lisa_demo.config import base_model_config

    assert base_model_config(None, checkpoint=last) == full_model_config(converted)


def test_a_hub_model_id_that_cannot_be_fetched_says_how_to_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="hf download someone/lisa-7b-studio --local-dir DIR"):
        full_model_config("someone/lisa-7b-studio")


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_a_converted_lisa_loads_quantized_with_the_usual_skip_list(converted, bits):
    """The language model's linears in 4-bit/8-bit; vision tower, both projector layers,
    lm_head and SAM as they are (the skip list of llava-1.5-7b)."""
    import bitsandbytes as bnb

    from lisa_demo.infer.pipeline import LisaPipeline
    from lisa_demo.loading import load_lisa

    cfg = full_model_config(converted).replace(quantization=bits)
    loaded = load_lisa(cfg, device="cpu")
    llava = loaded.model.base_llava
    kind = bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt
    assert isinstance(llava.model.language_model.layers[0].self_attn.q_proj, kind)
    for module in (
        llava.model.multi_modal_projector.linear_1,
        llava.model.multi_modal_projector.linear_2,
        llava.lm_head,
        llava.model.vision_tower.encoder.layers[0].self_attn.q_proj,
    ):
        assert type(module) is torch.nn.Linear
    result = LisaPipeline(loaded, max_new_tokens=3).segment(_image(), QUESTION)
    assert len(result.token_ids) == 3
