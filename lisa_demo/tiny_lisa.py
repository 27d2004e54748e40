"""A tiny random LISA checkpoint in the layout of the published ones, for trying the converter.

    python -m lisa_demo.tiny_lisa --out data/tiny-lisa-src [--layout 7b|13b] [--shards bin]
    python -m lisa_demo.convert --lisa data/tiny-lisa-src --out models/tiny-lisa-v1

What it writes mirrors xinlai/LISA-7B-v1 (or, with `--layout 13b`, LISA-13B-llama2-v1) at toy
size: LISA's `config.json` keys, its state-dict names (LLaMA's own, `model.mm_projector` as one
Linear, `model.visual_model.*` with segment-anything's original parameter names,
`model.text_hidden_fcs.0.{0,2}`, rotary `inv_freq` buffers), weight shards with an index, and
a slow LLaMA tokenizer (a SentencePiece model plus LISA's added tokens). The CLIP tower is not
part of a LISA checkpoint: a tiny one is written to `clip/` beside the weights and the config
names it, as the real config names openai/clip-vit-large-patch14.

The weights are random: the model answers nonsense, but every tensor takes LISA's path, so the
converted model can be compared with LISA's computation number for number. The language and
SAM modules are built with transformers' LlamaForCausalLM and segment-anything's own modules, so
the names are theirs, not this project's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from lisa_demo.paths import OUTPUT_FOLDER, check_cli_paths

TINY_LISA_SEED = 0
SP_VOCAB = 320
# LISA-7B-v1: <im_patch>, <im_start>, <im_end>, [SEG] after the base vocabulary.
# LISA-13B-llama2-v1: [SEG], <im_start>, <im_end> (no <im_patch>).
ADDED_TOKENS = {
    "7b": ("<im_patch>", "<im_start>", "<im_end>", "[SEG]"),
    "13b": ("[SEG]", "<im_start>", "<im_end>"),
}
TEXT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2)
CLIP_IMAGE_SIZE = 224  # LISA's CLIP resolution: 16 x 16 = 256 image tokens
# ViT-B-like width at four blocks: the image encoder costs several times the full-size mask
# decoder, as in every real SAM (ViT-H: hundreds of times), so the caches show their worth.
SAM_ENCODER = dict(depth=4, embed_dim=128, num_heads=2, global_attn_indexes=(1, 3), window_size=14)
OUT_DIM = 256  # SAM's prompt width; LISA's config calls it out_dim

_CORPUS = (
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What is in this image? ASSISTANT: Sure, it is the cat on the left.",
    "Please segment the red circle in this image. Please respond with segmentation mask.",
    "Sure, the segmentation result is here. It is the dog next to the door.",
    "Can you segment the food that is rich in vitamin C? Which part would you hold?",
)


def segment_anything_modeling():
    """segment-anything's `modeling` subpackage, imported without the package's __init__
    (which imports torchvision for its predictor)."""
    if "segment_anything.modeling" in sys.modules:
        return sys.modules["segment_anything.modeling"]
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segment-anything is not installed: pip install segment-anything")
    package = sys.modules.get("segment_anything")
    if package is None or not hasattr(package, "__path__"):
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = package
    import segment_anything.modeling as modeling

    return modeling


def build_original_sam(seed: int = TINY_LISA_SEED) -> torch.nn.Module:
    """A tiny SAM made of segment-anything's own modules (1024 px input, 256-d prompts)."""
    sam = segment_anything_modeling()
    torch.manual_seed(seed)
    encoder = sam.ImageEncoderViT(
        img_size=1024,
        patch_size=16,
        mlp_ratio=4.0,
        out_chans=OUT_DIM,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        **SAM_ENCODER,
    )
    model = sam.Sam(
        image_encoder=encoder,
        prompt_encoder=sam.PromptEncoder(
            embed_dim=OUT_DIM,
            image_embedding_size=(64, 64),
            input_image_size=(1024, 1024),
            mask_in_chans=16,
        ),
        mask_decoder=sam.MaskDecoder(
            num_multimask_outputs=3,
            transformer=sam.TwoWayTransformer(
                depth=2, embedding_dim=OUT_DIM, mlp_dim=2048, num_heads=8
            ),
            transformer_dim=OUT_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    # segment-anything initialises rel_pos tables to zero and LayerNorms to 1/0; random values
    # make every tensor matter in a comparison.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rel_pos" in name or name.endswith(("norm1.weight", "norm2.weight")):
                param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def write_tokenizer(out: Path, layout: str) -> dict[str, int]:
    """A slow LLaMA tokenizer: SentencePiece BPE with byte fallback (LLaMA's settings) and
    LISA's added tokens in added_tokens.json. Returns the added tokens' ids."""
    import sentencepiece as spm

    prefix = out / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(_CORPUS) * 8),
        model_prefix=str(prefix),
        vocab_size=SP_VOCAB,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (out / "tokenizer.vocab").unlink()
    added = {token: SP_VOCAB + i for i, token in enumerate(ADDED_TOKENS[layout])}
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2))
    token = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": "<s>", **token},
        "eos_token": {"__type": "AddedToken", "content": "</s>", **token},
        "unk_token": {"__type": "AddedToken", "content": "<unk>", **token},
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return added


def write_clip(out: Path, seed: int) -> None:
    """A tiny CLIP vision tower at 224 px, patch 14, with its image processor."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed + 1)
    config = CLIPVisionConfig(
        **CLIP, image_size=CLIP_IMAGE_SIZE, patch_size=14, hidden_act="quick_gelu"
    )
    CLIPVisionModel(config).save_pretrained(out)
    CLIPImageProcessorPil(
        size={"shortest_edge": CLIP_IMAGE_SIZE},
        crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
    ).save_pretrained(out)


def lisa_state_dict(layout: str, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of a LISA checkpoint, under LISA's names."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=vocab, **TEXT, num_key_value_heads=TEXT["num_attention_heads"],
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    llama = LlamaForCausalLM(text)
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    hidden, head_dim = TEXT["hidden_size"], TEXT["hidden_size"] // TEXT["num_attention_heads"]
    # transformers 4.31 saved LLaMA's rotary inverse frequencies with the weights.
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for i in range(TEXT["num_hidden_layers"]):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    state["model.mm_projector.weight"] = torch.randn(hidden, CLIP["hidden_size"]) * 0.05
    state["model.mm_projector.bias"] = torch.randn(hidden) * 0.02
    for name, tensor in build_original_sam(seed).state_dict().items():
        state[f"model.visual_model.{name}"] = tensor.clone()
    state["model.text_hidden_fcs.0.0.weight"] = torch.randn(hidden, hidden) * 0.05
    state["model.text_hidden_fcs.0.0.bias"] = torch.randn(hidden) * 0.02
    state["model.text_hidden_fcs.0.2.weight"] = torch.randn(OUT_DIM, hidden) * 0.05
    state["model.text_hidden_fcs.0.2.bias"] = torch.randn(OUT_DIM) * 0.02
    return state


def lisa_config(layout: str, vocab: int, clip: str) -> dict:
    """config.json as LISA's training code saves it (LlavaConfig of LISA's LLaVA fork)."""
    return {
        "architectures": ["LISAForCausalLM"],
        "model_type": "llava",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        **TEXT,
        "num_key_value_heads": TEXT["num_attention_heads"],
        "initializer_range": 0.02,
        "max_position_embeddings": 2048,
        "max_sequence_length": 2048,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.31.0",
        "use_cache": False,
        "vocab_size": vocab,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "square",
        "image_grid_pinpoints": None,
        "mm_hidden_size": CLIP["hidden_size"],
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": True,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": clip,
        "vision_tower": clip,
        "out_dim": OUT_DIM,
        "train_mask_decoder": True,
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }


def write_shards(state: dict[str, torch.Tensor], out: Path, kind: str, n: int = 2) -> None:
    """`n` shards plus the index, as pickled .bin (what LISA published) or safetensors."""
    names = list(state)
    per = -(-len(names) // n)
    weight_map = {}
    for i in range(n):
        part = {k: state[k].contiguous() for k in names[i * per : (i + 1) * per]}
        if kind == "bin":
            file = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
            torch.save(part, out / file)
        else:
            file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = "pytorch_model.bin.index.json" if kind == "bin" else "model.safetensors.index.json"
    body = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / index).write_text(json.dumps(body, indent=2))


def write_tiny_lisa(
    out: Path | str, layout: str = "7b", shards: str = "bin", seed: int = TINY_LISA_SEED
) -> Path:
    """Write the tiny random LISA checkpoint to `out` (created; must not exist or be empty)."""
    out = Path(out)
    if layout not in ADDED_TOKENS:
        raise ValueError(f"layout must be one of {sorted(ADDED_TOKENS)}, got {layout!r}")
    out.mkdir(parents=True, exist_ok=True)
    added = write_tokenizer(out, layout)
    vocab = SP_VOCAB + len(added)
    write_clip(out / "clip", seed)
    (out / "config.json").write_text(json.dumps(lisa_config(layout, vocab, "clip"), indent=2))
    write_shards(lisa_state_dict(layout, vocab, seed), out, shards)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lisa_demo.tiny_lisa", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="folder to write")
    parser.add_argument("--layout", choices=sorted(ADDED_TOKENS), default="7b")
    parser.add_argument("--shards", choices=("bin", "safetensors"), default="bin")
    parser.add_argument("--seed", type=int, default=TINY_LISA_SEED)
    args = parser.parse_args(argv)
    if check_cli_paths(("--out", args.out, OUTPUT_FOLDER)):
        return 2
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        print(f"error: {args.out} exists and is not an empty folder", file=sys.stderr)
        return 2
    from lisa_demo.loading import quiet_library_output

    quiet_library_output()
    try:
        write_tiny_lisa(args.out, args.layout, args.shards, args.seed)
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote a tiny random LISA ({args.layout} layout) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
