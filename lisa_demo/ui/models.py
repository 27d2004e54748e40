"""The models the Inference tab offers, loaded lazily (never at import) behind one lock.

Choices, in this order: the bundled tiny model (when assets/tiny-lisa exists), every full-model
folder under the models folder (LISA_MODELS_DIR: converted LISA checkpoints), the model
configured by flags or LISA_* variables (a full-model folder or a preset), and every checkpoint
a training run left under the runs folder (RUN/checkpoints/best|last). The folders are scanned
again whenever the choices are asked for, so a model converted while the app runs appears on
the next refresh. A model a CPU cannot serve is left out where no GPU is present, with a status
line. A loaded model is kept until another one is asked for. No gradio here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lisa_demo.atomic import complete_folder
from lisa_demo.config import (
    BUNDLED_MODEL_DIR,
    ConfigError,
    LossWeights,
    ModelConfig,
    find_full_models,
    full_model_config,
    preset,
    read_full_model_manifest,
)
from lisa_demo.ui.settings import DEFAULT_PRESET, AppSettings

log = logging.getLogger("lisa_demo.ui")

RUN_INFO_FILE = "ui_run.json"  # written by the Training tab: the model a run fine-tuned
CHECKPOINT_KINDS = ("best", "last")
CHECKPOINT_PREFIX = "checkpoint:"
MODEL_PREFIX = "model:"  # a full-model folder of the models folder: "model:NAME"
CONFIGURED_KEY = "configured"
BUNDLED_KEY = "preset:tiny"
# LLaVA weights a CPU is asked to serve at most (the bundled model has 15 MB, LISA-7B 13.5 GB
# in bf16): beyond this a CPU needs minutes per answer and more memory than a free Space has.
CPU_MAX_LLAVA_BYTES = 2 * 10**9
MISSING_BUNDLED = (
    f"The bundled model is not in {BUNDLED_MODEL_DIR.name}/ yet, so no model is loaded. "
    "Start the app with `python app.py --preset tiny-random` (random weights, for trying the "
    "interface) or set LISA_PRESET."
)
TINY_MODEL_NOTE = (
    "**This is the bundled tiny model: it knows synthetic coloured shapes only** (circles, "
    "squares, triangles, stars, hearts... on a plain background, like the examples). On a real "
    "photo its answer and masks mean nothing. Real photos need a LISA model: convert one with "
    "`python -m lisa_demo.convert --lisa xinlai/LISA-7B-v1-explanatory --out models/NAME` and "
    "serve it with `python app.py --model models/NAME` (see docs/SPACE.md)."
)


class Segmenter(Protocol):
    """What the Inference tab needs from a model (LisaPipeline, or a fake in tests)."""

    def segment(self, image: Any, query: str, threshold: float = 0.0) -> Any: ...


class ModelUnavailable(ValueError):
    """The chosen model cannot be served; the message says why and what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the model dropdown."""

    key: str  # the dropdown value (what API clients pass)
    label: str  # what the dropdown shows
    preset: str
    llava: str | None = None
    sam: str | None = None
    quantization: str | None = None
    checkpoint: str | None = None  # fine-tuned checkpoint folder
    model: str | None = None  # full-model folder (wins over preset, llava and sam)
    # ModelConfig fields a training run recorded in its start event (wins over the rest)
    run_model: dict | None = field(default=None, compare=False, hash=False)

    def model_config(self) -> ModelConfig:
        if self.run_model is not None:
            try:
                return config_from_fields(self.run_model)
            except (TypeError, ValueError) as err:
                log.warning("run config of %s unusable (%s); using its base", self.label, err)
        if self.model:
            cfg = full_model_config(self.model)
            return cfg.replace(quantization=self.quantization) if self.quantization else cfg
        cfg = preset(self.preset)
        changes: dict[str, object] = {}
        if self.llava or self.sam:
            changes.update(build_tiny=False, random_weights=False)
            if self.llava:
                changes["llava"] = self.llava
            if self.sam:
                changes["sam"] = self.sam
            if self.llava and self.sam:
                changes["heads"] = None
        if self.quantization:
            changes["quantization"] = self.quantization
        return cfg.replace(**changes) if changes else cfg


def same_folder(a: str | Path | None, b: str | Path | None) -> bool:
    if a is None or b is None:
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def is_bundled_model(spec: ModelSpec) -> bool:
    """The bundled tiny model, or a fine-tune of it (what the tiny-model note is about)."""
    if spec.model and spec.run_model is None:  # never download a Hub repo to answer this
        return same_folder(local_model_folder(spec.model), BUNDLED_MODEL_DIR)
    try:
        cfg = spec.model_config()
    except ConfigError:
        return False
    return not cfg.build_tiny and same_folder(cfg.heads, BUNDLED_MODEL_DIR)


def is_hub_repo(source: str) -> bool:
    """Whether `source` names a Hub repo holding a full model ("USER/NAME", no local path), as
    config.resolve_model_dir decides (it downloads such a repo on first use)."""
    text = str(source)
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")):
        return False
    return text.count("/") == 1


def local_model_folder(source: str | Path) -> Path | None:
    """The folder of a full model on this machine: the folder itself, or a Hub repo's copy in
    the Hub cache; None for a Hub repo not downloaded yet (nothing is downloaded here)."""
    if not is_hub_repo(str(source)):
        return Path(source).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), local_files_only=True))
    except Exception:  # not in the cache (or no huggingface_hub): unknown until downloaded
        return None


def llava_weight_bytes(folder: str | Path) -> int:
    """Bytes of a full model's LLaVA weights (its llava/*.safetensors files)."""
    return sum(path.stat().st_size for path in (Path(folder) / "llava").glob("*.safetensors"))


def needs_gpu(spec: ModelSpec) -> bool:
    """A quantized model, a full model with over CPU_MAX_LLAVA_BYTES of LLaVA weights, or a
    7B-class preset (anything not built from the tiny presets)."""
    if spec.quantization not in (None, "none"):
        return True
    if spec.model:
        folder = local_model_folder(spec.model)  # a Hub repo not downloaded yet: checked on load
        return folder is not None and llava_weight_bytes(folder) > CPU_MAX_LLAVA_BYTES
    try:
        cfg = spec.model_config()
    except ConfigError:
        return False
    return cfg.quantization != "none" or not spec.preset.startswith("tiny")


def gpu_available() -> bool:
    """A CUDA device now, or ZeroGPU (which attaches one inside decorated calls only)."""
    from lisa_demo.ui import gpu

    if gpu.ZERO_GPU:
        return True
    import torch

    return torch.cuda.is_available()


def gpu_problem(spec: ModelSpec) -> str:
    """The status line of a model left out for want of a GPU."""
    folder = local_model_folder(spec.model) if spec.model else None
    if folder is not None and spec.quantization in (None, "none"):
        size = llava_weight_bytes(folder) / 10**9
        why = f"its LLaVA weights take {size:.1f} GB, more than a CPU serves here"
    elif spec.quantization not in (None, "none"):
        why = f"{spec.quantization} quantization runs on a GPU"
    else:
        why = "it is a 7B-class model"
    return (
        f"{spec.label} needs a GPU and none is available here ({why}), so it is not offered; "
        "run on a GPU machine (or a GPU Space) or choose a smaller model."
    )


def describe_full_model(manifest: dict) -> str:
    """What a full model is, from its manifest: "LISA, llava_v1"."""
    what = "LISA" if isinstance(manifest.get("converted_from"), dict) else "full model"
    fmt = manifest.get("prompt_format")
    return f"{what}, {fmt}" if isinstance(fmt, str) and fmt else what


def full_model_label(folder: Path, manifest: dict, quantization: str | None = None) -> str:
    """The dropdown label of a full-model folder: "tiny-lisa-v1 (LISA, llava_v1)"."""
    label = f"{folder.name} ({describe_full_model(manifest)})"
    return f"{label} {quantization}" if quantization else label


@dataclass(frozen=True)
class FullModel:
    """A full model the app knows (besides the bundled one)."""

    key: str  # "model:NAME" for the models folder, "configured" for --model / LISA_MODEL
    label: str
    source: str  # what --model takes: a folder, or a Hub repo holding one
    folder: Path | None  # where it is on this machine (None: a Hub repo not downloaded yet)


def _configured_is_bundled(settings: AppSettings) -> bool:
    """`--model assets/tiny-lisa` alone is the default, not a second copy of it."""
    return same_folder(settings.model, BUNDLED_MODEL_DIR) and not (
        settings.checkpoint or settings.quantization
    )


def known_full_models(settings: AppSettings) -> tuple[list[FullModel], list[str]]:
    """The models folder's full models and the configured one (when a full model), and a
    status line for a configured folder that is not one."""
    found: list[FullModel] = []
    problems: list[str] = []
    for folder in find_full_models(settings.models_dir):
        if same_folder(folder, BUNDLED_MODEL_DIR):
            continue
        if same_folder(folder, settings.model) and not settings.checkpoint:
            continue  # offered as the configured model
        label = full_model_label(folder, read_full_model_manifest(folder), settings.quantization)
        found.append(FullModel(MODEL_PREFIX + folder.name, label, str(folder), folder))
    if settings.model and not _configured_is_bundled(settings):
        source = settings.model
        folder = local_model_folder(source)
        if folder is None:
            label = f"{source} (from the Hub, downloaded on first use)"
            found.append(FullModel(CONFIGURED_KEY, label, source, None))
            return found, problems
        try:
            manifest = read_full_model_manifest(folder)
        except ConfigError as err:
            problems.append(f"The configured model (--model / LISA_MODEL) is not offered: {err}.")
        else:
            name = source if is_hub_repo(source) else folder.name
            label = f"{name} ({describe_full_model(manifest)})"
            found.append(FullModel(CONFIGURED_KEY, label, source, folder))
    return found, problems


def offered_models(settings: AppSettings) -> tuple[list[ModelSpec], list[str]]:
    """The bundled, models-folder and configured models, and status lines for those that
    cannot be offered."""
    specs: list[ModelSpec] = []
    problems: list[str] = []
    if BUNDLED_MODEL_DIR.is_dir():
        specs.append(ModelSpec(BUNDLED_KEY, "bundled tiny LISA", DEFAULT_PRESET))
    full_models, problems = known_full_models(settings)
    for full in full_models:
        configured = full.key == CONFIGURED_KEY
        specs.append(
            ModelSpec(
                key=full.key,
                label=_configured_label(settings, full.label) if configured else full.label,
                preset=DEFAULT_PRESET,
                quantization=settings.quantization,
                checkpoint=settings.checkpoint if configured else None,
                model=full.source,
            )
        )
    custom = settings.preset != DEFAULT_PRESET or settings.llava or settings.sam
    custom = custom or settings.checkpoint or settings.quantization
    if custom and not settings.model:
        specs.append(_configured_preset_spec(settings))
    if not specs and not problems:
        problems.append(MISSING_BUNDLED)
    offered = []
    for spec in specs:
        if spec.key != BUNDLED_KEY and needs_gpu(spec) and not gpu_available():
            problems.append(gpu_problem(spec))
        else:
            offered.append(spec)
    return offered, problems


def _configured_label(settings: AppSettings, base: str) -> str:
    parts = [base]
    if settings.llava:
        parts.append(f"llava={settings.llava}")
    if settings.sam:
        parts.append(f"sam={settings.sam}")
    if settings.quantization:
        parts.append(settings.quantization)
    if settings.checkpoint:
        parts.append(f"+ {Path(settings.checkpoint).name}")
    return " ".join(parts)


def _configured_preset_spec(settings: AppSettings) -> ModelSpec:
    return ModelSpec(
        key=CONFIGURED_KEY,
        label=_configured_label(settings, settings.preset),
        preset=settings.preset,
        llava=settings.llava,
        sam=settings.sam,
        quantization=settings.quantization,
        checkpoint=settings.checkpoint,
    )


def config_from_fields(fields: dict) -> ModelConfig:
    """A ModelConfig from its recorded fields (unknown ones ignored, as in events.jsonl)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: v for k, v in fields.items() if k in known}
    if isinstance(values.get("losses"), dict):
        values["losses"] = LossWeights.from_fields(values["losses"])
    return ModelConfig(**values)


def read_run_model(run_dir: Path) -> dict | None:
    """The ModelConfig fields of a run: config.model of the first (start) event, or None."""
    try:
        with (run_dir / "events.jsonl").open(encoding="utf-8") as handle:
            start = json.loads(handle.readline())
        model = start["config"]["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return model if start.get("event") == "start" and isinstance(model, dict) else None


def read_run_info(run_dir: Path) -> dict:
    """The model a run fine-tuned ({"preset", "model", "llava", "sam", "quantization"}), or
    {}."""
    try:
        info = json.loads((run_dir / RUN_INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def checkpoint_key(runs_dir: Path, folder: Path) -> str:
    """Dropdown value of a checkpoint folder: "checkpoint:RUN/checkpoints/best"."""
    return CHECKPOINT_PREFIX + folder.resolve().relative_to(runs_dir.resolve()).as_posix()


def find_checkpoint_specs(runs_dir: Path, fallback_preset: str) -> list[ModelSpec]:
    """RUN/checkpoints/{best,last} folders holding a manifest.json, newest run first.

    The model each was trained on comes from the run's start event (any run, CLI ones too),
    else from the ui_run.json the Training tab writes, else from `fallback_preset`.
    """
    if not runs_dir.is_dir():
        return []
    specs = []
    runs = [p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for run in sorted(runs, key=lambda p: p.name, reverse=True):
        info = read_run_info(run)
        run_model = read_run_model(run)
        for kind in CHECKPOINT_KINDS:
            folder = run / "checkpoints" / kind
            found = complete_folder(folder)  # a write killed midway leaves a complete copy
            if found is None or not (found / "manifest.json").is_file():
                continue
            specs.append(
                ModelSpec(
                    key=checkpoint_key(runs_dir, folder),
                    label=f"{run.name} · {kind}",
                    preset=str(info.get("preset") or fallback_preset),
                    llava=info.get("llava"),
                    sam=info.get("sam"),
                    quantization=info.get("quantization"),
                    checkpoint=str(folder),
                    model=info.get("model"),
                    run_model=run_model,
                )
            )
    return specs


def load_pipeline(spec: ModelSpec) -> Segmenter:
    """The real model behind a spec (imports torch/transformers on first use)."""
    from lisa_demo.infer.pipeline import LisaPipeline

    cfg = spec.model_config()  # downloads a Hub repo's full model on first use
    if spec.model and needs_gpu(spec) and not gpu_available():
        raise ModelUnavailable(gpu_problem(spec))
    return LisaPipeline.from_config(cfg, checkpoint=spec.checkpoint)


class ModelRegistry:
    """Dropdown choices and the loaded model; `get` loads at most one model at a time."""

    def __init__(
        self,
        settings: AppSettings,
        loader: Callable[[ModelSpec], Segmenter] = load_pipeline,
        base_specs: list[ModelSpec] | None = None,
    ):
        """base_specs: the models offered besides run checkpoints (default: offered_models)."""
        self.settings = settings
        self.loader = loader
        self._base_specs = None if base_specs is None else list(base_specs)
        self._lock = threading.Lock()
        self._loaded: tuple[str, Segmenter] | None = None

    def _offered(self) -> tuple[list[ModelSpec], list[str]]:
        if self._base_specs is not None:
            return list(self._base_specs), []
        return offered_models(self.settings)

    def specs(self) -> list[ModelSpec]:
        base, _ = self._offered()
        fallback = base[0].preset if base else self.settings.preset
        return base + find_checkpoint_specs(self.settings.runs_dir, fallback)

    def choices(self) -> list[tuple[str, str]]:
        return [(spec.label, spec.key) for spec in self.specs()]

    def default_key(self) -> str | None:
        """The configured model when offered, else the first choice."""
        keys = [spec.key for spec in self._offered()[0]]
        if CONFIGURED_KEY in keys:
            return CONFIGURED_KEY
        return keys[0] if keys else None

    def status(self) -> str:
        """One line per model that could not be offered ("" when all is well)."""
        return "\n\n".join(self._offered()[1])

    def note(self, key: str | None) -> str:
        """What to say next to the model dropdown about a choice ("" for most models)."""
        spec = next((spec for spec in self.specs() if spec.key == key), None)
        return TINY_MODEL_NOTE if spec is not None and is_bundled_model(spec) else ""

    def get(self, key: str | None) -> Segmenter:
        """The loaded model for a dropdown value; loads it (replacing the previous one)."""
        if not key:
            raise ModelUnavailable(self.status() or "Choose a model in the Model dropdown.")
        specs = {spec.key: spec for spec in self.specs()}
        by_label = {spec.label: spec.key for spec in specs.values()}
        key = key if key in specs else by_label.get(key, key)  # the label the dropdown shows
        if key not in specs:
            known = ", ".join(specs) or "none"
            raise ModelUnavailable(f"Unknown model {key!r}; choose one of: {known}.")
        with self._lock:
            if self._loaded is not None and self._loaded[0] == key:
                return self._loaded[1]
            self._loaded = None  # free the previous model before loading the next
            log.info("loading model %s", specs[key].label)
            try:
                model = self.loader(specs[key])
            except (ValueError, RuntimeError, OSError) as err:
                raise ModelUnavailable(f"Could not load {specs[key].label}: {err}") from err
            self._loaded = (key, model)
            return model
