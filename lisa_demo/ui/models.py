"""The models the Inference tab offers, loaded lazily (never at import) behind one lock.

Choices: the bundled tiny model (when assets/tiny-lisa exists), the model configured by flags or
LISA_* variables, and every checkpoint a training run left under the runs folder
(RUN/checkpoints/best|last). A loaded model is kept until another one is asked for.
No gradio here.
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

from lisa_demo.config import BUNDLED_MODEL_DIR, ConfigError, LossWeights, ModelConfig, preset
from lisa_demo.ui.settings import DEFAULT_PRESET, AppSettings

log = logging.getLogger("lisa_demo.ui")

RUN_INFO_FILE = "ui_run.json"  # written by the Training tab: the model a run fine-tuned
CHECKPOINT_KINDS = ("best", "last")
CHECKPOINT_PREFIX = "checkpoint:"
BUNDLED_KEY = "preset:tiny"
MISSING_BUNDLED = (
    f"The bundled model is not in {BUNDLED_MODEL_DIR.name}/ yet, so no model is loaded. "
    "Start the app with `python app.py --preset tiny-random` (random weights, for trying the "
    "interface) or set LISA_PRESET."
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
    # ModelConfig fields a training run recorded in its start event (wins over the preset)
    run_model: dict | None = field(default=None, compare=False, hash=False)

    def model_config(self) -> ModelConfig:
        if self.run_model is not None:
            try:
                return config_from_fields(self.run_model)
            except (TypeError, ValueError) as err:
                log.warning("run config of %s unusable (%s); using preset", self.label, err)
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


def needs_gpu(spec: ModelSpec) -> bool:
    """A 7B-class model (anything not built from the tiny presets) or a quantized one."""
    if spec.quantization not in (None, "none"):
        return True
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


def configured_specs(settings: AppSettings) -> tuple[list[ModelSpec], list[str]]:
    """The bundled and the configured model, and status lines for those that cannot load."""
    specs: list[ModelSpec] = []
    problems: list[str] = []
    custom = settings.preset != DEFAULT_PRESET or settings.llava or settings.sam
    custom = custom or settings.checkpoint or settings.quantization
    if BUNDLED_MODEL_DIR.is_dir():
        specs.append(ModelSpec(BUNDLED_KEY, "bundled tiny LISA", DEFAULT_PRESET))
    elif not custom:
        problems.append(MISSING_BUNDLED)
    if custom:
        spec = _configured_spec(settings)
        if needs_gpu(spec) and not gpu_available():
            problems.append(
                f"{spec.label} needs a GPU and none is available here, so it is not offered; "
                "run on a GPU machine (or a GPU Space) or choose a tiny preset."
            )
        else:
            specs.append(spec)
    return specs, problems


def _configured_spec(settings: AppSettings) -> ModelSpec:
    parts = [settings.preset]
    if settings.llava:
        parts.append(f"llava={settings.llava}")
    if settings.sam:
        parts.append(f"sam={settings.sam}")
    if settings.quantization:
        parts.append(settings.quantization)
    if settings.checkpoint:
        parts.append(f"+ {Path(settings.checkpoint).name}")
    return ModelSpec(
        key="configured",
        label=" ".join(parts),
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
        values["losses"] = LossWeights(**values["losses"])
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
    """The model a run fine-tuned ({"preset", "llava", "sam", "quantization"}), or {}."""
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
            if not (folder / "manifest.json").is_file():
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
                    run_model=run_model,
                )
            )
    return specs


def load_pipeline(spec: ModelSpec) -> Segmenter:
    """The real model behind a spec (imports torch/transformers on first use)."""
    from lisa_demo.infer.pipeline import LisaPipeline

    return LisaPipeline.from_config(spec.model_config(), checkpoint=spec.checkpoint)


class ModelRegistry:
    """Dropdown choices and the loaded model; `get` loads at most one model at a time."""

    def __init__(
        self,
        settings: AppSettings,
        loader: Callable[[ModelSpec], Segmenter] = load_pipeline,
        base_specs: list[ModelSpec] | None = None,
    ):
        self.settings = settings
        self.loader = loader
        if base_specs is None:
            self.base_specs, self.problems = configured_specs(settings)
        else:
            self.base_specs, self.problems = list(base_specs), []
        self._lock = threading.Lock()
        self._loaded: tuple[str, Segmenter] | None = None

    def specs(self) -> list[ModelSpec]:
        fallback = self.base_specs[0].preset if self.base_specs else self.settings.preset
        return self.base_specs + find_checkpoint_specs(self.settings.runs_dir, fallback)

    def choices(self) -> list[tuple[str, str]]:
        return [(spec.label, spec.key) for spec in self.specs()]

    def default_key(self) -> str | None:
        """The configured model when offered, else the first choice."""
        keys = [spec.key for spec in self.base_specs]
        if "configured" in keys:
            return "configured"
        return keys[0] if keys else None

    def status(self) -> str:
        """One line per model that could not be offered ("" when all is well)."""
        return "\n\n".join(self.problems)

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
