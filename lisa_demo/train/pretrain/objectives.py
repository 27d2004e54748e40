"""The recipe's loss terms in the LISA loop, beside LISA's own (none of them is in LISA).

- **seg words** (`seg_words`): a training-only linear head reads each `[SEG]` state and
  predicts the words of the answer after its `[SEG]` (the explanation).
- **click losses** (`point`, `prompt`; SAM itself learned from clicks first): SAM also segments
  each target from a click inside it (BCE + Dice with LISA's mask weights), and each `[SEG]`
  prompt is pulled (MSE) towards that click's prompt embedding.
- **target loss** (`target`, synthetic scenes): a training-only head makes each `[SEG]` state
  name its target's kind, colour, size and region (cross-entropy), and the projected prompt is
  pulled (MSE) towards the description prompt that SAM learned in the SAM warm-up.
- **pointing loss** (`pointing`): head 0 of the language model's last layer, at each `[SEG]`
  query position, is taught to attend to its target's image patches (cross-entropy against
  the share of each patch the target covers). No extra weights.

`attach` adds the training-only modules to a LisaModel under the names older checkpoints use
(`seg_word_head.`, `target_head.`, `description_prompts.`); `PretrainingModel` is the module the
loop trains: LISA's forward, then these terms added to its loss, all inside one forward call
(so DistributedDataParallel sees every weight used).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from lisa_demo.data.synthetic import DESCRIPTION_CLASSES
from lisa_demo.losses import dice_per_mask, sigmoid_bce_per_mask
from lisa_demo.model import LisaModel, LisaOutput, seg_query_mask
from lisa_demo.train.pretrain.options import PretrainOptions


@dataclass
class PretrainOutput(LisaOutput):
    """LisaOutput plus the recipe's terms (None when off or not computable for the batch)."""

    seg_word_loss: torch.Tensor | None = None
    point_loss: torch.Tensor | None = None
    prompt_loss: torch.Tensor | None = None
    target_loss: torch.Tensor | None = None
    pointing_loss: torch.Tensor | None = None


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


def attach(model: LisaModel, options: PretrainOptions) -> None:
    """Add the training-only modules the options need to `model` (never exported)."""
    hidden = model.text_hidden_fcs[0].in_features
    prompt_size = model.text_hidden_fcs[-1].out_features
    device = model.text_hidden_fcs[0].weight.device
    if options.seg_words > 0:
        vocab_size = model.llava.get_input_embeddings().weight.shape[0]
        model.add_module("seg_word_head", nn.Linear(hidden, vocab_size, device=device))
    if options.target > 0:
        head = nn.Linear(hidden, sum(DESCRIPTION_CLASSES), device=device)
        model.add_module("target_head", head)
        model.add_module("description_prompts", DescriptionPrompts(prompt_size).to(device))


def description_prompts(model: LisaModel) -> DescriptionPrompts | None:
    return getattr(model, "description_prompts", None)


def click_prompts(model: LisaModel, points: torch.Tensor) -> torch.Tensor:
    """[n, 2] (x, y) clicks in SAM's padded input frame -> [n, P] one-token sparse prompts.

    SAM's own embedding of a positive click (random Fourier features of the position plus
    the "positive point" embedding), without the padding token SAM adds for point-only
    prompts, so a click and a projected `[SEG]` state are prompts of the same form.
    """
    encoder = model.sam.prompt_encoder
    size = float(model.sam_pad_size)
    coords = (points.float() + 0.5).view(1, 1, -1, 2)  # SAM shifts to the pixel centre
    features = encoder.shared_embedding(coords, (size, size))[0, 0]
    return features + encoder.point_embed[1].weight


# Seg words ------------------------------------------------------------------------------------
def seg_word_loss(
    head: nn.Module, seg_states: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
    seg_token_id: int,
) -> torch.Tensor | None:  # fmt: skip
    """Each mask query state predicts the bag of answer tokens after its `[SEG]`.

    seg_states: [n, H], one row per `[SEG]` in batch order. For the `[SEG]` at t, the bag
    is the scored labels in (t, next `[SEG]` or end); the loss is the mean over the bag
    of -log softmax(head(state)), averaged over masks. Bags of fewer than three tokens
    (an answer without an explanation: just "." and the end) are skipped. None when no
    mask has a bag.
    """
    log_probs = F.log_softmax(head(seg_states.float()), dim=-1)
    terms = []
    row = 0
    for b in range(input_ids.shape[0]):
        seg_positions = (input_ids[b] == seg_token_id).nonzero().flatten().tolist()
        ends = seg_positions[1:] + [input_ids.shape[1]]
        for start, end in zip(seg_positions, ends, strict=True):
            bag = labels[b, start + 1 : end]
            bag = bag[bag != -100]
            if bag.numel() >= 3:
                terms.append(-log_probs[row, bag].mean())
            row += 1
    return torch.stack(terms).mean() if terms else None


# Target loss ----------------------------------------------------------------------------------
def target_loss(
    model: LisaModel, seg_states: torch.Tensor, prompts: torch.Tensor, target_classes
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
    logits = model.target_head(seg_states[known].float()).split(DESCRIPTION_CLASSES, dim=-1)
    loss = sum(F.cross_entropy(part, classes[:, i]) for i, part in enumerate(logits))
    described = model.description_prompts(classes).detach()
    return loss + F.mse_loss(prompts[known].float(), described.float())


# Pointing loss --------------------------------------------------------------------------------
def pointing_cross_entropy(log_image: torch.Tensor, cover: torch.Tensor) -> torch.Tensor | None:
    """Mean over rows of -sum(share * log attention), share = cover normalised to sum 1.

    log_image, cover: [n, N] (pointing_attention). Rows with an empty target are skipped;
    None when none is left.
    """
    total = cover.sum(1)
    keep = total > 0
    if not keep.any():
        return None
    share = cover[keep] / total[keep, None]
    return -(share * log_image[keep]).sum(1).mean()


def _last_attention(model: LisaModel) -> nn.Module:
    return model.base_llava.model.language_model.layers[-1].self_attn


def capture_last_attention_inputs(model: LisaModel, captured: dict):
    """Hook that stores the last LM layer's attention inputs (normed hidden states and
    rotary cos/sin) in `captured`; returns the handle to remove."""

    def hook(module, args, kwargs):  # noqa: ARG001
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        captured["hidden"] = hidden
        captured["rotary"] = kwargs.get("position_embeddings")

    return _last_attention(model).register_forward_pre_hook(hook, with_kwargs=True)


def pointing_attention(
    model: LisaModel,
    captured: dict,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    gt_masks: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """([n, N] log attention of head 0 at each mask query on the N image tokens,
    [n, N] each target's covered share of each patch); None without queries.

    The attention is recomputed from the layer's own inputs and weights (q_proj, k_proj,
    rotary embedding), so gradients reach the real attention. The target distribution
    over the N image tokens is the target mask area-pooled to the sqrt(N) x sqrt(N) grid
    of CLIP patches (the whole image, row-major, as LLaVA lays them out).
    """
    from transformers.models.llama.modeling_llama import rotate_half

    attention = _last_attention(model)
    hidden, rotary = captured["hidden"], captured["rotary"]
    query = seg_query_mask(input_ids, model.seg_token_id)
    rows, positions = query.nonzero(as_tuple=True)
    if rows.numel() == 0 or rotary is None:
        return None
    image_id = model.base_llava.config.image_token_id
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


# Click losses ---------------------------------------------------------------------------------
def click_losses(
    model: LisaModel, options: PretrainOptions, out: LisaOutput, click_points, gt_masks,
    image_embeddings: torch.Tensor, input_sizes, original_sizes,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(point loss, prompt loss): SAM segments each target from a click inside it; each
    `[SEG]` prompt moves towards that click's prompt. None where off or empty."""
    w = model.loss_weights
    clicks = [click_prompts(model, p.to(image_embeddings.device)) for p in click_points]
    point = prompt = None
    if options.point:
        logits, _ = model.decode_masks(clicks, image_embeddings, input_sizes, original_sizes)
        terms = [
            w.bce * sigmoid_bce_per_mask(lg, t.to(lg.device, lg.dtype))
            + w.dice * dice_per_mask(lg, t.to(lg.device, lg.dtype))
            for lg, t in zip(logits, gt_masks, strict=True)
            if lg.shape[0]
        ]
        if terms:
            point = torch.cat(terms).mean()
    if options.prompt:
        pairs = [(p, c) for p, c in zip(out.prompts, clicks, strict=True) if p.shape[0]]
        if pairs:
            seg = torch.cat([p for p, _ in pairs]).float()
            click = torch.cat([c for _, c in pairs]).float().detach()
            prompt = F.mse_loss(seg, click)
    return point, prompt


# The module the loop trains ---------------------------------------------------------------------
class PretrainingModel(nn.Module):
    """LISA's forward plus the recipe's loss terms (only while training).

    forward takes LisaModel.forward's arguments plus `click_points` (per sample [n_i, 2],
    SAM's input frame) and `target_classes` (per sample [n_i, 4], -1 where unknown), which
    the recipe's batch inputs provide, and returns a PretrainOutput whose `loss` includes
    the weighted terms.
    """

    def __init__(self, lisa: LisaModel, options: PretrainOptions) -> None:
        super().__init__()
        self.lisa = lisa
        self.options = options

    def forward(self, click_points=None, target_classes=None, **inputs) -> PretrainOutput:
        model, o = self.lisa, self.options
        if inputs.get("image_embeddings") is None and inputs.get("sam_pixel_values") is not None:
            # Computed here so the click losses decode with the same embeddings.
            inputs["image_embeddings"] = model.encode_images(inputs.pop("sam_pixel_values"))
        gt_masks = inputs.get("gt_masks")
        pointing = o.pointing > 0 and self.training and gt_masks is not None
        captured: dict = {}
        hook = capture_last_attention_inputs(model, captured) if pointing else None
        try:
            lisa_out = model(**inputs)
        finally:
            if hook is not None:
                hook.remove()
        out = PretrainOutput(**{f.name: getattr(lisa_out, f.name) for f in fields(lisa_out)})
        if not self.training or out.loss is None:
            return out
        extra = []
        labels = inputs.get("labels")
        if o.seg_words and labels is not None:
            out.seg_word_loss = seg_word_loss(
                model.seg_word_head, out.seg_states, inputs["input_ids"], labels,
                model.seg_token_id,
            )  # fmt: skip
            extra.append((o.seg_words, out.seg_word_loss))
        if o.target and target_classes is not None:
            prompts = torch.cat(list(out.prompts))
            out.target_loss = target_loss(model, out.seg_states, prompts, target_classes)
            extra.append((o.target, out.target_loss))
        if pointing and captured:
            found = pointing_attention(model, captured, inputs["input_ids"],
                                       inputs["attention_mask"], gt_masks)  # fmt: skip
            out.pointing_loss = None if found is None else pointing_cross_entropy(*found)
            extra.append((o.pointing, out.pointing_loss))
        if click_points is not None and gt_masks is not None and (o.point or o.prompt):
            out.point_loss, out.prompt_loss = click_losses(
                model, o, out, click_points, gt_masks, inputs["image_embeddings"],
                inputs["input_sizes"], inputs["original_sizes"],
            )  # fmt: skip
            extra += [(o.point, out.point_loss), (o.prompt, out.prompt_loss)]
        for weight, term in extra:
            if weight and term is not None:
                out.loss = out.loss + weight * term
        return out
