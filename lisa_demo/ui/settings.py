"""What the app serves and where it keeps things: one dataclass filled from flags and env vars.

Environment variables (a Space sets them as variables or secrets):
    LISA_MODEL         full-model folder to serve (a converted LISA, python -m lisa_demo.convert);
                       excludes LISA_PRESET, LISA_LLAVA and LISA_SAM
    LISA_MODELS_DIR    folder whose full-model subfolders the app offers (default: the project's
                       models/ folder, PROJECT_ROOT/models, wherever the app is started from)
    LISA_PRESET        model preset (default "tiny", the bundled model)
    LISA_LLAVA         LLaVA Hub id or folder, overrides the preset's
    LISA_SAM           SAM Hub id or folder, overrides the preset's
    LISA_CHECKPOINT    fine-tuned checkpoint folder loaded on top of the model or preset
    LISA_QUANTIZATION  none | 8bit | 4bit, overrides the model's or preset's
    LISA_RUNS_DIR      where training runs are written (default ./runs)
    LISA_ALLOW_SERVER_PATHS=1   show a server-side dataset folder box (never on a Space)
    LISA_TRAINER_MODULE         module run as the trainer (default lisa_demo.train)
    LISA_TRAINER_LAUNCHER       python | accelerate
Flags override the variables; a flag naming the model (--model, or --preset/--llava/--sam)
replaces the variables that name it the other way. No gradio here: the settings are plain data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lisa_demo.config import DEFAULT_MODELS_DIR, EXAMPLES_DIR, MODELS_DIR_ENV, PROJECT_ROOT

DEFAULT_PRESET = "tiny"
DEFAULT_TRAINER_MODULE = "lisa_demo.train"
TRAINER_LAUNCHERS = ("python", "accelerate")
LOCAL_HOST = "127.0.0.1"
PUBLIC_HOST = "0.0.0.0"
MODEL_ENV = "LISA_MODEL"
PRESET_NAMING = ("preset", "llava", "sam")  # what --model excludes


@dataclass
class AppSettings:
    """Model choice, folders and trainer launch for one app instance."""

    model: str | None = None  # full-model folder served as the configured model
    models_dir: Path = PROJECT_ROOT / DEFAULT_MODELS_DIR  # full-model folders offered, one each
    preset: str = DEFAULT_PRESET  # the configured model preset (when no `model`)
    llava: str | None = None  # overrides the preset's LLaVA
    sam: str | None = None  # overrides the preset's SAM
    checkpoint: str | None = None  # fine-tuned checkpoint folder on top of the model
    quantization: str | None = None  # overrides the model's or preset's quantization
    runs_dir: Path = PROJECT_ROOT / "runs"  # training runs, one folder each
    examples_dir: Path = EXAMPLES_DIR  # NAME.jpg|png + NAME.json example pairs
    allow_server_paths: bool = False  # offer a server-side dataset folder box
    trainer_module: str = DEFAULT_TRAINER_MODULE  # `python -m` target of a training run
    trainer_launcher: str = "python"  # python | accelerate
    stop_timeout_s: float = 30.0  # SIGTERM grace period before the run's group is killed

    def __post_init__(self) -> None:
        self.runs_dir = Path(self.runs_dir)
        self.examples_dir = Path(self.examples_dir)
        self.models_dir = Path(self.models_dir).expanduser()
        if self.model and (self.llava or self.sam or self.preset != DEFAULT_PRESET):
            raise ValueError(
                "a full model (--model / LISA_MODEL) names the whole model: drop the preset, "
                "--llava and --sam (LISA_PRESET, LISA_LLAVA, LISA_SAM)"
            )
        if self.trainer_launcher not in TRAINER_LAUNCHERS:
            raise ValueError(
                f"trainer launcher must be one of {TRAINER_LAUNCHERS}, "
                f"got {self.trainer_launcher!r}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> AppSettings:
        """Settings from LISA_* variables; keyword overrides (flags) that are not None win."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {
            "model": env.get(MODEL_ENV) or None,
            "preset": env.get("LISA_PRESET") or DEFAULT_PRESET,
            "llava": env.get("LISA_LLAVA") or None,
            "sam": env.get("LISA_SAM") or None,
            "checkpoint": env.get("LISA_CHECKPOINT") or None,
            "quantization": env.get("LISA_QUANTIZATION") or None,
            "allow_server_paths": server_paths_allowed(env),
            "trainer_module": env.get("LISA_TRAINER_MODULE") or DEFAULT_TRAINER_MODULE,
            "trainer_launcher": env.get("LISA_TRAINER_LAUNCHER") or "python",
        }
        if env.get("LISA_RUNS_DIR"):
            values["runs_dir"] = Path(env["LISA_RUNS_DIR"])
        if env.get(MODELS_DIR_ENV):
            values["models_dir"] = Path(env[MODELS_DIR_ENV])
        flags = {k: v for k, v in overrides.items() if v is not None}
        if flags.get("model") is not None:  # --model replaces a preset named in the environment
            values.update(preset=DEFAULT_PRESET, llava=None, sam=None)
        elif any(name in flags for name in PRESET_NAMING):  # and --preset a LISA_MODEL
            values["model"] = None
        values.update(flags)
        return cls(**values)  # type: ignore[arg-type]


def on_space(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a Hugging Face Space (it sets SPACE_ID)."""
    return bool((os.environ if environ is None else environ).get("SPACE_ID"))


def server_paths_allowed(environ: Mapping[str, str] | None = None) -> bool:
    """LISA_ALLOW_SERVER_PATHS=1, ignored on a Space: visitors must not browse its disk."""
    env = os.environ if environ is None else environ
    return env.get("LISA_ALLOW_SERVER_PATHS") == "1" and not on_space(env)


def default_host(environ: Mapping[str, str] | None = None) -> str:
    """0.0.0.0 inside a Space (its proxy must reach the app), else loopback only."""
    return PUBLIC_HOST if on_space(environ) else LOCAL_HOST
