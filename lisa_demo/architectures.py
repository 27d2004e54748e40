"""Configs of the real-size architectures, written out so no download is needed.

Used to build the models on the meta device (parameter counts, 4-bit skip lists, LoRA targets)
and with random weights for speed and memory measurements (`--random-weights`).
Values are those of llava-hf/llava-1.5-7b-hf and facebook/sam-vit-{base,huge}.
"""

from __future__ import annotations

LLAVA_1_5_IMAGE_TOKEN_ID = 32000
LLAVA_1_5_PAD_TOKEN_ID = 32001


def llava_1_5_7b_config(
    image_token_id: int = LLAVA_1_5_IMAGE_TOKEN_ID,
):  # -> LlavaConfig
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=LLAVA_1_5_PAD_TOKEN_ID,
    )
    return llava_1_5_conventions(vision, text, image_token_id, LLAVA_1_5_PAD_TOKEN_ID)


def llava_1_5_conventions(vision, text, image_token_id: int, pad_token_id: int):  # -> LlavaConfig
    """A LlavaConfig with llava-1.5's conventions (the real model and the tiny one share them):
    vision feature layer -2, the "default" strategy (CLS dropped), a GELU projector."""
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
    )


SAM_VARIANTS = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 global_attn_indexes=[2, 5, 8, 11]),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  global_attn_indexes=[5, 11, 17, 23]),
    "huge": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                 global_attn_indexes=[7, 15, 23, 31]),
}  # fmt: skip


def sam_variant(source: str) -> str:
    """'facebook/sam-vit-huge' -> 'huge'; unknown names raise ValueError."""
    for name in SAM_VARIANTS:
        if source.rstrip("/").endswith(f"vit-{name}") or source == name:
            return name
    raise ValueError(f"no built-in SAM architecture for {source!r}; use sam-vit-base/large/huge")


def sam_vit_config(variant: str = "base"):  # -> SamConfig
    from transformers import SamConfig, SamVisionConfig

    hidden = SAM_VARIANTS[variant]["hidden_size"]
    # Random weights at a realistic scale (the config default of 1e-10 gives subnormal floats).
    vision = SamVisionConfig(**SAM_VARIANTS[variant], mlp_dim=4 * hidden, initializer_range=0.02)
    return SamConfig(vision_config=vision)
