"""The one loader: 4-bit (QLoRA) on CPU, LoRA targets, checkpoints and their base, bad sources."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from lisa_demo.checkpoint import CheckpointError, read_manifest, save_checkpoint
from lisa_demo.config import ConfigError, ModelConfig, preset
from lisa_demo.loading import ModelLoadError, load_lisa

QUESTION = "Can you segment the red square in this image?"
LM_QV = re.compile(r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)")


def _image() -> np.ndarray:
    image = np.full((40, 56, 3), 90, dtype=np.uint8)
    image[6:26, 10:30] = (230, 20, 20)
    return image


def _gt(n: int = 1) -> list[torch.Tensor]:
    target = torch.zeros(n, 40, 56)
    target[:, 6:26, 10:30] = 1.0
    return [target]


def _train_step(loaded, inputs: dict, lr: float) -> tuple[float, float]:
    """One AdamW step on every trainable tensor; returns the loss before and after."""
    model = loaded.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    loss = model(**inputs, gt_masks=_gt()).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        after = model(**inputs, gt_masks=_gt()).loss
    return loss.item(), after.item()


def _masks_and_scores(loaded, inputs: dict) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        out = loaded.model(**inputs)
    return (out.mask_logits[0] > 0).numpy(), out.scores[0].numpy()


# 4-bit --------------------------------------------------------------------------------------
def test_4bit_quantizes_the_language_model_only_and_trains_on_cpu(make_inputs):
    import bitsandbytes as bnb

    cfg = preset("tiny-random").replace(quantization="4bit", use_lora=True)
    loaded = load_lisa(cfg, device="cpu", for_training=True)
    llava = loaded.model.llava.get_base_model()
    modules = dict(llava.named_modules())
    quantized = {n for n, m in modules.items() if isinstance(m, bnb.nn.Linear4bit)}
    # Every Linear of the 4 language-model layers: q, k, v, o, gate, up, down.
    assert len(quantized) == 7 * 4
    assert all(n.startswith("model.language_model.layers.") for n in quantized)
    for prefix in ("model.vision_tower", "model.multi_modal_projector", "lm_head"):
        linears = [m for n, m in modules.items() if n.startswith(prefix) and type(m) is nn.Linear]
        assert linears, prefix
        assert all(m.weight.dtype == torch.float32 for m in linears), prefix
    assert not isinstance(llava.lm_head, bnb.nn.Linear4bit)

    inputs = make_inputs(loaded, _image(), QUESTION, "Sure, [SEG].")
    before, after = _train_step(loaded, inputs, lr=1e-2)
    assert np.isfinite(before) and np.isfinite(after)
    assert after != before


def test_lora_wraps_only_language_model_q_and_v():
    cfg = preset("tiny-random").replace(use_lora=True)
    loaded = load_lisa(cfg, device="cpu", for_training=True)
    llava = loaded.model.llava.get_base_model()
    wrapped = [n for n, m in llava.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == 2 * llava.config.text_config.num_hidden_layers
    assert all(LM_QV.fullmatch(n) for n in wrapped)
    assert not any("vision_tower" in n for n, _ in llava.named_parameters() if "lora_" in n)


# Checkpoints --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, make_inputs):
    """A LoRA model after one optimizer step, saved; with its eval-mode masks and scores."""
    cfg = preset("tiny-random").replace(use_lora=True)
    loaded = load_lisa(cfg, device="cpu", for_training=True)
    inputs = make_inputs(loaded, _image(), QUESTION, "Sure, [SEG].")
    _train_step(loaded, inputs, lr=1e-2)
    loaded.model.eval()
    masks, scores = _masks_and_scores(loaded, inputs)
    with torch.inference_mode():
        logits = loaded.model(**inputs).mask_logits[0].numpy()
    folder = save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "best", loaded.model, loaded.manifest(step=1)
    )
    state = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if p.requires_grad}
    return folder, inputs, masks, scores, state, logits


def test_checkpoint_reloads_to_identical_masks_and_scores(trained_checkpoint):
    folder, inputs, masks, scores, state, _ = trained_checkpoint
    assert read_manifest(folder)["step"] == 1
    # The settings (LoRA) come from the manifest, not from the caller's config.
    loaded = load_lisa(preset("tiny-random"), checkpoint=folder, device="cpu")
    reloaded = dict(loaded.model.named_parameters())
    assert set(state) <= set(reloaded)
    for name, tensor in state.items():
        assert torch.equal(reloaded[name], tensor), name
    new_masks, new_scores = _masks_and_scores(loaded, inputs)
    assert masks.shape == (1, 40, 56)
    assert np.array_equal(new_masks, masks)
    assert np.array_equal(new_scores, scores)


def test_checkpoint_on_another_base_is_refused_by_name(trained_checkpoint, tmp_path):
    from lisa_demo.tiny import write_tiny_models

    folder = trained_checkpoint[0]
    saved_base = read_manifest(folder)["llava"]["source"]
    other = write_tiny_models(tmp_path / "other", seed=4321)
    cfg = ModelConfig(llava=str(other / "llava"), sam=str(other / "sam"))
    with pytest.raises(CheckpointError) as err:
        load_lisa(cfg, checkpoint=folder, device="cpu")
    message = str(err.value)
    assert saved_base in message and str(other / "llava") in message


def test_pipeline_runs_a_lora_checkpoint(trained_checkpoint, force_answer):
    from lisa_demo.infer.pipeline import LisaPipeline

    folder, logits = trained_checkpoint[0], trained_checkpoint[5]
    pipeline = LisaPipeline.from_config(preset("tiny-random"), checkpoint=folder, device="cpu")
    force_answer(pipeline.loaded, "Sure, [SEG].")
    result = pipeline.segment(_image(), QUESTION, keep_logits=True)
    assert result.answer == "Sure, [SEG]."
    np.testing.assert_allclose(result.masks[0].logits, logits[0], atol=1e-3, rtol=1e-3)


# Sources ------------------------------------------------------------------------------------
def test_unfetchable_model_id_says_what_to_do_instead():
    cfg = ModelConfig(llava="nobody/no-such-model", sam="nobody/no-such-model")
    with pytest.raises(ModelLoadError) as err:
        load_lisa(cfg, device="cpu")
    message = str(err.value)
    assert "nobody/no-such-model" in message
    assert "local folder" in message and "--preset tiny" in message


def test_train_tokens_train_their_rows_and_reload_from_the_checkpoint(tmp_path, make_inputs):
    """--train-tokens: the words' rows of embed_tokens and lm_head train beside [SEG]'s, the
    manifest records the words, and a reload gives the trained rows back."""
    from lisa_demo.loading import train_token_ids

    cfg = preset("tiny-random").replace(use_lora=True, train_tokens=("heart", "red circle"))
    loaded = load_lisa(cfg, device="cpu", for_training=True)
    tokenizer = loaded.tokenizer
    words = [tokenizer.convert_tokens_to_ids("\u2581" + w) for w in ("heart", "red", "circle")]
    ids = train_token_ids(tokenizer, cfg.train_tokens, loaded.seg_token_id)
    assert ids == [loaded.seg_token_id, *words]
    deltas = {n: p for n, p in loaded.model.named_parameters() if "trainable_tokens_delta" in n}
    assert len(deltas) == 2 and all(p.shape[0] == 4 and p.requires_grad for p in deltas.values())
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    inputs = make_inputs(loaded, image, "where is the heart?", "[SEG].")
    embed = loaded.model.llava.get_input_embeddings()
    before = embed(torch.tensor(words)).detach().clone()
    optimizer = torch.optim.SGD(list(deltas.values()), lr=10.0)
    loaded.model(**inputs).ce_loss.backward()
    optimizer.step()
    after = embed(torch.tensor(words)).detach()
    assert not torch.equal(before[0], after[0])  # "heart" is in the question: it trained
    assert torch.equal(before[1:], after[1:])  # "red" and "circle" were not in the batch
    folder = save_checkpoint(tmp_path / "ckpt", loaded.model, loaded.manifest())
    assert read_manifest(folder)["lora"]["train_tokens"] == ["heart", "red circle"]
    reloaded = load_lisa(preset("tiny-random"), checkpoint=folder, device="cpu")
    assert reloaded.config.train_tokens == ("heart", "red circle")
    again = reloaded.model.llava.get_input_embeddings()(torch.tensor(words))
    torch.testing.assert_close(again, after)
    with pytest.raises(ConfigError, match="needs --use-lora"):
        preset("tiny-random").replace(train_tokens=("heart",))


def test_train_projector_trains_llava_projector_and_reloads_it(tmp_path, make_inputs):
    """--train-projector: the multimodal projector trains with LoRA, the manifest says so,
    and a checkpoint brings its weights back (for inference and for resuming)."""
    cfg = preset("tiny-random").replace(use_lora=True, train_projector=True)
    loaded = load_lisa(cfg, device="cpu", for_training=True)
    projector = loaded.model.base_llava.model.multi_modal_projector
    assert all(p.requires_grad for p in projector.parameters())
    plain = load_lisa(preset("tiny-random").replace(use_lora=True), device="cpu", for_training=True)
    assert not any(
        p.requires_grad for p in plain.model.base_llava.model.multi_modal_projector.parameters()
    )
    weight = next(projector.parameters())
    before = weight.detach().clone()
    inputs = make_inputs(loaded, np.zeros((32, 32, 3), dtype=np.uint8), "where?", "[SEG].")
    loaded.model(**inputs).ce_loss.backward()
    torch.optim.SGD(list(projector.parameters()), lr=10.0).step()
    assert not torch.equal(before, weight.detach())
    folder = save_checkpoint(tmp_path / "ckpt", loaded.model, loaded.manifest())
    assert read_manifest(folder)["train_projector"] is True
    reloaded = load_lisa(preset("tiny-random"), checkpoint=folder, device="cpu")
    assert reloaded.config.train_projector
    again = next(reloaded.model.base_llava.model.multi_modal_projector.parameters())
    torch.testing.assert_close(again, weight.detach())
    resumed = load_lisa(preset("tiny-random"), checkpoint=folder, device="cpu", for_training=True)
    assert all(
        p.requires_grad for p in resumed.model.base_llava.model.multi_modal_projector.parameters()
    )
    with pytest.raises(ConfigError, match="--train-projector is for fine-tunes"):
        preset("tiny-random").replace(train_all=True, use_lora=False, train_projector=True)
