"""An independent reference of LISA's inference, for the converter's exactness tests.

It reads a checkpoint in LISA's own layout (the files the converter reads) and computes what
LISA's chat.py does, with none of this project's model, loading or tokenization code:
- ids: the slow tokenizer's rule (text split around added tokens, whitespace next to them
  stripped, each piece encoded by SentencePiece itself), LISA's `tokenizer_image_token` split
  at `<image>`;
- language side: transformers' `LlamaForCausalLM` and `CLIPVisionModel` composed by hand with
  the one-Linear projector (features of layer -2, CLS dropped, spliced where `<image>` was);
  greedy decoding without a KV cache (LISA's way: the whole sequence every step);
- masks: segment-anything's own modules (`Sam`, its `mask_decoder`, `postprocess_masks`), the
  post-norm state before each `[SEG]` through `text_hidden_fcs`, one sparse prompt each,
  segment-anything's resize-longest-side preprocessing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image

from lisa_demo.tiny_lisa import build_original_sam

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)


def load_source_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(folder.glob("pytorch_model-*.bin")):
        state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


class LisaTokenizer:
    """LISA's slow LLaMA tokenizer rule, on SentencePiece directly."""

    def __init__(self, folder: Path) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        self.added = json.loads((folder / "added_tokens.json").read_text())

    def encode(self, text: str, bos: bool) -> list[int]:
        pieces: list[str | int] = []
        rest = text
        while rest:
            hits = [(rest.find(t), -len(t), t) for t in self.added if t in rest]
            if not hits:
                pieces.append(rest)
                break
            at, _, token = min(hits)
            pieces += [rest[:at], self.added[token]]
            rest = rest[at + len(token) :]
        for i, piece in enumerate(pieces):  # strip whitespace next to each added token
            if isinstance(piece, int):
                if i > 0 and isinstance(pieces[i - 1], str):
                    pieces[i - 1] = pieces[i - 1].rstrip()
                if i + 1 < len(pieces) and isinstance(pieces[i + 1], str):
                    pieces[i + 1] = pieces[i + 1].lstrip()
        ids = [self.sp.bos_id()] if bos else []
        for piece in pieces:
            if isinstance(piece, int):
                ids.append(piece)
            elif piece:
                ids += self.sp.encode(piece)
        return ids

    def prompt(self, question: str) -> tuple[list[int], list[int]]:
        """LISA's chat prompt split at the image: (ids before, ids after)."""
        text = f"{SYSTEM} USER: <im_start><image><im_end>\n{question} ASSISTANT:"
        before, after = text.split("<image>")
        return self.encode(before, bos=True), self.encode(after, bos=False)


def sam_preprocess(image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """segment-anything's ResizeLongestSide(1024) + normalise + pad (LISA's chat.py)."""
    h, w = image.shape[:2]
    scale = 1024 / max(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    resized = np.array(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    x = torch.from_numpy(resized).permute(2, 0, 1).float()
    mean = torch.tensor([123.675, 116.28, 103.53])[:, None, None]
    std = torch.tensor([58.395, 57.12, 57.375])[:, None, None]
    x = (x - mean) / std
    x = torch.nn.functional.pad(x, (0, 1024 - new_w, 0, 1024 - new_h))
    return x[None], (new_h, new_w)


class LisaReference:
    def __init__(self, folder: Path) -> None:
        from transformers import (
            CLIPImageProcessorPil,
            CLIPVisionModel,
            LlamaConfig,
            LlamaForCausalLM,
        )

        config = json.loads((folder / "config.json").read_text())
        state = load_source_state(folder)
        self.tokenizer = LisaTokenizer(folder)
        self.seg_id = self.tokenizer.added["[SEG]"]
        self.eos_id = config["eos_token_id"]
        text = LlamaConfig(
            vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config["num_key_value_heads"],
            max_position_embeddings=config["max_position_embeddings"],
            rms_norm_eps=config["rms_norm_eps"], tie_word_embeddings=False,
        )  # fmt: skip
        self.llama = LlamaForCausalLM(text).eval()
        llama_state = {
            k: v
            for k, v in state.items()
            if (k.startswith(("model.layers", "model.embed_tokens", "model.norm", "lm_head")))
            and not k.endswith("inv_freq")
        }
        self.llama.load_state_dict(llama_state, strict=True)
        clip_dir = folder / config["mm_vision_tower"]
        self.clip = CLIPVisionModel.from_pretrained(clip_dir).eval()
        self.clip_processor = CLIPImageProcessorPil.from_pretrained(clip_dir)
        self.select_layer = config["mm_vision_select_layer"]
        hidden = config["hidden_size"]
        self.mm_projector = torch.nn.Linear(config["mm_hidden_size"], hidden)
        self.mm_projector.load_state_dict(
            {"weight": state["model.mm_projector.weight"], "bias": state["model.mm_projector.bias"]}
        )
        self.text_hidden_fcs = torch.nn.Sequential(
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, config["out_dim"]),
            torch.nn.Dropout(0.0),
        )
        self.text_hidden_fcs.load_state_dict(
            {
                k.removeprefix("model.text_hidden_fcs.0."): v
                for k, v in state.items()
                if k.startswith("model.text_hidden_fcs.0.")
            }
        )
        self.sam = build_original_sam()
        self.sam.load_state_dict(
            {
                k.removeprefix("model.visual_model."): v
                for k, v in state.items()
                if k.startswith("model.visual_model.")
            },
            strict=True,
        )
        self.sam.eval()

    @torch.no_grad()
    def image_features(self, image: np.ndarray) -> torch.Tensor:
        pixels = self.clip_processor(Image.fromarray(image), return_tensors="pt")["pixel_values"]
        out = self.clip(pixels, output_hidden_states=True)
        return self.mm_projector(out.hidden_states[self.select_layer][:, 1:])[0]

    def embeds(self, before, features, after) -> torch.Tensor:
        embed = self.llama.model.embed_tokens
        parts = [embed(torch.tensor(before)), features, embed(torch.tensor(after))]
        return torch.cat(parts)[None]

    @torch.no_grad()
    def prompt_logits(self, image: np.ndarray, question: str) -> torch.Tensor:
        """Logits at every position of the prompt [L, V]."""
        before, after = self.tokenizer.prompt(question)
        embeds = self.embeds(before, self.image_features(image), after)
        return self.llama(inputs_embeds=embeds, use_cache=False).logits[0]

    @torch.no_grad()
    def answer(self, image: np.ndarray, question: str, max_new_tokens: int) -> dict:
        before, after = self.tokenizer.prompt(question)
        features = self.image_features(image)
        generated: list[int] = []
        for _ in range(max_new_tokens):  # no KV cache: the whole sequence every step
            embeds = self.embeds(before, features, after + generated)
            token = int(self.llama(inputs_embeds=embeds, use_cache=False).logits[0, -1].argmax())
            if token == self.eos_id:
                break
            generated.append(token)
        # The post-norm last hidden state at the position before each [SEG].
        embeds = self.embeds(before, features, after + generated)
        states = self.llama.model(inputs_embeds=embeds, use_cache=False).last_hidden_state[0]
        start = len(before) + features.shape[0] + len(after)
        positions = [start + i - 1 for i, t in enumerate(generated) if t == self.seg_id]
        logits = self.mask_logits(image, states[positions]) if positions else None
        return {"tokens": generated, "mask_logits": logits}

    @torch.no_grad()
    def mask_logits(self, image: np.ndarray, seg_states: torch.Tensor) -> np.ndarray:
        """[n, H, W] mask logits at the original size (a mask is logits > 0)."""
        pixels, input_size = sam_preprocess(image)
        embeddings = self.sam.image_encoder(pixels)
        prompts = self.text_hidden_fcs(seg_states)
        sparse = prompts[:, None, :]
        dense = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            1, -1, *self.sam.prompt_encoder.image_embedding_size
        )
        low_res, _ = self.sam.mask_decoder(
            image_embeddings=embeddings,
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        full = self.sam.postprocess_masks(low_res, input_size, image.shape[:2])
        return full[:, 0].numpy()
