"""Three ways to hold less GPU memory in a QLoRA fine-tune without changing what it trains.

Each is an option of ModelConfig that the memory estimator knows (lisa_demo.memory):

- ``lean_token_rows``: peft trains the ``[SEG]`` rows of ``embed_tokens`` and ``lm_head`` by
  building, at every forward pass, a full copy of each matrix with those rows replaced
  (``index_copy``), and ``F.linear`` keeps lm_head's copy for the backward pass and computes its
  full [V, h] gradient there. :class:`LeanTrainableTokensLayer` computes the same values from the
  frozen matrix and the few trained rows: the base logits with the trained rows' logits written
  over them, and the base embeddings with the trained rows' embeddings written over them. Same
  parameters and names (checkpoints are unchanged), no [V, h] tensor is ever made.
- ``vision_quantization``: CLIP's vision tower is frozen in every fine-tune; its Linear layers
  can be held by bitsandbytes in 8-bit (LLM.int8, outliers kept in 16 bits) or 4-bit NF4.
  :func:`quantize_linears` replaces them in place, from the loaded weights.
- ``offload_sam_encoder``: in training, SAM's image encoder only fills the embedding cache.
  :func:`encode_all` fills it for every image up front, after which :func:`offload` moves the
  encoder to the CPU (``LisaModel.encode_images`` runs it wherever it is and returns the
  embeddings on the input's device).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from torch import nn


# [SEG] rows without merged copies -------------------------------------------------------------
class LeanTrainableTokensLayer(TrainableTokensLayer):
    """peft's TrainableTokensLayer with the same outputs computed without a merged matrix."""

    def forward_adapters(self, x: torch.Tensor, active_adapters, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        lean = (
            not self.disable_adapters
            and active_adapters
            and not self.merged
            and (isinstance(base, nn.Linear) or _plain_embedding(self, base))
        )
        if not lean:
            return super().forward_adapters(x, active_adapters, *args, **kwargs)
        self._check_overlapping_tokens(active_adapters)
        result = base(x, *args, **kwargs)
        for name in active_adapters:
            if name not in self.token_indices:
                continue
            index = torch.tensor(self.token_indices[name], device=result.device)
            rows = self.trainable_tokens_delta[name].to(base.weight.dtype)
            if isinstance(base, nn.Linear):  # lm_head: the trained rows' logits
                result = result.index_copy(-1, index, F.linear(x, rows).to(result.dtype))
            else:  # embed_tokens: the trained rows where their ids occur
                match = x[..., None] == index  # [..., n]
                found = match.any(-1, keepdim=True)
                picked = rows[match.to(torch.int64).argmax(-1)].to(result.dtype)
                result = torch.where(found, picked, result)
        return result


def _plain_embedding(layer: TrainableTokensLayer, base: nn.Module) -> bool:
    """An nn.Embedding whose forward is F.embedding alone (no scale, no max_norm)."""
    return (
        isinstance(base, nn.Embedding)
        and base.max_norm is None
        and layer._get_embed_scale() is None
    )


def use_lean_token_rows(model: nn.Module) -> int:
    """Give every TrainableTokensLayer of a peft model the lean forward; returns how many.
    The class changes, the module and its parameters stay (state dicts are unchanged)."""
    changed = 0
    for module in model.modules():
        if type(module) is TrainableTokensLayer:
            module.__class__ = LeanTrainableTokensLayer
            changed += 1
    return changed


# A quantized frozen CLIP tower -------------------------------------------------------------------
def _quiet_int8_cast(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def quantize_linears(module: nn.Module, kind: str, compute_dtype: torch.dtype) -> int:
    """Replace every nn.Linear inside `module` by a frozen bitsandbytes layer holding the same
    weights in `kind` ("8bit": LLM.int8 with outlier threshold 6, as transformers loads 8-bit;
    "4bit": NF4 with double quantization). Each layer is quantized on its weight's device.
    Returns the number of layers replaced."""
    import bitsandbytes as bnb

    if kind not in ("8bit", "4bit"):
        raise ValueError(f"quantization kind must be 8bit or 4bit, got {kind!r}")
    if kind == "8bit":  # bitsandbytes logs this at every call in a compute dtype but fp16
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_quiet_int8_cast)
    targets = [(name, m) for name, m in module.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        weight = linear.weight.detach()
        device = weight.device
        if kind == "4bit":
            layer = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, bias=linear.bias is not None,
                compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                device="meta",
            )  # fmt: skip
            if not weight.is_meta:  # on the meta device the layer stays empty
                layer.weight = bnb.nn.Params4bit(
                    weight.to(compute_dtype), requires_grad=False, quant_type="nf4",
                    compress_statistics=True,
                ).to(device)  # fmt: skip
        else:
            layer = bnb.nn.Linear8bitLt(
                linear.in_features, linear.out_features, bias=linear.bias is not None,
                has_fp16_weights=False, threshold=6.0, device="meta",
            )  # fmt: skip
            if not weight.is_meta:  # bitsandbytes quantizes int8 on the way from the CPU
                layer.weight = bnb.nn.Int8Params(
                    weight.to("cpu"), requires_grad=False, has_fp16_weights=False
                ).to(device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
        layer.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer)
    return len(targets)


# SAM's image encoder off the GPU ---------------------------------------------------------------
def encode_all(
    batches: Iterable[dict], cache, encode: Callable[[torch.Tensor], torch.Tensor], device
) -> int:
    """Fill `cache` (an EmbeddingCache) with the SAM embedding of every image of `batches`
    (dicts with "image_keys" and "sam_pixel_values"); returns how many were encoded."""
    before = cache.misses
    for batch in batches:
        cache.embeddings(batch, encode, device)
    return cache.misses - before


def offload(module: nn.Module) -> None:
    """Move `module` (SAM's image encoder) to the CPU and return its GPU memory to the card."""
    was_cuda = any(p.is_cuda for p in module.parameters())
    module.to("cpu")
    if was_cuda:
        torch.cuda.empty_cache()
