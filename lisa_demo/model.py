"""The LISA forward pass: LLaVA's `[SEG]` hidden states, projected into SAM's mask decoder.

Both upstream models are used unmodified: LLaVA runs as a whole, SAM is called part by part
(image encoder, the "no mask" dense prompt, the mask decoder with our sparse prompts).
This module does no I/O and never moves tensors to a device on its own.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from lisa_demo.config import LossWeights
from lisa_demo.losses import dice_per_mask, sigmoid_bce_per_mask


def build_projection(hidden_size: int, prompt_size: int) -> nn.Sequential:
    """LISA's "text_hidden_fcs": Linear(H, H) -> ReLU -> Linear(H, prompt_size)."""
    return nn.Sequential(
        nn.Linear(hidden_size, hidden_size),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_size, prompt_size),
    )


def seg_query_mask(input_ids: torch.Tensor, seg_token_id: int) -> torch.Tensor:
    """Positions whose hidden state predicts a `[SEG]` token (the `[SEG]` mask shifted left).

    input_ids: [B, L] long. Returns [B, L] bool, True at t where input_ids[t + 1] is `[SEG]`.
    """
    is_seg = input_ids == seg_token_id
    query = torch.zeros_like(is_seg)
    query[:, :-1] = is_seg[:, 1:]
    return query


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: positions whose logits predict a scored label (labels shifted left)."""
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != -100
    return scored


def bilinear_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """[out_size, in_size] float64: `F.interpolate(..., mode="bilinear", align_corners=False)`
    along one axis, to a given size, as a matrix (no antialiasing).

    Output pixel d samples the input at s = (d + 0.5) * in / out - 0.5, clamped at 0, and
    mixes pixels floor(s) and floor(s) + 1 (the last one at the border) with weights
    1 - (s - floor(s)) and s - floor(s), as PyTorch does.
    """
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = src - low
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    matrix.index_put_((rows, low), 1 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix


def _axis_matrix(low: int, pad_size: int, kept: int, out: int, device: str) -> torch.Tensor:
    """[out, low] float32: one axis of SAM's post-processing (bilinear to pad_size, keep the
    first `kept`, bilinear to `out`) as one matrix; sides up to 2048 are kept (LRU)."""
    if out <= 2048:
        return _cached_axis_matrix(low, pad_size, kept, out, device)
    return _build_axis_matrix(low, pad_size, kept, out, device)


def _build_axis_matrix(low: int, pad_size: int, kept: int, out: int, device: str) -> torch.Tensor:
    # Normal tensors even when first built under inference_mode: the cache serves training.
    with torch.inference_mode(False), torch.no_grad():
        matrix = bilinear_matrix(out, kept) @ bilinear_matrix(pad_size, low)[:kept]
        return matrix.to(device=torch.device(device), dtype=torch.float32)


# At most 512 matrices of at most 2048 x 64 floats (512 KiB; a 300-pixel side is 75 KiB).
_cached_axis_matrix = functools.lru_cache(maxsize=512)(_build_axis_matrix)


def upsample_mask_logits(
    low_res: torch.Tensor,
    pad_size: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> torch.Tensor:
    """SAM's low-resolution logits back to the original image.

    low_res: [n, h, w] logits for a padded square of side `pad_size`; `input_size` is the
    resized image inside that square (before padding); `original_size` is (H, W).
    Returns [n, H, W] logits.

    The same as SAM's post-processing: bilinear (align_corners=False) to pad_size x pad_size,
    crop to input_size, bilinear to original_size. Each of these is linear along each axis,
    so they run as two small matrix products (rows [H, h] @ logits @ columns [W, w]^T),
    equal to the F.interpolate chain up to float rounding; in training their backward is
    two matrix products too, where F.interpolate's backward on a CPU took about 1.4 ms per
    mask (6% of a fine-tuning step of the tiny model).
    """
    device = str(low_res.device)
    rows = _axis_matrix(
        low_res.shape[-2], pad_size, int(input_size[0]), int(original_size[0]), device
    )
    columns = _axis_matrix(
        low_res.shape[-1], pad_size, int(input_size[1]), int(original_size[1]), device
    )
    return rows @ low_res.float() @ columns.T


def hard_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded masks with {0, 1} targets, per mask, without gradient. -> [n]"""
    with torch.no_grad():
        pred = logits > 0
        truth = targets > 0.5
        inter = (pred & truth).flatten(1).sum(1).float()
        union = (pred | truth).flatten(1).sum(1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@dataclass
class LisaOutput(ModelOutput):
    """One forward pass. Mask lists hold one entry per sample, masks at original size.

    A ModelOutput (a dict underneath) so DistributedDataParallel finds the output tensors.
    """

    loss: torch.Tensor | None = None  # weighted sum of the terms below (with labels)
    ce_loss: torch.Tensor | None = None
    bce_loss: torch.Tensor | None = None
    dice_loss: torch.Tensor | None = None
    iou_loss: torch.Tensor | None = None  # only with loss_weights.iou > 0
    mask_logits: list[torch.Tensor] | None = None  # each [n_i, H_i, W_i]
    scores: list[torch.Tensor] | None = None  # each [n_i], SAM's predicted IoU
    mask_count: int | None = None
    seg_states: torch.Tensor | None = None  # [n, H] last-layer states predicting each [SEG]
    prompts: list[torch.Tensor] | None = None  # each [n_i, P], those states projected


class LisaModel(nn.Module):
    """LLaVA + projection + SAM (the paper's Figure 2). `llava` may be a peft-wrapped model.

    Losses: text cross-entropy on the answer, per-pixel BCE and Dice on each `[SEG]`'s mask,
    and, as an option that LISA does not have, an MSE teaching SAM's IoU head the true IoU.
    """

    def __init__(
        self,
        llava: nn.Module,
        sam: nn.Module,
        seg_token_id: int,
        hidden_size: int,
        loss_weights: LossWeights | None = None,
        train_sam_encoder: bool = False,
    ) -> None:
        super().__init__()
        self.llava = llava
        self.sam = sam
        self.seg_token_id = seg_token_id
        self.loss_weights = loss_weights or LossWeights()
        self.train_sam_encoder = train_sam_encoder
        prompt_size = sam.config.mask_decoder_config.hidden_size
        self.text_hidden_fcs = build_projection(hidden_size, prompt_size)
        self.sam_pad_size = sam.config.vision_config.image_size

    # SAM side ---------------------------------------------------------------------------
    def encode_images(self, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        """SAM image embeddings [B, C, h, w] from padded pixels [B, 3, S, S], on the pixels'
        device (the encoder runs where its weights are: on the CPU once offloaded)."""
        encoder = self.sam.vision_encoder
        weight = next(encoder.parameters())
        with torch.set_grad_enabled(self.train_sam_encoder and torch.is_grad_enabled()):
            pixels = sam_pixel_values.to(weight.device, weight.dtype)
            return encoder(pixels).last_hidden_state.to(sam_pixel_values.device)

    def decode_masks(
        self,
        prompts: Sequence[torch.Tensor],
        image_embeddings: torch.Tensor,
        input_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One mask per prompt vector.

        prompts: per sample [n_i, P] projected `[SEG]` states; image_embeddings: [B, C, h, w].
        Returns per sample logits [n_i, H_i, W_i] and SAM's predicted IoU [n_i].
        """
        sam = self.sam
        decoder_dtype = next(sam.mask_decoder.parameters()).dtype
        counts = [int(p.shape[0]) for p in prompts]
        low_res = iou = None
        if sum(counts):
            # One decoder call for every prompt of the batch: each prompt is its own row
            # (point_batch 1) with its image's embeddings, which is what SAM's decoder does
            # inside for several prompts of one image.
            rows = torch.repeat_interleave(
                torch.arange(len(counts), device=image_embeddings.device),
                torch.tensor(counts, device=image_embeddings.device),
            )
            sparse = torch.cat(list(prompts)).to(decoder_dtype)
            positional = sam.get_image_wide_positional_embeddings().to(decoder_dtype)
            _, dense = sam.prompt_encoder(None, None, None, None)
            low_res, iou = sam.mask_decoder(
                image_embeddings=image_embeddings.to(decoder_dtype).index_select(0, rows),
                image_positional_embeddings=positional.expand(len(rows), -1, -1, -1),
                sparse_prompt_embeddings=sparse.view(len(rows), 1, 1, -1),
                dense_prompt_embeddings=dense.to(decoder_dtype).expand(len(rows), -1, -1, -1),
                multimask_output=False,
            )
        masks: list[torch.Tensor] = []
        scores: list[torch.Tensor] = []
        start = 0
        for i, n in enumerate(counts):
            if n == 0:
                height, width = original_sizes[i]
                masks.append(image_embeddings.new_zeros((0, height, width), dtype=torch.float32))
                scores.append(image_embeddings.new_zeros((0,), dtype=torch.float32))
                continue
            logits = upsample_mask_logits(
                low_res[start : start + n, 0, 0], self.sam_pad_size, input_sizes[i],
                original_sizes[i],
            )  # fmt: skip
            masks.append(logits)
            scores.append(iou[start : start + n, 0, 0].float())
            start += n
        return masks, scores

    # LLaVA side -------------------------------------------------------------------------
    @property
    def base_llava(self) -> nn.Module:
        """The transformers LLaVA under any peft wrapper (LoRA layers live inside it)."""
        llava = self.llava
        return llava.get_base_model() if hasattr(llava, "get_base_model") else llava

    def encode_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """LLaVA's projected vision features [B, N, D] (the rows that replace `<image>`)."""
        llava = self.base_llava
        dtype = next(llava.model.vision_tower.parameters()).dtype
        features = llava.get_image_features(
            pixel_values=pixel_values.to(dtype), return_dict=True
        ).pooler_output
        return features if torch.is_tensor(features) else torch.stack(list(features))

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, H] `[SEG]` hidden states -> [n, P] sparse prompt embeddings."""
        weight = self.text_hidden_fcs[0].weight
        return self.text_hidden_fcs(hidden.to(weight.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        input_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]],
        labels: torch.Tensor | None = None,
        image_embeddings: torch.Tensor | None = None,
        sam_pixel_values: torch.Tensor | None = None,
        gt_masks: Sequence[torch.Tensor] | None = None,
        image_features: torch.Tensor | None = None,
    ) -> LisaOutput:
        """Teacher-forced pass: text loss, one mask per `[SEG]` and, with gt_masks, mask losses.

        input_ids, attention_mask, labels: [B, L]; pixel_values: [B, 3, h, w] (CLIP);
        image_embeddings: [B, C, h', w'] cached SAM embeddings, or sam_pixel_values
        [B, 3, S, S] to compute them; gt_masks: per sample [n_i, H_i, W_i] in {0, 1};
        image_features: [B, N, D] cached LLaVA vision features (encode_image_features), used
        instead of pixel_values (only valid while the vision tower and projector are frozen).
        """
        if image_embeddings is None:
            if sam_pixel_values is None:
                raise ValueError("pass image_embeddings or sam_pixel_values")
            image_embeddings = self.encode_images(sam_pixel_values)
        llava_dtype = self.llava.get_input_embeddings().weight.dtype
        # Vocabulary logits only where a label is scored (the answer tokens): the [B, L, V]
        # tensor over prompt and image positions is most of the LM head's memory.
        scored = None if labels is None else answer_positions(labels)
        if image_features is None and pixel_values is None:
            raise ValueError("pass pixel_values or image_features")
        if image_features is not None:
            features = BaseModelOutputWithPooling(
                pooler_output=list(image_features.to(llava_dtype).unbind(0))
            )
            vision = {"mm_encoder_outputs": {"image": features}}
        else:
            vision = {"pixel_values": pixel_values.to(llava_dtype)}
        out = self.llava(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **vision,
            output_hidden_states=True,
            return_dict=True,
            logits_to_keep=scored if scored is not None else 1,
        )
        ce_loss = None
        if labels is not None:
            targets = labels[:, 1:][scored[:, :-1]]
            ce_loss = (
                F.cross_entropy(out.logits.float(), targets)
                if targets.numel()
                else out.logits.sum() * 0.0
            )
        last_hidden = out.hidden_states[-1]  # after the final norm
        query = seg_query_mask(input_ids, self.seg_token_id)
        # One projection call over every sample's [SEG] states, then split back per sample.
        counts = query.sum(dim=1).tolist()
        seg_states = last_hidden[query]
        prompts = list(self.project(seg_states).split(counts))
        mask_logits, scores = self.decode_masks(
            prompts, image_embeddings, input_sizes, original_sizes
        )
        result = LisaOutput(
            mask_logits=mask_logits,
            scores=scores,
            mask_count=sum(int(m.shape[0]) for m in mask_logits),
            ce_loss=ce_loss,
            seg_states=seg_states,
            prompts=prompts,
        )
        if gt_masks is not None:
            self._add_losses(result, gt_masks)
        return result

    def _add_losses(self, result: LisaOutput, gt_masks: Sequence[torch.Tensor]) -> None:
        bce_terms, dice_terms, iou_terms = [], [], []
        pairs = zip(result.mask_logits, result.scores, gt_masks, strict=True)
        for logits, scores, target in pairs:
            if logits.shape[0] != target.shape[0]:
                raise ValueError(
                    f"{logits.shape[0]} [SEG] tokens but {target.shape[0]} ground-truth masks"
                )
            if logits.shape[0]:
                target = target.to(logits.device, logits.dtype)
                bce_terms.append(sigmoid_bce_per_mask(logits, target))
                dice_terms.append(dice_per_mask(logits, target))
                iou_terms.append((scores - hard_iou(logits, target)) ** 2)
        w = self.loss_weights
        ce = result.ce_loss
        if bce_terms:
            result.bce_loss = torch.cat(bce_terms).mean()
            result.dice_loss = torch.cat(dice_terms).mean()
        else:
            zero = ce * 0.0 if ce is not None else torch.zeros(())
            result.bce_loss = zero
            result.dice_loss = zero
        loss = w.bce * result.bce_loss + w.dice * result.dice_loss
        if w.iou and iou_terms:
            result.iou_loss = torch.cat(iou_terms).mean()
            loss = loss + w.iou * result.iou_loss
        result.loss = loss + w.ce * ce if ce is not None else loss
