"""What a run tells the world: events.jsonl (the app's contract), history and curves, and a
progress line on stdout for people at a terminal.

Event kinds, one JSON object per line, flushed as they happen:
    start       config, dataset counts (new, replay per epoch, retention), trainable
                parameters, total steps
    log         step, epoch, loss and each term, lr, samples_per_sec, memory_mb, eta_seconds
    eval        step, epoch, before (true for the evaluation before the first step), giou, ciou,
                seg_rate, n on the new data; retention_giou, retention_ciou, retention_n on
                the retention set (fine-tunes); selection (what the best checkpoint maximises)
    checkpoint  step, kind (best | last), path, metric
    warning     kind (no_replay | retention), message
    end         status (finished | stopped | failed), error, step, warning (the retention
                warning or null), retention_before, retention_best
Only the main process writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

EVENTS_FILE = "events.jsonl"
HISTORY_FILE = "training_history.json"
PLOT_FILE = "training_history.png"
EVAL_CURVES = (
    ("giou", "new data gIoU"),
    ("ciou", "new data cIoU"),
    ("retention_giou", "retention gIoU"),
    ("retention_ciou", "retention cIoU"),
)


class EventLog:
    """Appends events to OUT/events.jsonl and keeps the history for the curves."""

    def __init__(self, output_dir: Path, enabled: bool = True, history: list | None = None):
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.history: list[dict] = list(history or [])
        self._handle = None
        if enabled:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._handle = (self.output_dir / EVENTS_FILE).open("a", encoding="utf-8")

    def emit(self, event: str, **fields: object) -> dict:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        if event in ("log", "eval"):
            self.history.append(record)
        if self._handle is not None:
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())
        return record

    def write_json(self, name: str, payload: object) -> None:
        """Atomic JSON file in the output folder (main process only)."""
        if not self.enabled:
            return
        tmp = self.output_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(self.output_dir / name)

    def save_history(self) -> None:
        if not self.enabled:
            return
        self.write_json(HISTORY_FILE, self.history)
        plot_history(self.history, self.output_dir / PLOT_FILE)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class ProgressPrinter:
    """Lines on stdout while a run trains: its phases, a progress line (step, loss, rate, time
    left) at the first step, then at most every `every_s` seconds and at the last step, and
    each evaluation. events.jsonl stays the machine-readable stream."""

    def __init__(self, enabled: bool = True, every_s: float = 10.0) -> None:
        self.enabled = enabled
        self.every_s = every_s
        self._last = -math.inf

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def step(
        self, step: int, total: int, loss: float, samples_per_sec: float, eta_seconds: float
    ) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s and step < total:
            return
        self._last = now
        self.line(
            f"step {step}/{total} · loss {loss:.4f} · {samples_per_sec:.1f} samples/s · "
            f"{format_seconds(eta_seconds)} left"
        )

    def evaluation(self, step: int, metrics: dict, before: bool = False) -> None:
        when = "before training" if before else f"at step {step}"
        text = (
            f"validation {when}: new data gIoU {metrics['giou']:.3f} / cIoU {metrics['ciou']:.3f}"
        )
        if "retention_giou" in metrics:
            text += (
                f" · retention gIoU {metrics['retention_giou']:.3f} / cIoU "
                f"{metrics['retention_ciou']:.3f}"
            )
        self.line(text)


def format_seconds(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def load_history(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / HISTORY_FILE
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []


def plot_history(history: list[dict], path: Path) -> None:
    """Loss terms per logged step (left) and validation gIoU / cIoU (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [h for h in history if h["event"] == "log"]
    evals = [h for h in history if h["event"] == "eval"]
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("loss", "ce_loss", "bce_loss", "dice_loss"):
        points = [(h["step"], h[key]) for h in logs if h.get(key) is not None]
        if points:
            ax_loss.plot(*zip(*points, strict=True), label=key)
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="training loss")
    for key, label in EVAL_CURVES:
        points = [(h["step"], h[key]) for h in evals if h.get(key) is not None]
        if points:
            ax_eval.plot(*zip(*points, strict=True), marker="o", label=label)
    ax_eval.set(xlabel="optimizer step", ylabel="IoU", title="validation", ylim=(0, 1))
    for ax in (ax_loss, ax_eval):
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
