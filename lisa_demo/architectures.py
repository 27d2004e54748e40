"""Configs of the real-size architectures, written out so no download is needed.

Used to build the models on the meta device (parameter counts, 4-bit skip lists, LoRA targets)
and with random weights for speed and memory measurements (`--random-weights`).

- "llava-1.5-7b": llava-hf/llava-1.5-7b-hf (CLIP ViT-L/14 at 336 px, 576 image tokens, a
  two-layer GELU projector) with facebook/sam-vit-base by default.
- "lisa-7b": the official LISA-7B-v1 (and -explanatory) as the converter writes it: LLaMA-1 7B
  (LLaVA-Lightning-7B-v1-1), CLIP ViT-L/14 at 224 px (256 image tokens), LISA's single-Linear
  projector as `linear_1` plus an identity `linear_2`, SAM ViT-H with the original mask
  decoder's layer-norm epsilon (1e-5).
- "lisa-13b": LISA-13B-llama2-v1 (and -explanatory): the same on LLaMA-2 13B.

Values: facebook/sam-vit-{base,huge}, llava-hf/llava-1.5-7b-hf, and for LISA the facts in the
checkpoints' config.json files (hidden size, layers, heads, epsilon, positions, vocabulary, token
ids) and the LLaMA releases they start from.
"""

from __future__ import annotations

from dataclasses import dataclass

LLAVA_1_5_IMAGE_TOKEN_ID = 32000
LLAVA_1_5_PAD_TOKEN_ID = 32001

# LISA-7B-v1: <im_patch> 32000 (reused as the image token: its embedding is always replaced by
# image features), <im_start> 32001, <im_end> 32002, [SEG] 32003; vocabulary 32004.
LISA_7B_IMAGE_TOKEN_ID = 32000
LISA_7B_SEG_TOKEN_ID = 32003
LISA_7B_VOCAB = 32004
# LISA-13B-llama2-v1: [SEG] 32000, <im_start> 32001, <im_end> 32002 (no <im_patch>, vocabulary
# 32003): the converter adds `<image>` as 32004th token. Not padded to a multiple of 64: padding
# rows would be logits that greedy decoding could pick, where LISA has none.
LISA_13B_SEG_TOKEN_ID = 32000
LISA_13B_IMAGE_TOKEN_ID = 32003
LISA_13B_VOCAB = 32004
# LLaVA v1 (and so LISA) pads with the unknown token, id 0.
LISA_PAD_TOKEN_ID = 0
# The original SAM mask decoder's layer norms (transformers' SamConfig defaults to 1e-6).
LISA_SAM_DECODER_LAYER_NORM_EPS = 1e-5


def clip_vit_l14_config(image_size: int):  # -> CLIPVisionConfig
    """openai/clip-vit-large-patch14 (224 px) or -336 vision model."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=image_size,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )


def llava_1_5_7b_config(
    image_token_id: int = LLAVA_1_5_IMAGE_TOKEN_ID,
):  # -> LlavaConfig
    from transformers import LlamaConfig

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
    return llava_1_5_conventions(
        clip_vit_l14_config(336), text, image_token_id, LLAVA_1_5_PAD_TOKEN_ID
    )


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


def lisa_conventions(text, image_token_id: int):  # -> LlavaConfig
    """A LlavaConfig as the converter writes a LISA checkpoint: CLIP ViT-L/14 at 224 px, layer
    -2 without CLS (256 image tokens), LISA's one Linear 1024 -> H as `linear_1` with an identity
    `linear_2` (H x H) after the identity activation "linear"."""
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=clip_vit_l14_config(224),
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="linear",
        multimodal_projector_bias=True,
        image_seq_length=256,
        tie_word_embeddings=False,
        pad_token_id=LISA_PAD_TOKEN_ID,
    )


def lisa_7b_config(image_token_id: int = LISA_7B_IMAGE_TOKEN_ID):  # -> LlavaConfig
    """LISA-7B-v1: LLaMA-1 7B (rms_norm_eps 1e-6, 2048 positions)."""
    from transformers import LlamaConfig

    text = LlamaConfig(
        vocab_size=LISA_7B_VOCAB,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=LISA_PAD_TOKEN_ID,
    )
    return lisa_conventions(text, image_token_id)


def lisa_13b_config(image_token_id: int = LISA_13B_IMAGE_TOKEN_ID):  # -> LlavaConfig
    """LISA-13B-llama2-v1: LLaMA-2 13B (meta-llama/Llama-2-13b: rms_norm_eps 1e-5, 4096
    positions, 40 heads without grouped-query attention)."""
    from transformers import LlamaConfig

    text = LlamaConfig(
        vocab_size=LISA_13B_VOCAB,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=LISA_PAD_TOKEN_ID,
    )
    return lisa_conventions(text, image_token_id)


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


def sam_vit_config(variant: str = "base", decoder_layer_norm_eps: float | None = None):
    """SamConfig of SAM ViT-B/L/H; `decoder_layer_norm_eps` overrides the mask decoder's
    (1e-5 for LISA's checkpoints, whose decoder is the original one)."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamVisionConfig

    hidden = SAM_VARIANTS[variant]["hidden_size"]
    # Random weights at a realistic scale (the config default of 1e-10 gives subnormal floats).
    vision = SamVisionConfig(**SAM_VARIANTS[variant], mlp_dim=4 * hidden, initializer_range=0.02)
    decoder = {} if decoder_layer_norm_eps is None else {"layer_norm_eps": decoder_layer_norm_eps}
    return SamConfig(vision_config=vision, mask_decoder_config=SamMaskDecoderConfig(**decoder))


@dataclass(frozen=True)
class Architecture:
    """One real-size LLaVA + SAM pair that `--random-weights` builds and the estimator knows."""

    name: str
    clip_image_size: int  # CLIP input side (336: 576 image tokens; 224: 256)
    sam: str  # SAM variant when the config's SAM source names none
    sam_decoder_layer_norm_eps: float | None  # None: transformers' default (1e-6)
    # Text tokens of the prompt before the image (BOS, system prompt, "USER: ", <im_start>):
    # the question-independent prefix the pipeline caches, with the image tokens.
    prefix_text_tokens: int
    # Text tokens of one training sample besides the image tokens (prompt, question, answer).
    text_tokens: int

    def llava_config(self, image_token_id: int | None = None):  # -> LlavaConfig
        build = {"llava-1.5-7b": llava_1_5_7b_config, "lisa-7b": lisa_7b_config,
                 "lisa-13b": lisa_13b_config}[self.name]  # fmt: skip
        return build() if image_token_id is None else build(image_token_id)

    def sam_config(self, source: str | None = None):  # -> SamConfig
        """SAM named by `source` (facebook/sam-vit-huge, "base", ...), else this pair's."""
        try:
            variant = sam_variant(source) if source else self.sam
        except ValueError:
            variant = self.sam
        return sam_vit_config(variant, self.sam_decoder_layer_norm_eps)


ARCHITECTURES: dict[str, Architecture] = {
    # BOS + "USER: " before the image; 64 text tokens per sample.
    "llava-1.5-7b": Architecture("llava-1.5-7b", 336, "base", None, 4, 64),
    # llava_v1: BOS, the system prompt and "USER:" (about 40 LLaMA tokens), <im_start>; the
    # explanatory models answer with a sentence after "[SEG].", so 128 text tokens.
    "lisa-7b": Architecture("lisa-7b", 224, "huge", LISA_SAM_DECODER_LAYER_NORM_EPS, 42, 128),
    "lisa-13b": Architecture("lisa-13b", 224, "huge", LISA_SAM_DECODER_LAYER_NORM_EPS, 42, 128),
}


def architecture(name: str) -> Architecture:
    """The named architecture; unknown names raise ValueError listing the known ones."""
    if name not in ARCHITECTURES:
        known = ", ".join(ARCHITECTURES)
        raise ValueError(f"unknown architecture {name!r}; choose one of: {known}")
    return ARCHITECTURES[name]
