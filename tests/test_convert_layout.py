"""The converter's key map covers every tensor of the real LISA-7B-v1 and LISA-13B-llama2-v1
checkpoints (their state dicts built from their configs on the meta device, no download),
with nothing left over and nothing missing on the transformers side."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from lisa_demo.convert import (
    llava_config,
    llava_key,
    projection_key,
    sam_config_from_tensors,
    sam_keys,
    sam_mlp_depths,
)
from lisa_demo.tiny_lisa import segment_anything_modeling

# config.json values of the published checkpoints.
LISA_CONFIGS = {
    "LISA-7B-v1": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        max_position_embeddings=2048, rms_norm_eps=1e-6, vocab_size=32004, image_token=32000,
    ),
    "LISA-13B-llama2-v1": dict(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32003, image_token=32003,
    ),
}  # fmt: skip


def lisa_checkpoint_shapes(spec: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a LISA checkpoint: transformers 4.31's LLaMA (with rotary
    inv_freq buffers), the one-Linear projector, segment-anything's ViT-H SAM, text_hidden_fcs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sam = segment_anything_modeling()
    hidden = spec["hidden_size"]
    with torch.device("meta"):
        llama = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=spec["vocab_size"], hidden_size=hidden,
                intermediate_size=spec["intermediate_size"],
                num_hidden_layers=spec["num_hidden_layers"],
                num_attention_heads=spec["num_attention_heads"], tie_word_embeddings=False,
            )
        )  # fmt: skip
        vit_h = sam.Sam(
            image_encoder=sam.ImageEncoderViT(
                depth=32, embed_dim=1280, img_size=1024, mlp_ratio=4,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=16, patch_size=16,
                qkv_bias=True, use_rel_pos=True, global_attn_indexes=[7, 15, 23, 31],
                window_size=14, out_chans=256,
            ),
            prompt_encoder=sam.PromptEncoder(
                embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                mask_in_chans=16,
            ),
            mask_decoder=sam.MaskDecoder(
                num_multimask_outputs=3,
                transformer=sam.TwoWayTransformer(
                    depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8
                ),
                transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
            ),
        )  # fmt: skip
    shapes = {k: tuple(v.shape) for k, v in llama.state_dict().items()}
    head_dim = hidden // spec["num_attention_heads"]
    for i in range(spec["num_hidden_layers"]):
        shapes[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = (head_dim // 2,)
    shapes["model.mm_projector.weight"] = (hidden, 1024)
    shapes["model.mm_projector.bias"] = (hidden,)
    for k, v in vit_h.state_dict().items():
        if k not in ("pixel_mean", "pixel_std"):  # buffers LISA's checkpoints do not hold
            shapes[f"model.visual_model.{k}"] = tuple(v.shape)
    shapes["model.text_hidden_fcs.0.0.weight"] = (hidden, hidden)
    shapes["model.text_hidden_fcs.0.0.bias"] = (hidden,)
    shapes["model.text_hidden_fcs.0.2.weight"] = (256, hidden)
    shapes["model.text_hidden_fcs.0.2.bias"] = (256,)
    return shapes


@pytest.mark.parametrize("name", sorted(LISA_CONFIGS))
def test_key_map_covers_the_real_checkpoints(name):
    from accelerate import init_empty_weights
    from transformers import CLIPVisionConfig, LlavaForConditionalGeneration, SamModel

    from lisa_demo.model import build_projection

    spec = LISA_CONFIGS[name]
    source = lisa_checkpoint_shapes(spec)
    llava, sam, projection, dropped = {}, {}, {}, []
    sam_meta = {
        k.removeprefix("model.visual_model."): torch.empty(s, device="meta")
        for k, s in source.items()
        if k.startswith("model.visual_model.")
    }
    depths = sam_mlp_depths(sam_meta)
    for key, shape in source.items():
        if key.endswith("rotary_emb.inv_freq"):
            dropped.append(key)
        elif key.startswith("model.visual_model."):
            for target in sam_keys(key.removeprefix("model.visual_model."), depths):
                sam[target] = shape
        elif projection_key(key) is not None:
            projection[projection_key(key)] = shape
        else:
            target = llava_key(key)
            assert target is not None, f"{key} is not mapped"
            llava[target] = shape
    assert len(dropped) == spec["num_hidden_layers"]

    vocab = max(spec["vocab_size"], spec["image_token"] + 1)  # 13B gains <image>
    for row_name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        llava[row_name] = (vocab, llava[row_name][1])
    clip = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )  # fmt: skip
    lisa = {**spec, "mm_vision_select_layer": -2}
    config = llava_config(lisa, clip, vocab, spec["image_token"], 256)
    with init_empty_weights():
        expected = {
            k: tuple(v.shape)
            for k, v in LlavaForConditionalGeneration(config).state_dict().items()
            if not k.startswith("model.vision_tower.") and ".linear_2." not in k
        }
    assert llava == expected

    sam_config = sam_config_from_tensors(sam_meta)
    assert sam_config.vision_config.global_attn_indexes == [7, 15, 23, 31]
    assert sam_config.vision_config.num_attention_heads == 16
    assert sam_config.mask_decoder_config.layer_norm_eps == 1e-5
    with init_empty_weights():
        sam_expected = {k: tuple(v.shape) for k, v in SamModel(sam_config).state_dict().items()}
    assert sam == sam_expected

    ours = {
        k: tuple(v.shape)
        for k, v in build_projection(spec["hidden_size"], 256).state_dict().items()
    }
    assert projection == ours
