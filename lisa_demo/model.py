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
from lisa_demo.data.synthetic import DESCRIPTION_CLASSES
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


def pointing_cross_entropy(log_image: torch.Tensor, cover: torch.Tensor) -> torch.Tensor | None:
    """Mean over rows of -sum(share * log attention), share = cover normalised to sum 1.

    log_image, cover: [n, N] (LisaModel.pointing_attention). Rows with an empty target are
    skipped; None when none is left.
    """
    total = cover.sum(1)
    keep = total > 0
    if not keep.any():
        return None
    share = cover[keep] / total[keep, None]
    return -(share * log_image[keep]).sum(1).mean()


@dataclass
class LisaOutput(ModelOutput):
    """One forward pass. Mask lists hold one entry per sample, masks at original size.

    A ModelOutput (a dict underneath) so DistributedDataParallel finds the output tensors.
    """

    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    bce_loss: torch.Tensor | None = None
    dice_loss: torch.Tensor | None = None
    iou_loss: torch.Tensor | None = None
    seg_word_loss: torch.Tensor | None = None
    point_loss: torch.Tensor | None = None
    prompt_loss: torch.Tensor | None = None
    target_loss: torch.Tensor | None = None
    pointing_loss: torch.Tensor | None = None
    mask_logits: list[torch.Tensor] | None = None  # each [n_i, H_i, W_i]
    scores: list[torch.Tensor] | None = None  # each [n_i], SAM's predicted IoU
    mask_count: int | None = None


class DescriptionPrompts(nn.Module):
    """A prompt for SAM from an object's description: the sum of one learned vector per
    kind, colour, size and region (the SAM warm-up teaches SAM to segment the object so
    described)."""

    def __init__(self, prompt_size: int) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(n, prompt_size) for n in DESCRIPTION_CLASSES)
        for table in self.tables:
            nn.init.normal_(table.weight, std=0.5)

    def forward(self, classes: torch.Tensor) -> torch.Tensor:
        """[n, 4] (kind, colour, size, region) indices -> [n, P] prompts."""
        return sum(table(classes[:, i]) for i, table in enumerate(self.tables))


class LisaModel(nn.Module):
    """LLaVA + projection + SAM. `llava` may be a peft-wrapped model."""

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
        # Training-only auxiliary head (loss_weights.seg_words); never exported.
        self.seg_word_head: nn.Linear | None = None
        if self.loss_weights.seg_words > 0:
            vocab_size = llava.get_input_embeddings().weight.shape[0]
            self.seg_word_head = nn.Linear(hidden_size, vocab_size)
        # Training-only (loss_weights.target, synthetic scenes); never exported.
        self.target_head: nn.Linear | None = None
        self.description_prompts: DescriptionPrompts | None = None
        if self.loss_weights.target > 0:
            self.target_head = nn.Linear(hidden_size, sum(DESCRIPTION_CLASSES))
            self.description_prompts = DescriptionPrompts(prompt_size)
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

    def click_prompts(self, points: torch.Tensor) -> torch.Tensor:
        """[n, 2] (x, y) clicks in SAM's padded input frame -> [n, P] one-token sparse prompts.

        SAM's own embedding of a positive click (random Fourier features of the position plus
        the "positive point" embedding), without the padding token SAM adds for point-only
        prompts, so a click and a projected `[SEG]` state are prompts of the same form.
        """
        encoder = self.sam.prompt_encoder
        size = float(self.sam_pad_size)
        coords = (points.float() + 0.5).view(1, 1, -1, 2)  # SAM shifts to the pixel centre
        features = encoder.shared_embedding(coords, (size, size))[0, 0]
        return features + encoder.point_embed[1].weight

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

    def mask_query_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """[n, H] last-layer (post-norm) states at every `[SEG]` query position of the batch,
        in batch order: what `project` turns into prompts (for diagnostics and probes)."""
        llava_dtype = self.llava.get_input_embeddings().weight.dtype
        out = self.llava(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values.to(llava_dtype),
            output_hidden_states=True,
            return_dict=True,
            logits_to_keep=1,
        )
        return out.hidden_states[-1][seg_query_mask(input_ids, self.seg_token_id)]

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
        click_points: Sequence[torch.Tensor] | None = None,
        target_classes: Sequence[torch.Tensor] | None = None,
    ) -> LisaOutput:
        """Teacher-forced pass: text loss, one mask per `[SEG]` and, with gt_masks, mask losses.

        input_ids, attention_mask, labels: [B, L]; pixel_values: [B, 3, h, w] (CLIP);
        image_embeddings: [B, C, h', w'] cached SAM embeddings, or sam_pixel_values
        [B, 3, S, S] to compute them; gt_masks: per sample [n_i, H_i, W_i] in {0, 1};
        image_features: [B, N, D] cached LLaVA vision features (encode_image_features), used
        instead of pixel_values (only valid while the vision tower and projector are frozen).
        click_points: per sample [n_i, 2] clicks inside each target (SAM input frame), for the
        pretraining-only click losses (loss_weights.point / .prompt).
        target_classes: per sample [n_i, 4] (kind, colour, size, region) of each target, -1
        where unknown, for the pretraining-only target losses (loss_weights.target).
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
        pointing = self.loss_weights.pointing > 0 and self.training and gt_masks is not None
        captured: dict = {}
        hook = self._capture_last_attention_inputs(captured) if pointing else None
        if image_features is not None:
            features = BaseModelOutputWithPooling(
                pooler_output=list(image_features.to(llava_dtype).unbind(0))
            )
            vision = {"mm_encoder_outputs": {"image": features}}
        else:
            vision = {"pixel_values": pixel_values.to(llava_dtype)}
        try:
            out = self.llava(
                input_ids=input_ids,
                attention_mask=attention_mask,
                **vision,
                output_hidden_states=True,
                return_dict=True,
                logits_to_keep=scored if scored is not None else 1,
            )
        finally:
            if hook is not None:
                hook.remove()
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
        )
        if labels is not None and self.seg_word_head is not None and self.training:
            result.seg_word_loss = self.seg_word_loss(seg_states, input_ids, labels)
        if target_classes is not None and self.target_head is not None and self.training:
            result.target_loss = self.target_loss(seg_states, torch.cat(list(prompts)),
                                                  target_classes)  # fmt: skip
        if pointing and captured:
            result.pointing_loss = self.pointing_loss(captured, input_ids, attention_mask,
                                                      gt_masks)  # fmt: skip
        if gt_masks is not None:
            self._add_losses(result, gt_masks)
            if click_points is not None and self.training:
                self._add_click_losses(
                    result, prompts, click_points, gt_masks, image_embeddings, input_sizes,
                    original_sizes,
                )  # fmt: skip
        return result

    def _add_click_losses(
        self, result: LisaOutput, prompts, click_points, gt_masks, image_embeddings,
        input_sizes, original_sizes,
    ) -> None:  # fmt: skip
        """SAM segments each target from a click inside it; [SEG] prompts move towards it."""
        w = self.loss_weights
        clicks = [self.click_prompts(p.to(image_embeddings.device)) for p in click_points]
        extra = 0.0
        if w.point:
            logits, _ = self.decode_masks(clicks, image_embeddings, input_sizes, original_sizes)
            terms = [
                w.bce * sigmoid_bce_per_mask(lg, t.to(lg.device, lg.dtype))
                + w.dice * dice_per_mask(lg, t.to(lg.device, lg.dtype))
                for lg, t in zip(logits, gt_masks, strict=True)
                if lg.shape[0]
            ]
            if terms:
                result.point_loss = torch.cat(terms).mean()
                extra = extra + w.point * result.point_loss
        if w.prompt:
            pairs = [(p, c) for p, c in zip(prompts, clicks, strict=True) if p.shape[0]]
            if pairs:
                seg = torch.cat([p for p, _ in pairs]).float()
                click = torch.cat([c for _, c in pairs]).float().detach()
                result.prompt_loss = F.mse_loss(seg, click)
                extra = extra + w.prompt * result.prompt_loss
        result.loss = result.loss + extra

    def target_loss(
        self, seg_states: torch.Tensor, prompts: torch.Tensor, target_classes
    ) -> torch.Tensor | None:
        """Cross-entropy of the target head's four class predictions (summed) plus the MSE
        between each prompt and the (fixed) description prompt of its target.

        seg_states [n, H] and prompts [n, P] in batch order; target_classes per sample
        [n_i, 4], rows with a -1 skipped. None when no row is known.
        """
        classes = torch.cat([c.to(seg_states.device).long() for c in target_classes])
        known = (classes >= 0).all(dim=1)
        if classes.shape[0] != seg_states.shape[0]:
            raise ValueError(f"{seg_states.shape[0]} [SEG] tokens but {classes.shape[0]} targets")
        if not known.any():
            return None
        classes = classes[known]
        logits = self.target_head(seg_states[known].float()).split(DESCRIPTION_CLASSES, dim=-1)
        loss = sum(F.cross_entropy(part, classes[:, i]) for i, part in enumerate(logits))
        described = self.description_prompts(classes).detach()
        return loss + F.mse_loss(prompts[known].float(), described.float())

    def _last_attention(self) -> nn.Module:
        return self.base_llava.model.language_model.layers[-1].self_attn

    def _capture_last_attention_inputs(self, captured: dict):
        """Hook that stores the last LM layer's attention inputs (normed hidden states and
        rotary cos/sin) in `captured`; returns the handle to remove."""

        def hook(module, args, kwargs):  # noqa: ARG001
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            captured["hidden"] = hidden
            captured["rotary"] = kwargs.get("position_embeddings")

        return self._last_attention().register_forward_pre_hook(hook, with_kwargs=True)

    def pointing_loss(
        self,
        captured: dict,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        gt_masks: Sequence[torch.Tensor],
    ) -> torch.Tensor | None:
        """Cross-entropy between the attention of head 0 of the LM's last layer at each mask
        query position (over every key it may see) and its target's share of each image patch.

        The attention is recomputed from the layer's own inputs and weights (q_proj, k_proj,
        rotary embedding), so gradients reach the real attention. The target distribution
        over the N image tokens is the target mask area-pooled to the sqrt(N) x sqrt(N) grid
        of CLIP patches (the whole image, row-major, as LLaVA lays them out), normalised to
        sum 1. Rows whose target is empty are skipped; None when no row is left.
        """
        found = self.pointing_attention(captured, input_ids, attention_mask, gt_masks)
        return None if found is None else pointing_cross_entropy(*found)

    def pointing_attention(
        self,
        captured: dict,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        gt_masks: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """([n, N] log attention of head 0 at each mask query on the N image tokens,
        [n, N] each target's covered share of each patch); None without queries."""
        from transformers.models.llama.modeling_llama import rotate_half

        attention = self._last_attention()
        hidden, rotary = captured["hidden"], captured["rotary"]
        query = seg_query_mask(input_ids, self.seg_token_id)
        rows, positions = query.nonzero(as_tuple=True)
        if rows.numel() == 0 or rotary is None:
            return None
        image_id = self.base_llava.config.image_token_id
        is_image = input_ids == image_id
        n_image = int(is_image[0].sum())
        grid = int(round(n_image**0.5))
        if grid * grid != n_image or not bool((is_image.sum(1) == n_image).all()):
            return None
        head = attention.head_dim
        cos, sin = (r.expand(input_ids.shape[0], -1, -1) for r in rotary)  # [1 or B, L, d]
        q = attention.q_proj(hidden[rows, positions])[:, :head]  # head 0
        q = q * cos[rows, positions] + rotate_half(q) * sin[rows, positions]
        k = attention.k_proj(hidden)[..., :head]  # key head 0 serves query head 0
        k = k * cos + rotate_half(k) * sin
        logits = torch.einsum("nd,nld->nl", q.float(), k[rows].float()) * attention.scaling
        keys = torch.arange(input_ids.shape[1], device=input_ids.device)
        visible = (keys[None, :] <= positions[:, None]) & attention_mask[rows].bool()
        log_attention = F.log_softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        image_positions = is_image.nonzero(as_tuple=True)[1].view(-1, n_image)[rows]
        log_image = log_attention.gather(1, image_positions)  # [n, N]
        cover = torch.cat([
            F.interpolate(m.to(log_image.device, torch.float32)[:, None], size=(grid, grid),
                          mode="area").flatten(1)
            for m in gt_masks if m.shape[0]
        ])  # fmt: skip
        if cover.shape[0] != rows.numel():
            raise ValueError(f"{rows.numel()} [SEG] tokens but {cover.shape[0]} targets")
        return log_image, cover

    def seg_word_loss(
        self, seg_states: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor | None:
        """Each mask query state predicts the bag of answer tokens after its `[SEG]`.

        seg_states: [n, H], one row per `[SEG]` in batch order. For the `[SEG]` at t, the bag
        is the scored labels in (t, next `[SEG]` or end); the loss is the mean over the bag
        of -log softmax(head(state)), averaged over masks. Bags of fewer than three tokens
        (an answer without an explanation: just "." and the end) are skipped. None when no
        mask has a bag.
        """
        log_probs = F.log_softmax(self.seg_word_head(seg_states.float()), dim=-1)
        terms = []
        row = 0
        for b in range(input_ids.shape[0]):
            seg_positions = (input_ids[b] == self.seg_token_id).nonzero().flatten().tolist()
            ends = seg_positions[1:] + [input_ids.shape[1]]
            for start, end in zip(seg_positions, ends, strict=True):
                bag = labels[b, start + 1 : end]
                bag = bag[bag != -100]
                if bag.numel() >= 3:
                    terms.append(-log_probs[row, bag].mean())
                row += 1
        return torch.stack(terms).mean() if terms else None

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
        if w.seg_words and result.seg_word_loss is not None:
            loss = loss + w.seg_words * result.seg_word_loss
        if w.target and result.target_loss is not None:
            loss = loss + w.target * result.target_loss
        if w.pointing and result.pointing_loss is not None:
            loss = loss + w.pointing * result.pointing_loss
        result.loss = loss + w.ce * ce if ce is not None else loss
