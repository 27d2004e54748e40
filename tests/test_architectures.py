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
