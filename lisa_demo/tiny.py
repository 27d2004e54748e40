"""The tiny LISA architecture: a small LLaVA-1.5 and a small SAM, built locally, no download.

The folders written here use the standard Hugging Face layout (config, safetensors weights,
tokenizer, processor) and are loaded back through the same `from_pretrained` path as the real
models. Conventions follow llava-1.5 with one exception, the chat format: the tiny models put
the question before the image ("USER: ...\\n<image> ASSISTANT:"), so the image tokens can
attend to the question (trained from scratch, a small model learned to point at the asked-for
object far better this way: assets/tiny-lisa/README.md). `<image>` is expanded by the processor into
one token per patch, vision feature layer -2 and the "default" selection strategy (the CLS
token dropped). Widths are multiples of 64 so the bitsandbytes 4-bit CPU kernels run.

    python -m lisa_demo.tiny --out DIR     # writes DIR/llava and DIR/sam with random weights
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

from lisa_demo.config import IMAGE_TOKEN
from lisa_demo.paths import OUTPUT_FOLDER, check_cli_paths

TINY_SEED = 1234
CLIP_IMAGE_SIZE = 160
CLIP_PATCH = 20
SAM_IMAGE_SIZE = 256
SAM_PATCH = 16

# The llava-1.5 conversation format (the llava-hf template, written for our use).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# The tiny models' format: the question, then the image ("USER: {question}\n<image> ASSISTANT:").
QUESTION_FIRST_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + '\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image> ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Whole-word tokens: the question and answer templates and the words of the synthetic scenes.
# Any other text still tokenizes: unknown words fall back to characters, then to bytes.
_WORDS = """
user assistant can you please segment the in this image what is respond with output
segmentation mask it sure result a an of to and or that which one ones object objects shape
shapes thing things picture photo scene where find show me there here on at by from for as be
are was would could should will may might do does did has have had not no yes only just most
least more less than very also all any each other another both first second third left right
above below top bottom middle center centre near nearest closest farthest next beside between
under over leftmost rightmost topmost bottommost highest lowest upper lower side corner edge
small smaller smallest little tiny medium large larger largest big bigger biggest huge
red green blue yellow purple orange pink cyan brown gray grey black white magenta violet
circle circles square squares triangle triangles star stars hexagon hexagons cross crosses
heart hearts diamond diamonds ellipse oval rectangle ring disk disc
roll rolls rolling round corners corner sides side points pointed pointy sharp twinkle twinkles
night sky sign stop warning plus love kite ball wheel coin honeycomb cell box dice window
slope hill down up like looks look resembles used use could sit stack stable flat
color colour colors colours coloured colored sized size kind type unique single odd
""".split()


def tokenizer_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-fallback BPE vocabulary: specials, 256 bytes, characters, then whole words.

    Merges only grow a "▁"-prefixed token one character at a time, so no two merges compete
    inside a word and every listed word becomes a single token.
    """
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    chars = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!'\"-:;()[]/&%"
    for char in chars:
        vocab.setdefault(char, len(vocab))
    merges: list[tuple[str, str]] = []
    words = sorted({w for word in _WORDS for w in (word, word.capitalize(), word.upper())})
    for word in words:
        token = "▁"
        for char in word:
            if char not in vocab:
                break
            merged = token + char
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((token, char))
            token = merged
    return vocab, merges


def build_tokenizer(chat_template: str = QUESTION_FIRST_CHAT_TEMPLATE):  # -> LlamaTokenizer
    from transformers import LlamaTokenizer

    vocab, merges = tokenizer_vocabulary()
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.chat_template = chat_template
    return tokenizer


def _padded_vocab_size(n_tokens: int) -> int:
    return ((n_tokens + 63) // 64) * 64


def llava_config(vocab_size: int, image_token_id: int, pad_token_id: int):  # -> LlavaConfig
    from transformers import CLIPVisionConfig, LlamaConfig

    from lisa_demo.architectures import llava_1_5_conventions

    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=CLIP_PATCH,
        projection_dim=128,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
    )
    return llava_1_5_conventions(vision, text, image_token_id, pad_token_id)


def sam_config():  # -> SamConfig
    from transformers import (
        SamConfig,
        SamMaskDecoderConfig,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    hidden = 128
    vision = SamVisionConfig(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        mlp_dim=512,
        image_size=SAM_IMAGE_SIZE,
        patch_size=SAM_PATCH,
        output_channels=hidden,
        num_pos_feats=hidden // 2,
        window_size=8,
        global_attn_indexes=[1, 3],
        # transformers' default (1e-10) suits loading weights, not training from scratch:
        # near-zero weights make subnormal activations that are slow and barely learn.
        initializer_range=0.02,
    )
    prompt = SamPromptEncoderConfig(
        hidden_size=hidden,
        image_size=SAM_IMAGE_SIZE,
        patch_size=SAM_PATCH,
        image_embedding_size=SAM_IMAGE_SIZE // SAM_PATCH,
    )
    decoder = SamMaskDecoderConfig(
        hidden_size=hidden,
        num_attention_heads=4,
        mlp_dim=512,
        iou_head_hidden_dim=hidden,
    )
    return SamConfig(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder
    )


def build_processors(tokenizer):  # -> (LlavaProcessor, SamProcessor)
    from transformers import (
        CLIPImageProcessorPil,
        LlavaProcessor,
        SamImageProcessorPil,
        SamProcessor,
    )

    # No centre crop: the LLM sees the whole (squashed) image, as SAM does.
    clip = CLIPImageProcessorPil(
        size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
        crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
        do_center_crop=False,
    )
    llava_processor = LlavaProcessor(
        image_processor=clip,
        tokenizer=tokenizer,
        patch_size=CLIP_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    sam_image = SamImageProcessorPil(
        size={"longest_edge": SAM_IMAGE_SIZE},
        pad_size={"height": SAM_IMAGE_SIZE, "width": SAM_IMAGE_SIZE},
        mask_size={"longest_edge": SAM_IMAGE_SIZE // 4},
        mask_pad_size={"height": SAM_IMAGE_SIZE // 4, "width": SAM_IMAGE_SIZE // 4},
    )
    return llava_processor, SamProcessor(image_processor=sam_image)


def write_tiny_models(out: Path | str, seed: int = TINY_SEED) -> Path:
    """Build the random tiny LLaVA and SAM and save them to `out/llava` and `out/sam`."""
    import torch
    from transformers import LlavaForConditionalGeneration, SamModel

    out = Path(out)
    tokenizer = build_tokenizer()
    vocab_size = _padded_vocab_size(len(tokenizer))
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    llava_processor, sam_processor = build_processors(tokenizer)
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(
        llava_config(vocab_size, image_id, tokenizer.pad_token_id)
    )
    sam = SamModel(sam_config())
    # transformers draws SAM's random Fourier position features with std hidden_size // 2
    # (64 here); SAM itself uses std 1. At 64 neighbouring patches get unrelated phases, so a
    # model trained from scratch cannot tell where anything is (loaded weights override it).
    torch.nn.init.normal_(sam.shared_image_embedding.positional_embedding, std=1.0)
    llava.save_pretrained(out / "llava")
    llava_processor.save_pretrained(out / "llava")
    sam.save_pretrained(out / "sam")
    sam_processor.save_pretrained(out / "sam")
    return out


def _build_signature() -> str:
    """Changes whenever the tiny architecture code changes, so stale caches are rebuilt."""
    source = Path(__file__).read_bytes()
    import transformers

    return hashlib.sha256(source + transformers.__version__.encode()).hexdigest()[:16]


def cached_tiny_models() -> Path:
    """The random tiny models in a user cache folder, built once per architecture version."""
    root = Path(os.environ.get("LISA_CACHE_DIR", Path.home() / ".cache" / "lisa_studio"))
    folder = root / f"tiny-random-{_build_signature()}"
    marker = folder / "complete.json"
    if not marker.exists():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        write_tiny_models(tmp)
        (tmp / "complete.json").write_text(json.dumps({"seed": TINY_SEED}))
        try:
            tmp.rename(folder)
        except OSError:  # another process built it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=TINY_SEED)
    args = parser.parse_args(argv)
    if check_cli_paths(("--out", args.out, OUTPUT_FOLDER)):
        return 2
    write_tiny_models(args.out, args.seed)
    print(f"wrote {args.out / 'llava'} and {args.out / 'sam'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
