"""A stand-in for `python -m lisa_demo.train`: same flags it needs, same events.jsonl contract.

Writes a start event, an evaluation before the first step, one log event per step (with a
sleep), an eval (new data and retention) + best checkpoint every other step, then last + end.
A learning rate of 0.01 or more is "harmful": the retention score falls and the run ends with
the retention warning, as the real trainer's does. SIGTERM: finish the step, save last, record
"stopped", exit 0. Knobs (environment): FAKE_TRAINER_STEP_S (seconds per step),
FAKE_TRAINER_IGNORE_SIGTERM=1 (a trainer that hangs on stop, so the app must kill it),
FAKE_TRAINER_STARTUP_S (seconds of start-up before the SIGTERM handler is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

STOP = False


def _on_sigterm(signum, frame) -> None:
    global STOP
    STOP = True


def emit(handle, event: str, **fields: object) -> None:
    handle.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
    handle.flush()


def save_checkpoint(out: Path, kind: str, step: int) -> Path:
    folder = out / "checkpoints" / kind
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"format": "lisa-studio-checkpoint", "version": 1, "step": step, "fake": True}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "trainable.safetensors").write_bytes(b"fake weights")
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--dataset", default=None)
    p.add_argument("--synthetic", type=int, default=0)
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--replay-share", type=float, default=0.5)
    p.add_argument("--retention-margin", type=float, default=0.03)
    p.add_argument("--estimate", action="store_true")
    args, _ = p.parse_known_args(argv)
    time.sleep(float(os.environ.get("FAKE_TRAINER_STARTUP_S", "0")))  # "importing torch"
    ignore = os.environ.get("FAKE_TRAINER_IGNORE_SIGTERM") == "1"
    signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore else _on_sigterm)
    step_s = float(os.environ.get("FAKE_TRAINER_STEP_S", "0.15"))
    total = args.max_steps or 4 * args.epochs
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    print(f"fake trainer: {total} steps into {out}", flush=True)
    if args.estimate:  # --estimate: the measured parts of a duration, then nothing else
        with (out / "events.jsonl").open("a") as events:
            emit(events, "estimate", startup_s=0.5, step_s=step_s, eval_s=0.25,
                 total_steps=total, evaluations=total // 2, total_s=0.0,
                 loop_start_time=time.time())  # fmt: skip
            emit(events, "end", status="estimated", error=None, step=0, warning=None)
        return 0
    harmful = args.learning_rate >= 0.01
    retention_before = 0.8

    def scores(step: int) -> dict:
        giou = min(1.0, 0.1 * step + 0.2)
        kept = retention_before - (0.1 * step if harmful else 0.0)
        return {
            "giou": giou, "ciou": giou * 0.9, "seg_rate": 1.0, "n": 2,
            "retention_giou": kept, "retention_ciou": kept * 0.95, "retention_n": 3,
        }  # fmt: skip

    with (out / "events.jsonl").open("a") as events:
        emit(
            events,
            "start",
            config={"argv": sys.argv[1:]},
            dataset={"train": 16, "val": 2, "new": 8, "replay": 8, "retention": 3,
                     "replay_plan": "replay: 8 fake scenes; retention: 3 fake scenes"},
            trainable_params=1234,
            total_steps=total,
            future_key="ignored",
        )  # fmt: skip
        emit(events, "future_event", detail="readers must ignore this")
        emit(events, "eval", step=0, epoch=0, before=True, **scores(0))
        step, best, best_kept = 0, None, None
        while step < total and not STOP:
            time.sleep(step_s)
            step += 1
            loss = 2.0 / step
            emit(
                events,
                "log",
                step=step,
                epoch=step / total,
                loss=loss,
                ce_loss=loss / 2,
                bce_loss=loss / 4,
                dice_loss=loss / 4,
                lr=3e-4,
                samples_per_sec=10.0,
                memory_mb=100.0,
                total_steps=total,
                eta_seconds=(total - step) * step_s,
            )
            if step % 2 == 0:
                metrics = scores(step)
                emit(events, "eval", step=step, epoch=step / total, before=False, **metrics)
                if best is None or not harmful:  # harmful: the least-forgetting one stays
                    best, best_kept = step, metrics["retention_giou"]
                    path = save_checkpoint(out, "best", step)
                    emit(events, "checkpoint", step=step, kind="best", path=str(path),
                         metric=metrics["giou"])  # fmt: skip
        path = save_checkpoint(out, "last", step)
        emit(events, "checkpoint", step=step, kind="last", path=str(path), metric=None)
        warning = None
        if best_kept is not None and retention_before - best_kept > args.retention_margin:
            warning = (
                f"the model forgot: retention gIoU fell from {retention_before:.3f} to "
                f"{best_kept:.3f}"
            )
            emit(events, "warning", kind="retention", message=warning)
        emit(
            events, "end", status="stopped" if STOP else "finished", error=None, step=step,
            warning=warning, retention_before=retention_before, retention_best=best_kept,
        )  # fmt: skip
    if warning:
        print(f"warning: {warning}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
