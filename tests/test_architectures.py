"""The real-size architectures, built on the meta device: sizes, 4-bit skip list, LoRA targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lisa_demo.architectures import llava_1_5_7b_config, sam_variant, sam_vit_config
from lisa_demo.config import QUANTIZATION_SKIP_MODULES, preset

LM_LAYERS = 32


@pytest.fixture(scope="module")
def llava_7b() -> nn.Module:
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        return LlavaForConditionalGeneration(llava_1_5_7b_config())


def _count(module: nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for n, p in module.named_parameters() if n.startswith(prefix))


def test_llava_1_5_7b_parameter_counts(llava_7b):
    # llava-hf/llava-1.5-7b-hf: 7,063,427,072 parameters.
    assert 7.060e9 < _count(llava_7b) < 7.066e9
    # CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336 vision model).
    assert _count(llava_7b, "model.vision_tower.") == 303_507_456
    # Two-layer MLP projector 1024 -> 4096 -> 4096, with biases.
    assert _count(llava_7b, "model.multi_modal_projector.") == 1024 * 4096 + 4096 + 4096**2 + 4096
    assert llava_7b.lm_head.weight.shape == (32064, 4096)


@pytest.mark.parametrize(
    ("variant", "low", "high"),
    [("base", 93.6e6, 93.9e6), ("huge", 640.9e6, 641.3e6)],  # published: 93.7 M, 641.1 M
)
def test_sam_parameter_counts(variant, low, high):
    from transformers import SamModel

    with torch.device("meta"):
        sam = SamModel(sam_vit_config(variant))
    assert low < _count(sam) < high
    assert sam_variant(f"facebook/sam-vit-{variant}") == variant


def _linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_quantization_skip_list_keeps_vision_projector_and_head_only(llava_7b):
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = list(QUANTIZATION_SKIP_MODULES)
    linears = _linears(llava_7b)
    kept = {n for n in linears if not should_convert_module(n, skip)}
    kept_parts = ("model.vision_tower.", "model.multi_modal_projector.")
    expected = {n for n in linears if n.startswith(kept_parts) or n == "lm_head"}
    assert kept == expected
    language = [n for n in linears if n.startswith("model.language_model.")]
    assert len(language) == 7 * LM_LAYERS
    assert all(should_convert_module(n, skip) for n in language)
    names = {n for n, _ in llava_7b.named_modules()}
    assert all(entry in names for entry in skip)  # no entry that silently matches nothing
    # The bare names of older examples match nothing in transformers 5.
    assert all(should_convert_module(n, ["vision_tower", "multi_modal_projector"]) for n in kept)


def test_lora_regex_matches_the_64_language_model_q_v_projections(llava_7b):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    regex = preset("llava-1.5-7b").lora_target_regex()
    lora = LoraConfig(target_modules=regex)
    names = [n for n, _ in llava_7b.named_modules()]
    matched = {n for n in names if check_target_module_exists(lora, n)}
    expected = {
        f"model.language_model.layers.{i}.self_attn.{proj}"
        for i in range(LM_LAYERS)
        for proj in ("q_proj", "v_proj")
    }
    assert matched == expected and len(matched) == 64
    vision_qv = [n for n in names if "vision_tower" in n and n.endswith(("q_proj", "v_proj"))]
    assert len(vision_qv) == 2 * 24  # the CLIP tower has q/v projections that must not match
    assert not matched & set(vision_qv)


# The official LISA checkpoints' architectures --------------------------------------------------
def _llama_count(vocab: int, hidden: int, intermediate: int, layers: int) -> int:
    """A LLaMA causal LM by hand: untied embeddings and head, per layer q k v o (h x h), gate
    up down (h x I), two RMSNorms; the final norm."""
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden


def _clip_l14_count(image_size: int) -> int:
    """CLIP ViT-L/14 vision model by hand (no projection): patch conv (no bias), class and
    position embeddings, pre-norm, 24 layers (q k v o with biases, 2 norms, MLP 1024 <-> 4096),
    post-norm."""
    h, inner, tokens = 1024, 4096, (image_size // 14) ** 2 + 1
    layer = 4 * (h * h + h) + 2 * 2 * h + (h * inner + inner) + (inner * h + h)
    return 3 * 14 * 14 * h + h + tokens * h + 2 * h + 24 * layer + 2 * h


@pytest.mark.parametrize(
    ("name", "vocab", "hidden", "intermediate", "layers", "published"),
    [
        # LLaMA-1 7B has 6,738,415,616 parameters with 32,000 tokens; LISA adds 4 rows twice.
        ("lisa-7b", 32004, 4096, 11008, 32, 6_738_415_616 + 2 * 4 * 4096),
        # Llama-2-13B has 13,015,864,320 with 32,000 tokens; LISA's 3 and our <image>: 4 rows.
        ("lisa-13b", 32004, 5120, 13824, 40, 13_015_864_320 + 2 * 4 * 5120),
    ],
)  # fmt: skip
def test_lisa_architectures_count_as_llama_clip_224_and_one_linear(
    name, vocab, hidden, intermediate, layers, published
):
    from transformers import LlavaForConditionalGeneration

    from lisa_demo.architectures import architecture

    config = architecture(name).llava_config()
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    language = _count(llava, "model.language_model.") + _count(llava, "lm_head.")
    assert language == _llama_count(vocab, hidden, intermediate, layers) == published
    assert _count(llava, "model.vision_tower.") == _clip_l14_count(224) == 303_179_776
    # LISA's one Linear 1024 -> H as linear_1, then an identity H x H as linear_2.
    projector = llava.model.multi_modal_projector
    assert _count(projector) == (1024 * hidden + hidden) + (hidden * hidden + hidden)
    assert type(projector.act).__name__ == "LinearActivation"  # "linear": the identity
    assert _count(llava) == language + 303_179_776 + _count(projector)
    text = config.text_config
    assert text.vocab_size == vocab and text.pad_token_id == 0
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.image_seq_length == 256 and config.multimodal_projector_bias
    assert config.vision_config.image_size == 224


def test_lisa_token_ids_and_text_settings():
    from lisa_demo.architectures import lisa_7b_config, lisa_13b_config

    seven, thirteen = lisa_7b_config(), lisa_13b_config()
    assert seven.image_token_id == 32000  # <im_patch>, always overwritten by image features
    assert thirteen.image_token_id == 32003  # <image>, added after [SEG] 32000 .. <im_end> 32002
    assert (seven.text_config.rms_norm_eps, thirteen.text_config.rms_norm_eps) == (1e-6, 1e-5)
    assert seven.text_config.max_position_embeddings == 2048
    assert thirteen.text_config.max_position_embeddings == 4096
    assert thirteen.text_config.num_key_value_heads == 40


def test_lisa_sam_is_vit_h_with_the_original_decoder_epsilon():
    from transformers import SamModel

    from lisa_demo.architectures import architecture

    config = architecture("lisa-7b").sam_config("models/lisa-7b-v1/sam")  # names no variant
    assert config.mask_decoder_config.layer_norm_eps == 1e-5
    assert config.vision_config.hidden_size == 1280  # ViT-H
    with torch.device("meta"):
        sam = SamModel(config)
    assert 640.9e6 < _count(sam) < 641.3e6
    base = architecture("lisa-7b").sam_config("facebook/sam-vit-base")  # a SAM named by --sam
    assert base.vision_config.hidden_size == 768
    assert architecture("llava-1.5-7b").sam_config().mask_decoder_config.layer_norm_eps == 1e-6


@pytest.mark.parametrize(
    ("name", "architecture"),
    [("lisa-7b-v1", "lisa-7b"), ("lisa-7b-v1-explanatory", "lisa-7b"),
     ("lisa-13b-llama2-v1", "lisa-13b"), ("lisa-13b-llama2-v1-explanatory", "lisa-13b")],
)  # fmt: skip
def test_lisa_presets_point_at_the_converted_folder_and_train_like_llava_7b(name, architecture):
    from lisa_demo.config import models_dir

    cfg = preset(name)
    assert cfg.architecture == architecture
    folder = models_dir() / name  # models/<name> unless LISA_MODELS_DIR says otherwise
    assert (cfg.llava, cfg.sam, cfg.heads) == (str(folder / "llava"), str(folder / "sam"),
                                               str(folder))  # fmt: skip
    assert cfg.prompt_format == "llava_v1"
    qlora = preset("llava-1.5-7b")
    for field in ("precision", "quantization", "use_lora", "lora_r", "lora_targets",
                  "gradient_checkpointing", "lean_token_rows", "vision_quantization",
                  "offload_sam_encoder"):  # fmt: skip
        assert getattr(cfg, field) == getattr(qlora, field), field


def test_random_weight_processors_give_lisa_256_image_tokens_at_224_px():
    from PIL import Image

    from lisa_demo.config import IMAGE_TOKEN
    from lisa_demo.inputs import image_token_count
    from lisa_demo.loading import random_weight_processors

    processor, _ = random_weight_processors("lisa-7b")
    assert image_token_count(processor) == 256
    batch = processor(text=f"USER: {IMAGE_TOKEN}\nWhat? ASSISTANT:",
                      images=Image.new("RGB", (500, 375)), return_tensors="pt")  # fmt: skip
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert int((batch["input_ids"] == image_id).sum()) == 256
    assert tuple(batch["pixel_values"].shape[-2:]) == (224, 224)


def test_random_lisa_7b_builds_on_the_meta_device_with_the_presets_settings():
    import bitsandbytes as bnb

    from lisa_demo.loading import load_lisa
    from lisa_demo.memory import count_parameters

    cfg = preset("lisa-7b-v1").replace(random_weights=True)
    loaded = load_lisa(cfg, device="meta", for_training=True)
    llava = loaded.model.llava.get_base_model()
    assert llava.config.text_config.vocab_size == 32004
    assert llava.config.vision_config.image_size == 224
    four_bit = [n for n, m in llava.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 7 * 32 and all(n.startswith("model.language_model.") for n in four_bit)
    eight_bit = [n for n, m in llava.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(eight_bit) == 6 * 24 and all(n.startswith("model.vision_tower.") for n in eight_bit)
    sam = loaded.model.sam
    assert sam.config.vision_config.hidden_size == 1280
    assert sam.config.mask_decoder_config.layer_norm_eps == 1e-5
    trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    assert trainable == count_parameters(cfg).trainable  # the estimator agrees
