"""Convert a published LISA checkpoint into a full-model folder of this project.

    python -m lisa_demo.convert --lisa xinlai/LISA-7B-v1-explanatory --out models/lisa-7b-v1-expl
    python -m lisa_demo.convert --lisa ./LISA-7B-v1 --out models/lisa-7b-v1 --clip ./clip-vit-l-14

The output (`llava/`, `sam/`, `projection.safetensors`, `manifest.json`; safetensors only) loads
into unmodified transformers classes: LISA's LLaMA, its one-Linear projector (as `linear_1`
with an identity `linear_2`) and the CLIP tower LISA reloads at run time (`--clip`, default the
`mm_vision_tower` its config names) become a `LlavaForConditionalGeneration`; its SAM, under
segment-anything's original names, becomes a `SamModel` (mask-decoder layer norm at 1e-5 as in
the original); `text_hidden_fcs` becomes the projection. The manifest says the model expects
LISA's llava_v1 prompt and tokenization.

Pickled shards are read with `torch.load(weights_only=True, mmap=True)`, one at a time, and the
output is written in shards of at most 2 GiB, so LISA-7B converts within 16 GB of memory. Every
source key is either mapped or named in an error (rotary `inv_freq` buffers are recomputed by
transformers and dropped). The folder is written under a temporary name and renamed at the end.

Errors a user can cause print one line "error: ..." and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

from lisa_demo.config import FULL_MODEL_FORMAT, SEG_TOKEN
from lisa_demo.paths import MODEL, OUTPUT_FOLDER, check_cli_paths

EXIT_USER_ERROR = 2
DTYPES = ("bf16", "fp16", "fp32")
OUT_SHARD_BYTES = 2 << 30
LISA_CHECKPOINTS = (
    "xinlai/LISA-7B-v1",
    "xinlai/LISA-7B-v1-explanatory",
    "xinlai/LISA-13B-llama2-v1",
    "xinlai/LISA-13B-llama2-v1-explanatory",
)
# Checkpoints that look like LISA's but are not supported: their files have not been read.
UNSUPPORTED = {
    "senqiao/lisa_plus_7b": (
        "LISA++ (Senqiao/LISA_Plus_7b) is not supported: its layout (said to be LLaVA-1.5 with "
        "576 image tokens) has not been checked, and a conversion that is not known to be exact "
        "is refused; use one of " + ", ".join(LISA_CHECKPOINTS)
    ),
}
SOURCE_FILES = ("*.json", "*.bin", "*.safetensors", "tokenizer.model")
IM_START, IM_END, IM_PATCH, IMAGE = "<im_start>", "<im_end>", "<im_patch>", "<image>"
SAM_DECODER_HEADS = 8  # segment-anything's TwoWayTransformer (not recorded in the weights)
SAM_DECODER_LAYER_NORM_EPS = 1e-5  # the original's nn.LayerNorm default (transformers: 1e-6)


class ConvertError(ValueError):
    """A source or destination the converter cannot use; the message says what to do."""


# The source ----------------------------------------------------------------------------------
def resolve_source(source: str) -> Path:
    """A local LISA folder as given, or a Hub id downloaded (once) into the Hub cache."""
    if source.strip().lower().rstrip("/") in UNSUPPORTED:
        raise ConvertError(UNSUPPORTED[source.strip().lower().rstrip("/")])
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConvertError(f"--lisa takes a folder or a Hub id, but {path} is a file")
        return path
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ConvertError(f"--lisa: the folder {source} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=list(SOURCE_FILES)))
    except Exception as err:  # offline, gated, unknown id: every case gets the same advice
        raise ConvertError(
            f"could not download {source} from the Hugging Face Hub ({type(err).__name__}). "
            f"Download it once where you have network access (`hf download {source} "
            f"--local-dir DIR`, or `huggingface-cli download {source} --local-dir DIR`) and "
            f"pass --lisa DIR"
        ) from err


def read_lisa_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConvertError(f"{folder} is not a LISA checkpoint: it has no config.json")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise ConvertError(f"{path} is not valid JSON ({err})") from err
    architectures = config.get("architectures") or []
    if config.get("model_type") != "llava" or "LISAForCausalLM" not in architectures:
        raise ConvertError(
            f"{folder} is not a LISA checkpoint: its config.json has model_type "
            f"{config.get('model_type')!r} and architectures {architectures}, expected 'llava' "
            "and LISAForCausalLM (published as " + ", ".join(LISA_CHECKPOINTS) + ")"
        )
    if config.get("mm_projector_type", "linear") != "linear":
        raise ConvertError(
            f"{folder} uses the projector {config['mm_projector_type']!r}; the published LISA "
            "checkpoints (supported) use one Linear layer"
        )
    return config


def weight_files(folder: Path) -> list[Path]:
    """The weight shards, in index order when an index exists."""
    for index in ("pytorch_model.bin.index.json", "model.safetensors.index.json"):
        path = folder / index
        if path.is_file():
            weight_map = json.loads(path.read_text()).get("weight_map", {})
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise ConvertError(f"{folder} lacks the shards its index names: {missing}")
            return [folder / f for f in files]
    files = sorted(folder.glob("pytorch_model*.bin")) or sorted(folder.glob("model*.safetensors"))
    if not files:
        raise ConvertError(f"{folder} holds no weights (pytorch_model*.bin or *.safetensors)")
    return files


def iter_tensors(path: Path) -> Iterator[tuple[str, object]]:
    """(name, tensor) of one shard; pickles are read as tensors only, memory-mapped."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, handle.get_tensor(name)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ConvertError(
            f"{path.name} cannot be read as a tensors-only checkpoint shard ({err})"
        ) from err
    if not isinstance(state, dict):
        raise ConvertError(f"{path.name} does not hold a state dict")
    yield from state.items()
    del state


# Key maps ------------------------------------------------------------------------------------
_LLAMA = re.compile(r"model\.(embed_tokens|layers|norm)\.(.+)")
_SAM_RULES = (
    (r"image_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
    (r"image_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision_encoder.layers.\1.layer_norm\2."),
    (r"image_encoder\.blocks\.(\d+)\.", r"vision_encoder.layers.\1."),
    (r"image_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
    (r"image_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
    (r"image_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
    (r"image_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
    (r"image_encoder\.pos_embed$", "vision_encoder.pos_embed"),
    (r"prompt_encoder\.point_embeddings\.(\d+)\.", r"prompt_encoder.point_embed.\1."),
    (r"prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"prompt_encoder\.(not_a_point_embed|no_mask_embed)\.", r"prompt_encoder.\1."),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.",
     r"mask_decoder.transformer.layers.\1.layer_norm\2."),
    (r"mask_decoder\.transformer\.norm_final_attn\.",
     "mask_decoder.transformer.layer_norm_final_attn."),
    (r"mask_decoder\.transformer\.", "mask_decoder.transformer."),
    (r"mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    (r"mask_decoder\.(iou_token|mask_tokens)\.", r"mask_decoder.\1."),
)  # fmt: skip
_SAM_MLP = re.compile(
    r"mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d+)\.(.+)"
)
_SAM_GAUSSIAN = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"


def llava_key(name: str) -> str | None:
    """A LISA language-side key -> its LlavaForConditionalGeneration name (None: not one)."""
    match = _LLAMA.fullmatch(name)
    if match:
        return f"model.language_model.{match[1]}.{match[2]}"
    if name == "lm_head.weight":
        return name
    if name in ("model.mm_projector.weight", "model.mm_projector.bias"):
        return "model.multi_modal_projector.linear_1." + name.rsplit(".", 1)[1]
    return None


def sam_keys(name: str, mlp_depths: dict[str, int]) -> list[str]:
    """A segment-anything key (without LISA's `model.visual_model.` prefix) -> SamModel names.

    mlp_depths: layers per decoder MLP ("iou_prediction_head": 3, ...); the first becomes
    `proj_in`, the last `proj_out`, the ones between `layers.{i-1}`.
    """
    if name == _SAM_GAUSSIAN:
        return [
            "shared_image_embedding.positional_embedding",
            "prompt_encoder.shared_embedding.positional_embedding",
        ]
    match = _SAM_MLP.fullmatch(name)
    if match:
        mlp, index, rest = match[1], int(match[2]), match[3]
        depth = mlp_depths[mlp]
        part = (
            "proj_in" if index == 0 else "proj_out" if index == depth - 1 else f"layers.{index - 1}"
        )
        return [f"mask_decoder.{mlp}.{part}.{rest}"]
    for pattern, replacement in _SAM_RULES:
        new, count = re.subn("^" + pattern, replacement, name)
        if count:
            return [new]
    raise ConvertError(f"unknown SAM key model.visual_model.{name}: not a segment-anything name")


def projection_key(name: str) -> str | None:
    """LISA's text_hidden_fcs (Linear, ReLU, Linear, Dropout) -> our projection's names."""
    match = re.fullmatch(r"model\.text_hidden_fcs\.0\.([02])\.(weight|bias)", name)
    return f"{match[1]}.{match[2]}" if match else None


# Configs -------------------------------------------------------------------------------------
def sam_config_from_tensors(sam: dict):
    """SamConfig for segment-anything tensors (names without the visual_model prefix): sizes,
    heads and the global-attention blocks all follow from the shapes."""
    from transformers import (
        SamConfig,
        SamMaskDecoderConfig,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    def shape(name: str) -> tuple[int, ...]:
        if name not in sam:
            raise ConvertError(f"the SAM weights lack model.visual_model.{name}")
        return tuple(sam[name].shape)

    hidden, _, patch, _ = shape("image_encoder.patch_embed.proj.weight")
    grid = shape("image_encoder.pos_embed")[1]
    blocks = sorted({int(k.split(".")[2]) for k in sam if k.startswith("image_encoder.blocks.")})
    head_dim = shape("image_encoder.blocks.0.attn.rel_pos_h")[1]
    spans = [shape(f"image_encoder.blocks.{i}.attn.rel_pos_h")[0] for i in blocks]
    global_blocks = [i for i, span in zip(blocks, spans, strict=True) if span == 2 * grid - 1]
    windowed = {span for span in spans if span != 2 * grid - 1}
    if len(windowed) > 1:
        raise ConvertError(f"SAM blocks use several window sizes {sorted(windowed)}")
    window = (windowed.pop() + 1) // 2 if windowed else 0
    out_channels = shape("image_encoder.neck.0.weight")[0]
    vision = SamVisionConfig(
        hidden_size=hidden,
        output_channels=out_channels,
        num_hidden_layers=len(blocks),
        num_attention_heads=hidden // head_dim,
        image_size=grid * patch,
        patch_size=patch,
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in sam,
        mlp_dim=shape("image_encoder.blocks.0.mlp.lin1.weight")[0],
        use_abs_pos=True,
        use_rel_pos=True,
        window_size=window,
        global_attn_indexes=global_blocks,
        num_pos_feats=out_channels // 2,
    )
    prompt_dim = shape("prompt_encoder.no_mask_embed.weight")[1]
    prompt = SamPromptEncoderConfig(
        hidden_size=prompt_dim,
        image_size=grid * patch,
        patch_size=patch,
        mask_input_channels=shape("prompt_encoder.mask_downscaling.3.weight")[0],
        num_point_embeddings=len([k for k in sam if k.startswith("prompt_encoder.point_emb")]),
    )
    decoder_dim = shape("mask_decoder.iou_token.weight")[1]
    layers = {k.split(".")[3] for k in sam if k.startswith("mask_decoder.transformer.layers.")}
    iou_layers = {k.split(".")[3] for k in sam if k.startswith("mask_decoder.iou_prediction_head.")}
    attention_width = shape("mask_decoder.transformer.final_attn_token_to_image.q_proj.weight")[0]
    decoder = SamMaskDecoderConfig(
        hidden_size=decoder_dim,
        num_hidden_layers=len(layers),
        num_attention_heads=SAM_DECODER_HEADS,
        mlp_dim=shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        attention_downsample_rate=decoder_dim // attention_width,
        num_multimask_outputs=shape("mask_decoder.mask_tokens.weight")[0] - 1,
        iou_head_depth=len(iou_layers),
        iou_head_hidden_dim=shape("mask_decoder.iou_prediction_head.layers.0.weight")[0],
        layer_norm_eps=SAM_DECODER_LAYER_NORM_EPS,
    )
    if not out_channels == prompt_dim == decoder_dim:
        raise ConvertError(
            f"SAM widths disagree: neck {out_channels}, prompt {prompt_dim}, decoder {decoder_dim}"
        )
    return SamConfig(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder
    )


def sam_mlp_depths(sam: dict) -> dict[str, int]:
    depths: dict[str, int] = {}
    for name in sam:
        match = _SAM_MLP.fullmatch(name)
        if match:
            depths[match[1]] = max(depths.get(match[1], 0), int(match[2]) + 1)
    return depths


def llava_config(lisa: dict, clip_config, vocab: int, image_token_id: int, image_tokens: int):
    """LlavaConfig of the converted model: LISA's LLaMA, CLIP's tower, the projector as
    linear_1 + identity linear_2 (projector_hidden_act "linear")."""
    from transformers import LlamaConfig, LlavaConfig

    heads = lisa["num_attention_heads"]
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=lisa["hidden_size"],
        intermediate_size=lisa["intermediate_size"],
        num_hidden_layers=lisa["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=lisa.get("num_key_value_heads") or heads,
        max_position_embeddings=lisa.get("max_position_embeddings", 2048),
        rms_norm_eps=lisa.get("rms_norm_eps", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": lisa.get("rope_theta", 1e4)},
        hidden_act=lisa.get("hidden_act", "silu"),
        tie_word_embeddings=False,
        bos_token_id=lisa.get("bos_token_id", 1),
        eos_token_id=lisa.get("eos_token_id", 2),
        pad_token_id=lisa.get("pad_token_id", 0),
    )
    if lisa.get("rope_scaling"):
        raise ConvertError(f"rope_scaling {lisa['rope_scaling']} is not supported")
    select = lisa.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConvertError(f"mm_vision_select_feature {select!r} is not supported")
    return LlavaConfig(
        vision_config=clip_config,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=lisa.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        projector_hidden_act="linear",
        multimodal_projector_bias=True,
        image_seq_length=image_tokens,
        tie_word_embeddings=False,
        pad_token_id=text.pad_token_id,
    )


# Writing -------------------------------------------------------------------------------------
class ShardWriter:
    """Writes tensors into safetensors shards of at most `limit` bytes, then the index."""

    def __init__(self, folder: Path, limit: int = OUT_SHARD_BYTES) -> None:
        self.folder, self.limit = folder, limit
        self.pending: dict = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0
        self.shapes: dict[str, tuple[int, ...]] = {}

    def add(self, name: str, tensor) -> None:
        if name in self.shapes:
            raise ConvertError(f"two source tensors map onto {name}")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.limit:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size
        self.shapes[name] = tuple(tensor.shape)

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        file = f"part-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / file), metadata={"format": "pt"})
        self.files.append((file, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Rename the shards to transformers' names and write the index."""
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, (file, names) in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / file).rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _expected_shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_complete(written: dict, expected: dict, what: str) -> None:
    """Every tensor the transformers model has was written, with its shape, and no other."""
    missing = sorted(set(expected) - set(written))
    unexpected = sorted(set(written) - set(expected))
    wrong = sorted(k for k in set(written) & set(expected) if written[k] != expected[k])
    if missing or unexpected or wrong:
        raise ConvertError(
            f"the converted {what} does not match its architecture: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )


def load_tokenizer(folder: Path):
    """LISA's slow LLaMA tokenizer files as a transformers tokenizer (needs sentencepiece and
    protobuf to read tokenizer.model)."""
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file():
        raise ConvertError(f"{folder} has no tokenizer (tokenizer.model)")
    for module in ("sentencepiece", "google.protobuf"):
        try:
            __import__(module)
        except ImportError as err:
            package = "protobuf" if module.startswith("google") else module
            raise ConvertError(
                f"reading LISA's tokenizer.model needs {package}: pip install {package}"
            ) from err
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:
        raise ConvertError(f"cannot read the tokenizer in {folder} ({err})") from err


def _token_id(tokenizer, token: str) -> int | None:
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if token not in tokenizer.get_vocab():
        return None
    if len(ids) != 1:
        raise ConvertError(f"the tokenizer splits {token} into {len(ids)} tokens")
    return ids[0]


def load_clip(source: str, dtype):
    from transformers import CLIPImageProcessorPil, CLIPVisionModel

    try:
        model = CLIPVisionModel.from_pretrained(source, dtype=dtype)
        processor = CLIPImageProcessorPil.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConvertError(
            f"could not load the CLIP vision tower {source!r} ({type(err).__name__}): LISA's "
            "checkpoints do not contain it. Download it once (`hf download "
            "openai/clip-vit-large-patch14 --local-dir DIR`) and pass --clip DIR"
        ) from err
    return model, processor


def convert(
    source: Path, out: Path, clip: str | None = None, dtype_name: str = "bf16", log=print
) -> dict:
    """Write the full-model folder for the LISA checkpoint in `source` into `out` (a new
    folder). Returns the manifest."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import (
        GenerationConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SamModel,
        SamProcessor,
    )
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    lisa = read_lisa_config(source)
    shards = weight_files(source)
    tokenizer = load_tokenizer(source)
    clip_source = clip or lisa.get("mm_vision_tower") or lisa.get("vision_tower")
    if not clip_source:
        raise ConvertError("the config names no CLIP tower (mm_vision_tower): pass --clip")
    if clip is None and (source / clip_source).is_dir():  # a path relative to the checkpoint
        clip_source = str(source / clip_source)
    clip_model, clip_processor = load_clip(clip_source, dtype)
    if clip_model.config.hidden_size != lisa.get("mm_hidden_size", clip_model.config.hidden_size):
        raise ConvertError(
            f"the CLIP tower {clip_source} is {clip_model.config.hidden_size} wide, LISA's "
            f"projector expects {lisa['mm_hidden_size']}"
        )

    seg_id = _token_id(tokenizer, SEG_TOKEN)
    if (
        seg_id is None
        or _token_id(tokenizer, IM_START) is None
        or _token_id(tokenizer, IM_END) is None
    ):
        raise ConvertError(
            f"the tokenizer in {source} lacks LISA's added tokens ({SEG_TOKEN}, {IM_START}, "
            f"{IM_END}): not a LISA checkpoint"
        )
    image_token = IM_PATCH if _token_id(tokenizer, IM_PATCH) is not None else IMAGE
    added_image_token = image_token == IMAGE and _token_id(tokenizer, IMAGE) is None
    if added_image_token:  # LISA-13B-llama2: no <im_patch>; add a placeholder, never generated
        tokenizer.add_tokens([IMAGE])
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # what LISA padded with
    patch = clip_model.config.patch_size
    image_tokens = (clip_model.config.image_size // patch) ** 2

    llava_dir, sam_dir = out / "llava", out / "sam"
    llava_dir.mkdir(parents=True)
    sam_dir.mkdir()
    writer = ShardWriter(llava_dir)
    sam_state: dict = {}
    projection: dict = {}
    vocab = None
    dropped = 0
    for shard in shards:
        log(f"reading {shard.name}")
        for name, tensor in iter_tensors(shard):
            if name.endswith("rotary_emb.inv_freq"):
                dropped += 1
                continue
            if name.startswith("model.visual_model."):
                sam_state[name.removeprefix("model.visual_model.")] = tensor.to(dtype).clone()
                continue
            target = projection_key(name)
            if target is not None:
                projection[target] = tensor.to(dtype).clone()
                continue
            target = llava_key(name)
            if target is None:
                raise ConvertError(
                    f"unexpected key {name} in {shard.name}: not part of a LISA checkpoint "
                    "(LLaMA, mm_projector, visual_model, text_hidden_fcs)"
                )
            value = tensor.to(dtype)
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                if added_image_token and value.shape[0] <= image_token_id:
                    # The placeholder's embedding is always replaced by image features; its
                    # LM-head row is zero and generation suppresses it.
                    pad = value.new_zeros(image_token_id + 1 - value.shape[0], value.shape[1])
                    value = torch.cat([value, pad])
                vocab = value.shape[0]
            writer.add(target, value)
        writer.flush()
    if vocab is None:
        raise ConvertError("the checkpoint has no model.embed_tokens.weight")
    if len(tokenizer) > vocab:
        raise ConvertError(f"the tokenizer has {len(tokenizer)} tokens, the embeddings {vocab}")
    hidden = lisa["hidden_size"]
    writer.add("model.multi_modal_projector.linear_2.weight", torch.eye(hidden, dtype=dtype))
    writer.add("model.multi_modal_projector.linear_2.bias", torch.zeros(hidden, dtype=dtype))
    for name, tensor in clip_model.state_dict().items():
        writer.add("model.vision_tower." + name.removeprefix("vision_model."), tensor)
    clip_config = clip_model.config
    del clip_model

    config = llava_config(lisa, clip_config, vocab, image_token_id, image_tokens)
    with init_empty_weights():
        skeleton = LlavaForConditionalGeneration(config)
    check_complete(writer.shapes, _expected_shapes(skeleton), "language model")
    writer.finish()
    config.save_pretrained(llava_dir)
    generation = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=[image_token_id] if added_image_token else None,
    )
    generation.save_pretrained(llava_dir)
    processor = LlavaProcessor(
        image_processor=clip_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token=image_token,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(llava_dir)

    if not sam_state:
        raise ConvertError("the checkpoint has no SAM weights (model.visual_model.*)")
    sam_config = sam_config_from_tensors(sam_state)
    depths = sam_mlp_depths(sam_state)
    sam_out = {}
    for name, tensor in sam_state.items():
        for target in sam_keys(name, depths):
            sam_out[target] = tensor.clone()  # one file entry per name
    with init_empty_weights():
        sam_skeleton = SamModel(sam_config)
    check_complete(
        {k: tuple(v.shape) for k, v in sam_out.items()}, _expected_shapes(sam_skeleton), "SAM"
    )
    save_file(sam_out, str(sam_dir / "model.safetensors"), metadata={"format": "pt"})
    sam_config.save_pretrained(sam_dir)
    SamProcessor(image_processor=SamImageProcessorPil()).save_pretrained(sam_dir)

    if sorted(projection) != ["0.bias", "0.weight", "2.bias", "2.weight"]:
        raise ConvertError(f"text_hidden_fcs is incomplete: found {sorted(projection)}")
    save_file(projection, str(out / "projection.safetensors"), metadata={"format": "pt"})

    manifest = {
        "format": FULL_MODEL_FORMAT,
        "version": 1,
        "prompt_format": "llava_v1",
        "precision": dtype_name,
        "stored_dtype": str(dtype).removeprefix("torch."),
        "seg_token": SEG_TOKEN,
        "seg_token_id": seg_id,
        "image_token": image_token,
        "image_token_id": image_token_id,
        "image_tokens": image_tokens,
        "converted_from": {
            "lisa": str(source),
            "clip": clip_source,
            "date": date.today().isoformat(),
            "language_model": {
                k: lisa.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")
            },
            "sam": {
                "hidden": sam_config.vision_config.hidden_size,
                "layers": sam_config.vision_config.num_hidden_layers,
                "global_attn_indexes": list(sam_config.vision_config.global_attn_indexes),
            },
            "dropped_keys": f"{dropped} rotary inv_freq buffers",
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lisa_demo.convert",
        description="Convert a LISA checkpoint (Hub id or folder) into a full-model folder.",
    )
    parser.add_argument("--lisa", required=True, help="Hub id (xinlai/LISA-7B-v1, ...) or folder")
    parser.add_argument("--out", required=True, type=Path, help="the full-model folder to write")
    parser.add_argument(
        "--clip", help="CLIP vision tower (Hub id or folder); default: the one LISA's config names"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="stored dtype (bf16)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} is a file; name a folder to create")
    if out.exists() and not force:
        raise ConvertError(f"--out {out} already exists; pass --force to replace it")
    parent = out.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise ConvertError(f"cannot create {out}: {parent} is a file")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if check_cli_paths(
        ("--lisa", args.lisa, MODEL),
        ("--clip", args.clip, MODEL),
        ("--out", args.out, OUTPUT_FOLDER),
    ):
        return EXIT_USER_ERROR
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from lisa_demo.checkpoint import write_atomically

    start = time.perf_counter()
    try:
        _check_out(args.out, args.force)
        source = resolve_source(args.lisa)
        read_lisa_config(source)  # refuse a non-LISA folder before any work
        manifest = {}

        def write(tmp: Path) -> None:
            manifest.update(convert(source, tmp, args.clip, args.dtype, log=lambda m: None))

        write_atomically(args.out, write)
    except ConvertError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:
        print(f"error: cannot write {args.out}: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(
        f"wrote {args.out} ({manifest['converted_from']['language_model']['num_hidden_layers']}"
        f"-layer LISA, {manifest['image_tokens']} image tokens, {args.dtype}) in "
        f"{time.perf_counter() - start:.1f} s; peak memory {peak_rss_gib():.2f} GiB"
    )
    print(f"use it with: python -m lisa_demo.infer --model {args.out} --image IMAGE --query TEXT")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
