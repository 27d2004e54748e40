"""Training runs started from the app: launch, follow events.jsonl, zip checkpoints, stop.

The trainer runs as a child process in its own process group (`python -m lisa_demo.train ...`,
or under `accelerate launch`), writing OUT/events.jsonl. One module-level TrainingManager owns
the run, so it outlives the browser tab that started it: any page (or API client) can follow it,
and a monitor thread keeps reading its events whether anyone watches or not. Stop sends SIGTERM
to the group (the trainer finishes its step, saves checkpoints/last and records "stopped"), then
SIGKILL after a grace period. No gradio here.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from lisa_demo.atomic import complete_folder
from lisa_demo.config import PROJECT_ROOT, ModelConfig
from lisa_demo.data.synthetic import CONCEPTS, LOOK_ALIKE_SHARE
from lisa_demo.train.options import REPLAY_DISTILL
from lisa_demo.ui.archive import ArchiveError, check_dataset, prepare_uploaded_dataset
from lisa_demo.ui.models import RUN_INFO_FILE
from lisa_demo.ui.settings import AppSettings

log = logging.getLogger("lisa_demo.ui")

EVENTS_FILE = "events.jsonl"
TRAINER_LOG = "train.log"
DOWNLOADS_DIR = "downloads"
ENDED = ("finished", "stopped", "failed")
SOURCES = ("synthetic", "zip", "folder")
PRESET_DEFAULT = "preset default"
MAX_LOG_LINES = 1000
POLL_S = 0.25
MAX_CURVE_STEPS = 300  # loss-curve steps sent to the page (thinned beyond that)
LOSS_SERIES = ("loss", "ce_loss", "bce_loss", "dice_loss")
# The validation plot's two curves: the new data and the retention set (what the model knew).
NEW_DATA, RETENTION = "new data gIoU", "retention gIoU"
EVAL_SERIES = (("giou", NEW_DATA), ("retention_giou", RETENTION))
STARTUP_STOP = "stopped before training began"
ESTIMATE_DIR = ".estimates"  # scratch folders of duration estimates, inside the runs folder
ESTIMATE_TIMEOUT_S = 600


class RunBusy(RuntimeError):
    """A run is already in progress; the message names it."""


class RunError(ValueError):
    """A training request that cannot start; the message says why."""


# Launching ----------------------------------------------------------------------------------
def trainer_command(args: list[str], module: str, launcher: str = "python") -> list[str]:
    """The trainer's argv: `python -m MODULE ARGS` or the same under `accelerate launch`."""
    if launcher == "accelerate":
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
        launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        return [*launch, "-m", module, *args]
    return [sys.executable, "-m", module, *args]


@dataclass
class TrainRequest:
    """Everything the Training tab asks for (one field per control)."""

    source: str = "synthetic"  # synthetic | zip | folder
    synthetic_n: int = 64
    exclude_concept: str | None = None
    focus_concept: str | None = None
    zip_path: str | None = None
    folder_path: str | None = None
    preset: str = "tiny"
    model: str | None = None  # full-model folder to fine-tune (instead of the preset)
    length: str = "steps"  # epochs | steps
    epochs: int = 1
    max_steps: int = 50
    learning_rate: float = 3e-4
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    batch_size: int = 2
    grad_accum: int = 1
    max_train_samples: int = 0
    max_val_samples: int = 0
    lr_scheduler: str = "cosine"
    precision: str = PRESET_DEFAULT
    quantization: str = PRESET_DEFAULT
    eval_every: int = 0
    explained_answers: bool = False  # synthetic answers go on to describe the target
    pointing_weight: float = 0.0  # the pointing loss (0 = off); see lisa_demo.train.pretrain
    train_projector: bool = False  # LLaVA's multimodal projector trains too
    lora_dropout: float = ModelConfig.lora_dropout  # on each LoRA layer's input (peft)
    replay_share: float = 0.5  # share of each epoch from the base model's domain
    replay_folder: str | None = None  # server folder of base-domain data (ReasonSeg layout)
    retention_margin: float = 0.03  # gIoU the retention set may lose before the run warns
    # the [SEG] projection and mask decoder learn at this x lr; None: the trainer's default
    # (0 for a full model, whose mask side is trained; 1 for a base preset)
    mask_lr_scale: float | None = None
    replay_distill: float = REPLAY_DISTILL  # MSE weight keeping replay [SEG] prompts at the base's
    look_alikes: tuple[str, ...] = ()  # synthetic: concepts a share of scenes shows by the target

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise RunError(f"data source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "synthetic" and self.synthetic_n < 2:
            raise RunError("generate at least 2 synthetic scenes")
        if self.source == "zip" and not self.zip_path:
            raise RunError("upload a .zip of your dataset (ReasonSeg layout) first")
        if self.source == "folder" and not self.folder_path:
            raise RunError("type the server folder that holds train/ and val/")
        if self.length not in ("epochs", "steps"):
            raise RunError("train for a number of epochs or of steps")
        if (self.epochs if self.length == "epochs" else self.max_steps) < 1:
            raise RunError(f"the number of {self.length} must be at least 1")
        if not self.lora_targets:
            raise RunError("choose at least one LoRA target, e.g. q_proj and v_proj")
        if self.exclude_concept and self.exclude_concept == self.focus_concept:
            raise RunError("a concept cannot be both held out and focused on")
        for concept in self.look_alikes:
            if concept not in CONCEPTS:
                raise RunError(f"unknown look-alike {concept!r}; known: {', '.join(CONCEPTS)}")
            if concept in (self.exclude_concept, self.focus_concept):
                raise RunError(
                    f"{concept!r} cannot be a look-alike and the held-out or focus concept"
                )
        if not self.pointing_weight >= 0:  # also refuses NaN
            raise RunError(f"the pointing loss weight must be >= 0, got {self.pointing_weight}")
        if not 0.0 <= self.lora_dropout < 1.0:  # also refuses NaN
            raise RunError(f"LoRA dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.replay_share < 1.0:
            raise RunError(f"the replay share must be in [0, 1), got {self.replay_share}")
        if not self.retention_margin >= 0:
            raise RunError(f"the retention margin must be >= 0, got {self.retention_margin}")
        if self.mask_lr_scale is not None and not self.mask_lr_scale >= 0:
            raise RunError(f"the mask side's rate scale must be >= 0, got {self.mask_lr_scale}")
        if not self.replay_distill >= 0:
            raise RunError(f"the distillation weight must be >= 0, got {self.replay_distill}")

    def trainer_args(self, output_dir: Path, dataset: Path | None) -> list[str]:
        """The trainer's command-line arguments (without the launcher)."""
        args = ["--output-dir", str(output_dir)]
        args += ["--model", self.model] if self.model else ["--preset", self.preset]
        if dataset is not None:
            args += ["--dataset", str(dataset)]
        else:
            args += ["--synthetic", str(int(self.synthetic_n))]
            if self.exclude_concept:
                args += ["--exclude-concept", self.exclude_concept]
            if self.focus_concept:
                # the concept's name gets its own trainable token rows (a word the base
                # model may never have seen)
                args += ["--focus-concept", self.focus_concept]
                args += ["--train-tokens", self.focus_concept]
            if self.explained_answers:
                args += ["--synthetic-explanations"]
            if self.look_alikes:
                args += ["--look-alikes", *self.look_alikes]
        if self.length == "epochs":
            args += ["--epochs", str(int(self.epochs))]
        else:
            args += ["--max-steps", str(int(self.max_steps))]
        args += ["--learning-rate", repr(float(self.learning_rate))]
        args += ["--lora-r", str(int(self.lora_r)), "--lora-targets", *self.lora_targets]
        args += ["--lora-dropout", repr(float(self.lora_dropout))]
        args += ["--batch-size", str(int(self.batch_size))]
        args += ["--grad-accum", str(int(self.grad_accum))]
        args += ["--max-train-samples", str(int(self.max_train_samples))]
        args += ["--max-val-samples", str(int(self.max_val_samples))]
        args += ["--lr-scheduler", self.lr_scheduler, "--eval-every", str(int(self.eval_every))]
        args += ["--replay-share", repr(float(self.replay_share))]
        args += ["--retention-margin", repr(float(self.retention_margin))]
        if self.mask_lr_scale is not None:
            args += ["--mask-lr-scale", repr(float(self.mask_lr_scale))]
        args += ["--replay-distill", repr(float(self.replay_distill))]
        if self.replay_folder:
            args += ["--replay-dir", self.replay_folder]
        if self.train_projector:
            args += ["--train-projector"]
        if self.pointing_weight > 0:
            args += ["--pointing-weight", repr(float(self.pointing_weight))]
        if self.precision != PRESET_DEFAULT:
            args += ["--precision", self.precision]
        if self.quantization != PRESET_DEFAULT:
            args += ["--quantization", self.quantization]
        return args


# Events -------------------------------------------------------------------------------------
def parse_event_lines(data: bytes) -> tuple[list[dict], bytes]:
    """Complete JSON lines of `data` as dicts, and the trailing partial line (kept for later).

    Lines that are not JSON objects are skipped: the file is written by another process and a
    reader must never fail on it.
    """
    *lines, rest = data.split(b"\n")
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            events.append(event)
    return events, rest


class EventReader:
    """Reads events appended to one events.jsonl since the last call."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self) -> list[dict]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        events, self.partial = parse_event_lines(self.partial + data)
        return events


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _fmt(value: object, spec: str = ".4g") -> str:
    number = _number(value)
    return "–" if number is None else format(number, spec)


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "–"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class Checkpoint:
    kind: str  # best | last
    step: int | None
    path: str  # the checkpoint folder
    metric: float | None = None
    zip_path: str | None = None  # downloadable copy


@dataclass
class RunState:
    """What a follower shows; updated from events by the monitor thread."""

    run_id: str
    run_dir: Path
    summary: str = ""  # data source, one line
    status: str = "starting"  # starting | running | finished | stopped | failed
    error: str | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    eta_seconds: float | None = None
    log_lines: list[str] = field(default_factory=list)
    losses: list[tuple[int, str, float]] = field(default_factory=list)
    evals: list[tuple[int, str, float]] = field(default_factory=list)
    checkpoints: dict[str, Checkpoint] = field(default_factory=dict)
    scores: dict[int, dict] = field(default_factory=dict)  # step -> eval event (step 0: before)
    before: dict | None = None  # the evaluation before the first step
    warnings: list[str] = field(default_factory=list)  # shown on the page until the next run
    replay: str | None = None  # where replay and retention data come from, one line
    exited: bool = False  # the trainer process is gone (final state)
    version: int = 0

    def add_line(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.log_lines.append(f"[{stamp}] {line}")
        del self.log_lines[:-MAX_LOG_LINES]

    def apply(self, event: dict) -> None:
        """Fold one event in; unknown events and keys are ignored."""
        handler = getattr(self, f"_on_{event['event']}", None)
        if handler is not None:
            handler(event)
            self.version += 1

    def _on_start(self, e: dict) -> None:
        self.status = "running"
        self.total_steps = int(e["total_steps"]) if _number(e.get("total_steps")) else None
        data = e.get("dataset") if isinstance(e.get("dataset"), dict) else {}
        replayed = _number(data.get("replay"))
        mixed = f" ({_fmt(data.get('new'))} new + {replayed:.0f} replay)" if replayed else ""
        self.add_line(
            f"started: {data.get('train', '?')} train samples per epoch{mixed} / "
            f"{data.get('val', '?')} val, {_fmt(e.get('trainable_params'), ',.0f')} trainable "
            f"parameters, {self.total_steps or '?'} steps"
        )
        if isinstance(data.get("replay_plan"), str):
            self.replay = data["replay_plan"]
            self.add_line(self.replay)

    def _on_log(self, e: dict) -> None:
        self.status = "running"
        step = int(e.get("step") or 0)
        self.step = max(self.step, step)
        self.epoch = _number(e.get("epoch"))
        self.eta_seconds = _number(e.get("eta_seconds"))
        if _number(e.get("total_steps")):
            self.total_steps = int(e["total_steps"])
        for key in LOSS_SERIES:
            value = _number(e.get(key))
            if value is not None:
                self.losses.append((step, key, value))
        terms = ", ".join(f"{k[:-5]} {_fmt(e.get(k))}" for k in LOSS_SERIES[1:] if k in e)
        self.add_line(
            f"step {step}/{self.total_steps or '?'} · epoch {_fmt(e.get('epoch'), '.2f')} · "
            f"loss {_fmt(e.get('loss'))} ({terms}) · lr {_fmt(e.get('lr'), '.2e')} · "
            f"{_fmt(e.get('samples_per_sec'), '.2f')} samples/s · "
            f"{_fmt(e.get('memory_mb'), '.0f')} MB"
        )

    def _on_eval(self, e: dict) -> None:
        step = int(e.get("step") or 0)
        for key, name in EVAL_SERIES:
            value = _number(e.get(key))
            if value is not None:
                self.evals.append((step, name, value))
        self.scores[step] = e
        if e.get("before") is True:
            self.before = e
        when = "before training" if e.get("before") is True else f"@ step {step}"
        line = (
            f"validation {when}: gIoU {_fmt(e.get('giou'), '.3f')} · "
            f"cIoU {_fmt(e.get('ciou'), '.3f')} · [SEG] rate {_fmt(e.get('seg_rate'), '.2f')} "
            f"(n={e.get('n', '?')})"
        )
        if _number(e.get("retention_giou")) is not None:
            line += (
                f" · retention gIoU {_fmt(e.get('retention_giou'), '.3f')} · cIoU "
                f"{_fmt(e.get('retention_ciou'), '.3f')} (n={e.get('retention_n', '?')})"
            )
        self.add_line(line)

    def _on_warning(self, e: dict) -> None:
        message = str(e.get("message") or "")
        if message and message not in self.warnings:
            self.warnings.append(message)
            self.add_line(f"warning: {message}")

    def _on_checkpoint(self, e: dict) -> None:
        kind = str(e.get("kind") or "last")
        path = str(e.get("path") or self.run_dir / "checkpoints" / kind)
        step = int(e["step"]) if _number(e.get("step")) is not None else None
        self.checkpoints[kind] = Checkpoint(kind, step, path, _number(e.get("metric")))
        metric = f", metric {_fmt(e.get('metric'), '.3f')}" if "metric" in e else ""
        self.add_line(f"saved {kind} checkpoint (step {step}{metric}): {path}")

    def _on_end(self, e: dict) -> None:
        status = str(e.get("status") or "finished")
        self.status = status if status in ENDED else "failed"
        self.error = str(e["error"]) if e.get("error") else None
        self.ended = _number(e.get("time")) or time.time()
        if _number(e.get("step")) is not None:
            self.step = int(e["step"])
        if e.get("warning"):
            self._on_warning({"message": e["warning"]})
        line = f"run {self.status} at step {self.step}"
        self.add_line(f"{line}: {self.error}" if self.error else line)

    # Views --------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.exited and self.status in ENDED

    def progress_markdown(self) -> str:
        elapsed = (self.ended or time.time()) - self.started
        total = self.total_steps
        steps = f"step {self.step} / {total}" if total else f"step {self.step}"
        if total:
            steps += f" ({100 * self.step / total:.0f}%)"
        parts = [f"**{self.status}**", steps, f"elapsed {format_duration(elapsed)}"]
        if self.status in ("starting", "running"):
            eta = self.eta_seconds
            if eta is None and total and self.step:
                eta = elapsed / self.step * (total - self.step)
            if eta is not None:
                parts.append(f"about {format_duration(eta)} left")
        text = f"Run `{self.run_id}`: " + " · ".join(parts)
        for warning in self.warnings:
            text += f"\n\n**Warning: {warning}**"
        if self.summary:
            text += f"\n\nData: {self.summary}"
        if self.replay:
            text += f"\n\nReplay and retention: {self.replay}"
        table = self.scores_markdown()
        if table:
            text += f"\n\n{table}"
        if self.error:
            text += f"\n\n**Error:** {self.error}"
        return text

    def best_scores(self) -> dict | None:
        """The evaluation of the best checkpoint (its step's eval event), if known."""
        best = self.checkpoints.get("best")
        return None if best is None or best.step is None else self.scores.get(best.step)

    def scores_markdown(self) -> str:
        """gIoU / cIoU on both validation sets: before the run, at the latest evaluation and
        at the best checkpoint (what "Use in Inference" loads)."""
        if not self.scores:
            return ""
        latest_step = max(self.scores)
        columns = [("before", self.before)]
        if latest_step or self.before is None:
            columns.append((f"step {latest_step}", self.scores[latest_step]))
        best = self.best_scores()
        if best is not None:
            columns.append((f"best (step {best.get('step')})", best))
        rows = [("new data", ""), ("retention", "retention_")]
        lines = [
            "| gIoU / cIoU | " + " | ".join(name for name, _ in columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for label, prefix in rows:
            if prefix and not any(e and f"{prefix}giou" in e for _, e in columns):
                continue
            cells = [
                f"{_fmt(e.get(f'{prefix}giou'), '.3f')} / {_fmt(e.get(f'{prefix}ciou'), '.3f')}"
                if e
                else "–"
                for _, e in columns
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def log_text(self) -> str:
        return "\n".join(self.log_lines)

    def loss_frame(self, max_steps: int = MAX_CURVE_STEPS) -> pd.DataFrame:
        """The loss curves, at most `max_steps` steps of them (evenly thinned, the newest step
        always kept): a long run's page update stays small and cheap to build."""
        steps = sorted({row[0] for row in self.losses})
        if len(steps) <= max_steps:
            return curve_frame(self.losses)
        stride = -(-len(steps) // max_steps)  # ceil
        keep = set(steps[::-1][::stride])
        return curve_frame([row for row in self.losses if row[0] in keep])

    def eval_frame(self) -> pd.DataFrame:
        return curve_frame(self.evals)

    def checkpoint_files(self) -> list[str]:
        return [c.zip_path for c in self.checkpoints.values() if c.zip_path]

    def best_checkpoint(self) -> Path | None:
        """checkpoints/best if it exists, else checkpoints/last."""
        for kind in ("best", "last"):
            folder = self.run_dir / "checkpoints" / kind
            if has_checkpoint(folder):
                return folder
        return None


def has_checkpoint(folder: Path) -> bool:
    """Whether a complete checkpoint stands for `folder` (a write killed midway included)."""
    found = complete_folder(folder)
    return found is not None and (found / "manifest.json").is_file()


def curve_frame(rows: list[tuple[int, str, float]]) -> pd.DataFrame:
    """Long-format curve points (step, series, value) with numeric dtypes even when empty.

    An untyped empty frame makes the plot treat the axes as categories.
    """
    frame = pd.DataFrame(rows, columns=["step", "series", "value"])
    return frame.astype({"step": "int64", "series": "str", "value": "float64"})


# Checkpoint downloads -----------------------------------------------------------------------
def zip_folder(folder: Path, destination: Path, name: str | None = None) -> Path:
    """Zip a folder's files into `destination` under NAME/ (default: the folder's name),
    atomically."""
    tmp = destination.with_name(f".{destination.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, Path(name or folder.name) / path.relative_to(folder))
    tmp.replace(destination)
    return destination


def zip_checkpoint(state: RunState, checkpoint: Checkpoint) -> str | None:
    """Zip a checkpoint folder to RUN/downloads/RUN-KIND.zip (replaced atomically).

    One stable name per kind: a follower may still be sending the previous zip while the
    next checkpoint is zipped, so a path once handed out never disappears.
    """
    folder = Path(checkpoint.path)
    if not folder.is_absolute():
        folder = state.run_dir / folder
    downloads = state.run_dir / DOWNLOADS_DIR
    downloads.mkdir(exist_ok=True)
    destination = downloads / f"{state.run_id}-{checkpoint.kind}.zip"
    for _ in range(3):  # the trainer may be swapping the folder in right now
        try:
            found = complete_folder(folder)
            if found is not None:
                return str(zip_folder(found, destination, name=folder.name))
        except (FileNotFoundError, NotADirectoryError):
            pass
        time.sleep(0.2)
    return None


# The run and the manager --------------------------------------------------------------------
class TrainingRun:
    """One trainer process and the monitor thread that folds its events into a RunState."""

    def __init__(self, state: RunState, process: subprocess.Popen, stop_timeout_s: float):
        self.state = state
        self.process = process
        self.stop_timeout_s = stop_timeout_s
        self.stop_requested = False
        self.killed = False
        self._lock = threading.Lock()
        self._reader = EventReader(state.run_dir / EVENTS_FILE)
        self._monitor = threading.Thread(target=self._follow, name=f"run-{state.run_id}")
        self._monitor.daemon = True
        self._monitor.start()

    def snapshot(self) -> RunState:
        with self._lock:
            return copy.deepcopy(self.state)

    @property
    def version(self) -> int:
        """Changes whenever the state does; cheap (no copy) for a follower's polling."""
        return self.state.version

    @property
    def alive(self) -> bool:
        return not self.state.exited

    def _follow(self) -> None:
        while True:
            exited = self.process.poll() is not None
            self._apply(self._reader.read())
            if exited:
                self._finish(self.process.returncode)
                return
            time.sleep(POLL_S)

    def _apply(self, events: list[dict]) -> None:
        for event in events:
            with self._lock:
                self.state.apply(event)
                checkpoint = None
                if event["event"] == "checkpoint":
                    checkpoint = self.state.checkpoints.get(str(event.get("kind") or "last"))
            if checkpoint is not None:
                self._zip(checkpoint)

    def _zip(self, checkpoint: Checkpoint) -> None:
        zip_path = zip_checkpoint(self.state, checkpoint)
        with self._lock:
            checkpoint.zip_path = zip_path
            if zip_path is None:
                self.state.add_line(f"could not zip the {checkpoint.kind} checkpoint")
            self.state.version += 1

    def _finish(self, returncode: int) -> None:
        for kind in ("best", "last"):  # checkpoints written without an event still count
            folder = self.state.run_dir / "checkpoints" / kind
            if kind not in self.state.checkpoints and has_checkpoint(folder):
                checkpoint = Checkpoint(kind, None, str(folder))
                with self._lock:
                    self.state.checkpoints[kind] = checkpoint
                self._zip(checkpoint)
        with self._lock:
            state = self.state
            if state.status not in ENDED:
                state.ended = time.time()
                if self.killed:
                    state.status, state.error = "stopped", self._killed_message()
                elif returncode == 0:
                    state.status = "finished"
                elif self.stop_requested and returncode == -signal.SIGTERM:
                    # SIGTERM arrived before the trainer set up its handler (while it was
                    # still importing or loading): the stop the user asked for, not a failure.
                    state.status = "stopped"
                    state.add_line(STARTUP_STOP)
                else:
                    state.status = "failed"
                    state.error = f"the trainer exited with code {returncode}: {self._log_tail()}"
                state.add_line(f"run {state.status}" + (f": {state.error}" if state.error else ""))
            state.exited = True
            state.version += 1

    def _killed_message(self) -> str:
        return f"killed: the trainer did not stop within {self.stop_timeout_s:.0f} s of SIGTERM"

    def _log_tail(self, lines: int = 12) -> str:
        try:
            text = (self.state.run_dir / TRAINER_LOG).read_text(errors="replace")
        except OSError:
            return "(no trainer output)"
        tail = [line for line in text.splitlines() if line.strip()][-lines:]
        return "\n".join(tail) or "(no trainer output)"

    def request_stop(self) -> str:
        """SIGTERM the run's process group; SIGKILL it if still alive after the grace period."""
        if not self.alive:
            return f"Run {self.state.run_id} already ended ({self.state.status})."
        with self._lock:
            if self.stop_requested:
                return f"Stop already requested for run {self.state.run_id}; it is finishing."
            self.stop_requested = True
            self.state.add_line("stop requested: finishing the current step, saving last")
            self.state.version += 1
        _signal_group(self.process.pid, signal.SIGTERM)
        threading.Thread(target=self._kill_after_timeout, daemon=True).start()
        return (
            f"Stop requested for run {self.state.run_id}: it finishes its step, saves "
            "checkpoints/last and ends."
        )

    def _kill_after_timeout(self) -> None:
        try:
            self.process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.killed = True
            _signal_group(self.process.pid, signal.SIGKILL)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session=True: the group id is the child's pid
    except ProcessLookupError:
        pass


def _new_run_dir(runs_dir: Path) -> Path:
    runs_dir.mkdir(parents=True, exist_ok=True)
    base = time.strftime("run-%Y%m%d-%H%M%S")
    for i in range(1000):
        folder = runs_dir / (base if i == 0 else f"{base}-{i}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RunError(f"cannot create a run folder in {runs_dir}")


def _prepare_data(request: TrainRequest, run_dir: Path) -> tuple[Path | None, str]:
    """The dataset folder the trainer reads (None: synthetic) and a one-line summary."""
    if request.source == "zip":
        return prepare_uploaded_dataset(request.zip_path, run_dir / "data")
    if request.source == "folder":
        folder = Path(request.folder_path).expanduser()
        return folder, check_dataset(folder)
    held = f", without {request.exclude_concept}" if request.exclude_concept else ""
    focus = f", every target a {request.focus_concept}" if request.focus_concept else ""
    alike = " or ".join(request.look_alikes)
    alike = f", {LOOK_ALIKE_SHARE:.0%} of them with a {alike} beside the target" if alike else ""
    return None, f"{request.synthetic_n} synthetic scenes{held}{focus}{alike}"


class TrainingManager:
    """At most one training run per server process; the latest one stays for followers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starting = False
        self.run: TrainingRun | None = None

    def start(self, settings: AppSettings, request: TrainRequest) -> TrainingRun:
        """Prepare the data and launch the trainer; RunBusy if a run is in progress."""
        with self._lock:
            if self._starting or (self.run is not None and self.run.alive):
                raise RunBusy(self._busy_message())
            self._starting = True
        try:
            run = self._launch(settings, request)
        finally:
            with self._lock:
                self._starting = False
        with self._lock:
            self.run = run
        return run

    def _busy_message(self) -> str:
        if self.run is None or not self.run.alive:
            return "A training run is being started; wait for it, then stop it to start another."
        state = self.run.snapshot()
        return (
            f"A training run is already in progress (run {state.run_id}, step {state.step}/"
            f"{state.total_steps or '?'}). Only one run at a time: stop it or wait for it to end."
        )

    def _launch(self, settings: AppSettings, request: TrainRequest) -> TrainingRun:
        run_dir = _new_run_dir(settings.runs_dir)
        try:
            dataset, summary = _prepare_data(request, run_dir)
        except ArchiveError as err:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise RunError(str(err)) from err
        args = request.trainer_args(run_dir, dataset)
        same_model = request.model is None and request.preset == settings.preset
        info = {"preset": request.preset, "request": asdict(request), "summary": summary}
        if request.model:
            info["model"] = request.model
        for name in ("llava", "sam"):
            value = getattr(settings, name) if same_model else None
            if value:
                args += [f"--{name}", value]
                info[name] = value
        if request.quantization != PRESET_DEFAULT:
            info["quantization"] = request.quantization
        (run_dir / RUN_INFO_FILE).write_text(json.dumps(info, indent=2))
        command = trainer_command(args, settings.trainer_module, settings.trainer_launcher)
        process = _spawn(command, run_dir)
        state = RunState(run_id=run_dir.name, run_dir=run_dir, summary=summary)
        state.add_line(f"launched: {' '.join(command[1:])}")
        return TrainingRun(state, process, settings.stop_timeout_s)

    def estimate(self, settings: AppSettings, request: TrainRequest) -> dict:
        """Time the request's run without training it (the trainer's --estimate): RunBusy
        while a run is in progress (it would slow both and skew the measure)."""
        with self._lock:
            if self._starting or (self.run is not None and self.run.alive):
                raise RunBusy(
                    "A training run is in progress: its progress line gives the time left. "
                    "Estimate after it ends."
                )
            self._starting = True
        try:
            return estimate_run(settings, request)
        finally:
            with self._lock:
                self._starting = False

    def snapshot(self) -> RunState | None:
        run = self.run
        return None if run is None else run.snapshot()

    def version(self) -> tuple[int, int] | None:
        """(which run, its state's version), or None without a run: no copy is made."""
        run = self.run
        return None if run is None else (id(run), run.version)

    def stop(self) -> str:
        run = self.run
        if run is None or not run.alive:
            return "No training run is in progress."
        return run.request_stop()

    def shutdown(self) -> None:
        """SIGTERM a live run when the server exits (it still saves checkpoints/last)."""
        run = self.run
        if run is not None and run.alive:
            _signal_group(run.process.pid, signal.SIGTERM)


def estimate_run(settings: AppSettings, request: TrainRequest) -> dict:
    """Run the trainer with --estimate on these settings in a scratch folder of the runs
    folder (removed afterwards) and return its estimate, with the start-up measured from the
    launch (Python and library imports included) and the total recomputed from it."""
    scratch = _new_run_dir(settings.runs_dir / ESTIMATE_DIR)
    try:
        try:
            dataset, _ = _prepare_data(request, scratch)
        except ArchiveError as err:
            raise RunError(str(err)) from err
        args = [*request.trainer_args(scratch / "run", dataset), "--estimate"]
        if request.preset == settings.preset:
            for name in ("llava", "sam"):
                if getattr(settings, name):
                    args += [f"--{name}", getattr(settings, name)]
        command = trainer_command(args, settings.trainer_module, settings.trainer_launcher)
        launched = time.time()
        try:
            done = subprocess.run(
                command, cwd=PROJECT_ROOT, env=_trainer_env(), stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=ESTIMATE_TIMEOUT_S,
            )  # fmt: skip
        except subprocess.TimeoutExpired as err:
            raise RunError(f"the estimate took more than {ESTIMATE_TIMEOUT_S} s") from err
        events = EventReader(scratch / "run" / EVENTS_FILE).read()
        found = [e for e in events if e["event"] == "estimate"]
        if not found:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            ended = [e for e in events if e["event"] == "end" and e.get("error")]
            raise RunError(f"could not estimate: {ended[-1]['error'] if ended else tail}")
        estimate = dict(found[-1])
        startup = max(0.0, float(estimate["loop_start_time"]) - launched)
        estimate["startup_s"] = round(startup, 1)
        estimate["total_s"] = round(
            startup
            + float(estimate["step_s"]) * int(estimate["total_steps"])
            + float(estimate["eval_s"]) * int(estimate["evaluations"]),
            1,
        )
        return estimate
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def estimate_markdown(estimate: dict) -> str:
    """One paragraph: the estimated duration and what it is made of."""
    return (
        f"**Estimated duration: about {format_duration(estimate['total_s'])}** on this machine "
        f"now: start-up {format_duration(estimate['startup_s'])} (data, model, the evaluation "
        f"before training), {estimate['total_steps']} steps of {estimate['step_s']:.2f} s "
        f"(measured on a few steps just now) and {estimate['evaluations']} evaluations of "
        f"{estimate['eval_s']:.1f} s. Other work on this machine makes it longer."
    )


def _trainer_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    return env


def _spawn(command: list[str], run_dir: Path) -> subprocess.Popen:
    env = _trainer_env()
    with (run_dir / TRAINER_LOG).open("ab") as output:
        return subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


TRAINING = TrainingManager()
atexit.register(TRAINING.shutdown)
