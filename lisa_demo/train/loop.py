"""The training loop: explicit, top to bottom. accelerate handles devices and processes.

python -m lisa_demo.train --synthetic 64 --output-dir runs/demo --max-steps 50
accelerate launch -m lisa_demo.train --dataset data/reasonseg --preset llava-1.5-7b ...

The loop trains LISA. A training recipe may add to it through `Recipe` (the bundled tiny
model's from-scratch recipe, lisa_demo.train.pretrain, is one); the loop knows nothing else
about it.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from lisa_demo.atomic import complete_folder, recover_interrupted_writes
from lisa_demo.checkpoint import WEIGHTS, save_checkpoint
from lisa_demo.config import ConfigError
from lisa_demo.data.reasonseg import ReasonSegDataset, Sample
from lisa_demo.loading import LoadedLisa, load_lisa, save_full_model
from lisa_demo.model import LisaModel
from lisa_demo.train import replay
from lisa_demo.train.data import EmbeddingCache, SampleBatcher, training_inputs
from lisa_demo.train.evaluate import evaluate_samples, seg_rate
from lisa_demo.train.events import EventLog, ProgressPrinter, load_history
from lisa_demo.train.options import TrainConfig
from lisa_demo.train.state import (
    load_optimizer,
    load_trainer_state,
    save_optimizer,
    save_trainer_state,
)


class Recipe(Protocol):
    """What a training recipe adds to LISA's loop; each method is called at one point."""

    def attach(self, model: LisaModel) -> None:
        """Add training-only modules to the model, before a checkpoint's weights load."""

    def before_loop(
        self, model: LisaModel, batcher: SampleBatcher, train_set: ReasonSegDataset,
        n_train: int, world: int, emit: Callable[..., None], should_stop: Callable[[], bool],
    ) -> bool:  # fmt: skip
        """Stages before the loop's first step (a fresh run only); True when they ran."""

    def batch_inputs(self, samples: list[Sample], batch: dict) -> dict:
        """Extra forward arguments for one training batch."""

    def wrap(self, model: LisaModel) -> nn.Module:
        """The module the loop trains: LISA's forward and loss plus the recipe's terms."""


def lr_at(
    step: int, total: int, warmup: int, kind: str, base: float, time_spent: float = 0.0
) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then the schedule.

    `time_spent` (0 to 1) is the share of the time budget the loop has used
    (--schedule-by-time): the schedule then runs at the pace of whichever is further along,
    the steps or the clock, so a run that the budget stops ends with its schedule done."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return base
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_spent))
    if kind == "linear":
        return base * (1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


class _ScheduleClock:
    """The share of the time between the LISA loop's start and the budget's deadline spent."""

    def __init__(self, start: float, deadline: float | None) -> None:
        self.start, self.deadline = start, deadline

    def spent(self) -> float:
        if self.deadline is None or self.deadline <= self.start:
            return 0.0
        return min(1.0, (time.monotonic() - self.start) / (self.deadline - self.start))


def build_optimizer(
    params: list[torch.nn.Parameter],
    cfg: TrainConfig,
    mask_side: set[int] | None = None,
    projector: set[int] | None = None,
) -> torch.optim.Optimizer:
    """AdamW (8 bytes of state per trainable parameter), or bitsandbytes' paged 8-bit AdamW
    (2 bytes, paged to CPU memory under GPU memory pressure; unpaged on a CPU).

    With --mask-lr-scale or --projector-lr-scale other than 1, the parameters whose ids are in
    `mask_side` (or `projector`) form their own group, whose "lr_scale" the loop multiplies the
    scheduled learning rate by."""
    kwargs = {"lr": cfg.learning_rate, "betas": (0.9, 0.95), "weight_decay": cfg.weight_decay}
    parts = [(mask_side or set(), cfg.mask_lr_scale), (projector or set(), cfg.projector_lr_scale)]
    parts = [(ids, scale) for ids, scale in parts if ids and scale != 1.0]
    if parts:
        scaled = set().union(*(ids for ids, _ in parts))
        groups = [{"params": [p for p in params if id(p) not in scaled], "lr_scale": 1.0}]
        groups += [
            {"params": [p for p in params if id(p) in ids], "lr_scale": scale}
            for ids, scale in parts
        ]
        params = [group for group in groups if group["params"]]  # type: ignore[misc]
    if cfg.optimizer == "paged_adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ConfigError(
                "--optimizer paged_adamw_8bit needs bitsandbytes: pip install bitsandbytes"
            ) from err
        return bnb.optim.PagedAdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on a GPU, peak resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class StopRequest:
    """SIGTERM / SIGINT / a time budget: finish the current step, save `last`, exit 0."""

    def __init__(self, max_minutes: float = 0.0) -> None:
        self.requested = False
        self.deadline = time.monotonic() + max_minutes * 60 if max_minutes else None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True

    def local(self) -> bool:
        """This process was asked to stop, or its time budget is spent."""
        return self.requested or (self.deadline is not None and time.monotonic() > self.deadline)

    def should_stop(self, accelerator) -> bool:
        local = self.local()
        flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (per process)
    best_metric: float = -1.0  # the best selection score (replay.selection_score)
    evals_without_improvement: int = 0
    samples_seen: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    retention_before: float | None = None  # the retention metric before the first step
    best_retention: float | None = None  # and at the best checkpoint


@dataclass
class TrainResult:
    """How a run ended: its status and the warning its last line repeats (or None)."""

    status: str  # finished | stopped
    warning: str | None = None


# Data ----------------------------------------------------------------------------------------
def prepare_datasets(cfg: TrainConfig, accelerator) -> tuple[ReasonSegDataset, ReasonSegDataset]:
    """Read (or first generate) train/ and val/; fails with DataError before any model load."""
    root = cfg.dataset
    if cfg.synthetic:
        root = cfg.output_dir / "data"
        if accelerator.is_main_process and not root.exists():
            from lisa_demo.data.synthetic import generate_dataset

            # Generated aside and renamed, so an interrupted run never leaves half a set.
            tmp = root.with_name(f".data-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            splits = {"train": cfg.synthetic, "val": max(4, cfg.synthetic // 4)}
            generate_dataset(
                tmp, splits, cfg.synthetic_seed, cfg.exclude_concept, cfg.focus_concept,
                extra_queries=cfg.synthetic_extra_queries,
                extra_families=cfg.synthetic_extra_families, look_alikes=cfg.look_alikes,
                look_alike_share=cfg.look_alike_share,
            )  # fmt: skip
            tmp.rename(root)
        accelerator.wait_for_everyone()
    explanations = cfg.explanations
    if cfg.synthetic and cfg.synthetic_explanations:
        explanations = Path(root) / "train_explanations.json"
    train = ReasonSegDataset(
        Path(root) / "train", queries=cfg.queries, explanations=explanations, seed=cfg.seed
    )
    val = ReasonSegDataset(Path(root) / "val", queries="first", seed=cfg.seed)
    return train, val


def prepare_replay(
    cfg: TrainConfig, accelerator, train_set: ReasonSegDataset, val_set: ReasonSegDataset
) -> tuple[replay.ReplayPlan | None, ReasonSegDataset]:
    """A fine-tune's replay pool and retention set (None when pretraining with --train-all),
    and the new data's validation set (half of it when it also has to give the retention set).
    """
    if cfg.model.train_all:
        return None, val_set
    limit = cfg.retention_samples
    if cfg.replay_dir is not None:
        plan = replay.plan_from_dir(cfg.replay_dir, cfg.queries, cfg.seed, limit)
        return _without_replay(plan) if not cfg.replay_share else plan, val_set
    domain = replay.synthetic_domain(cfg.model)
    if domain is not None:
        root = cfg.output_dir / replay.REPLAY_DIR
        if accelerator.is_main_process and not root.exists():
            scenes = (cfg.replay_scenes or len(train_set.records)) if cfg.replay_share else 0
            exclude = cfg.focus_concept or domain.get("exclude_concept")
            replay.generate_synthetic(root, domain, scenes, limit or replay.DEFAULT_RETENTION,
                                      cfg.synthetic_seed, exclude)  # fmt: skip
        accelerator.wait_for_everyone()
        return replay.synthetic_plan(root, domain, cfg.seed, limit), val_set
    new_val, held = replay.split_validation(val_set)
    retention = replay.first_queries(held, limit) if held is not None else []
    plan = replay.ReplayPlan(
        "none", None, retention,
        "no replay; retention: every second image of the validation split"
        if retention else "no replay and no retention set (a single validation image)",
        warning=replay.NO_REPLAY_WARNING if cfg.replay_share else None,
    )  # fmt: skip
    return plan, new_val


def _without_replay(plan: replay.ReplayPlan) -> replay.ReplayPlan:
    return replay.ReplayPlan(plan.source, None, plan.retention, plan.description, plan.warning)


def epoch_batches(
    n_samples: int, batch_size: int, seed: int, epoch: int, rank: int, world: int
) -> list[list[int]]:
    """This process's batches of sample indices for one epoch (same count on every rank)."""
    order = list(range(n_samples))
    random.Random(f"order/{seed}/{epoch}").shuffle(order)
    per_rank = len(order) // world
    mine = order[rank * per_rank : (rank + 1) * per_rank]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


# Checkpoints -------------------------------------------------------------------------------------
def write_checkpoint(
    kind: str, cfg: TrainConfig, loaded: LoadedLisa, model, optimizer, progress: Progress,
    metrics: dict | None,
) -> Path:  # fmt: skip
    folder = cfg.output_dir / "checkpoints" / kind

    def extra(tmp: Path) -> None:
        save_optimizer(optimizer, tmp)
        save_trainer_state(tmp, {
            "step": progress.step, "epoch": progress.epoch,
            "batch_in_epoch": progress.batch_in_epoch, "best_metric": progress.best_metric,
            "evals_without_improvement": progress.evals_without_improvement,
            "samples_seen": progress.samples_seen, "metrics": metrics,
            "retention_before": progress.retention_before,
            "best_retention": progress.best_retention,
        })  # fmt: skip

    manifest = loaded.manifest(step=progress.step, epoch=progress.epoch, metrics=metrics)
    return save_checkpoint(folder, model, manifest, extra)


def init_folder(path: Path) -> Path:
    """A checkpoint folder, or a run folder whose checkpoints/warmed is one (--init-from)."""
    for candidate in (path, path / "checkpoints" / "warmed"):
        folder = complete_folder(candidate)
        if folder is not None and (folder / WEIGHTS).exists():
            return folder
    raise ConfigError(
        f"--init-from {path}: no checkpoint there (a folder with {WEIGHTS}, or a "
        "run folder with checkpoints/warmed from --save-warmed)"
    )


def resume_folder(path: Path) -> Path:
    """A run folder (its checkpoints/last) or a checkpoint folder."""
    for candidate in (path / "checkpoints" / "last", path / "checkpoints" / "best", path):
        folder = complete_folder(candidate)
        if folder is not None and (folder / "trainer_state.json").exists():
            return folder
    raise ConfigError(f"--resume {path}: no checkpoints/last with trainer_state.json there")


def remove_leftovers(output_dir: Path) -> None:
    """What a killed earlier run in `output_dir` left: a checkpoint caught between its two
    renames is put back in place, temporary checkpoint and data folders are deleted."""
    recover_interrupted_writes(output_dir / "checkpoints")
    if output_dir.is_dir():
        for stale in output_dir.glob(".data-*"):
            shutil.rmtree(stale, ignore_errors=True)


# The loop --------------------------------------------------------------------------------------
def train(cfg: TrainConfig, recipe: Recipe | None = None) -> TrainResult:
    """Run training; returns its end status ("finished" or "stopped") and the retention
    warning, if any. Raises on failure."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    precision = cfg.model.precision
    mixed = {"bf16": "bf16", "fp16": "fp16" if cuda else "no"}.get(precision, "no")
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision=mixed,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    stop = StopRequest(cfg.max_minutes)
    if accelerator.is_main_process:
        remove_leftovers(cfg.output_dir)
    accelerator.wait_for_everyone()
    resume = resume_folder(cfg.resume) if cfg.resume else None
    history = load_history(cfg.resume if cfg.resume and (cfg.resume / "events.jsonl").exists()
                           else cfg.output_dir) if resume else []  # fmt: skip
    events = EventLog(cfg.output_dir, enabled=accelerator.is_main_process, history=history)
    try:
        return _run(cfg, accelerator, events, stop, resume, recipe)
    except BaseException as err:
        events.emit("end", status="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        events.close()


def _run(
    cfg: TrainConfig, accelerator, events: EventLog, stop: StopRequest, resume,
    recipe: Recipe | None,
) -> TrainResult:  # fmt: skip
    entered = time.monotonic()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    is_main_rank = accelerator.is_main_process

    # Phase 1: data (cheap, fails early), replay and retention data, then the model.
    printer = ProgressPrinter(enabled=is_main_rank)
    printer.line(f"preparing the data in {cfg.output_dir}")
    train_set, val_set = prepare_datasets(cfg, accelerator)
    n_new = min(len(train_set), cfg.max_train_samples or len(train_set))
    plan, val_set = prepare_replay(cfg, accelerator, train_set, val_set)
    if plan is not None and plan.warning:
        printer.line(f"warning: {plan.warning}")
    train_mix = replay.mix(train_set, n_new, plan, cfg.replay_share, cfg.seed)
    n_train = len(train_mix)
    val_samples: list[Sample] = replay.first_queries(val_set, cfg.max_val_samples)
    retention: list[Sample] = plan.retention if plan is not None else []
    init = init_folder(cfg.init_from) if cfg.init_from is not None else None
    printer.line("loading the model")
    loaded = load_lisa(cfg.model, checkpoint=resume or init, device=device, for_training=True,
                       attach=recipe.attach if recipe else None)  # fmt: skip
    core = loaded.model
    params = [p for p in core.parameters() if p.requires_grad]
    if cfg.freeze_encoders:
        # The encoders keep requires_grad (checkpoints of a --train-all run hold every
        # weight) but leave the optimizer; their outputs come from the caches below.
        frozen = {id(p) for p in _encoder_parameters(core)}
        params = [p for p in params if id(p) not in frozen]
        core.train_sam_encoder = False
    for p in params:  # master weights in fp32; autocast does the low-precision math
        p.data = p.data.float()
    optimizer = build_optimizer(
        params, cfg, {id(p) for p in _mask_side_parameters(core)},
        {id(p) for p in core.base_llava.model.multi_modal_projector.parameters()},
    )  # fmt: skip
    # `model` is what trains (the recipe's wrapper, if any); `core` the LisaModel inside it,
    # whose weights are saved, evaluated and exported.
    model, optimizer = accelerator.prepare(recipe.wrap(core) if recipe else core, optimizer)
    batcher = SampleBatcher(
        loaded.processor,
        loaded.sam_processor,
        seed=cfg.seed,
        explanation_lead=cfg.explanation_lead,
        image_capacity=cfg.image_store_size,
        fmt=loaded.prompt_format,
    )
    # Frozen image encoders (every run but --train-all): SAM's image embeddings and LLaVA's
    # projected vision features are computed once per image, then reused.
    cache = feature_cache = None
    if (not cfg.model.train_all or cfg.freeze_encoders) and not cfg.no_embedding_cache:
        encoder_id = str(loaded.base["sam"].get("fingerprint") or loaded.base["sam"]["source"])
        cache = EmbeddingCache(encoder_id, disk_dir=cfg.embedding_cache_dir)
        llava_id = str(loaded.base["llava"].get("fingerprint") or loaded.base["llava"]["source"])
        if cfg.freeze_encoders or not _vision_trains(core):
            feature_cache = EmbeddingCache(f"{llava_id}/vision", disk_dir=cfg.embedding_cache_dir)

    # Distillation needs adapters to switch off (LoRA) and replay samples to apply to.
    distill = bool(cfg.replay_distill and train_mix.n_replay and cfg.model.use_lora)
    base = BaseWeights(core, params) if distill else None
    distill_loss: torch.Tensor | None = None
    per_epoch = max(1, (n_train // world) // cfg.batch_size // cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * per_epoch
    epochs = cfg.epochs if not cfg.max_steps else math.ceil(cfg.max_steps / per_epoch)
    eval_every = cfg.eval_every or per_epoch

    progress = Progress()
    if resume is not None:
        state = load_trainer_state(resume)
        load_optimizer(optimizer, resume)
        progress = Progress(
            step=state["step"], epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"],
            best_metric=state["best_metric"],
            evals_without_improvement=state["evals_without_improvement"],
            samples_seen=state.get("samples_seen", 0),
            retention_before=state.get("retention_before"),
            best_retention=state.get("best_retention"),
        )  # fmt: skip
    events.emit(
        "start",
        config=cfg.as_dict(),
        dataset={"train": n_train, "val": len(val_samples),
                 "train_images": len(train_set.records), "new": n_new,
                 "replay": train_mix.n_replay, "retention": len(retention),
                 "replay_plan": plan.description if plan is not None else None,
                 "train_report": train_set.report.summary(),
                 "val_report": val_set.report.summary()},
        trainable_params=sum(p.numel() for p in params),
        total_params=sum(p.numel() for p in core.parameters()),
        total_steps=total_steps, world_size=world, device=str(device),
        resumed_from=str(resume) if resume else None, start_step=progress.step,
        initialized_from=str(init) if init else None,
    )  # fmt: skip
    if plan is not None and plan.warning:
        events.emit("warning", kind="no_replay", message=plan.warning)
    printer.line(
        f"training on {n_new} new samples"
        + (f" + {train_mix.n_replay} replay samples per epoch" if train_mix.n_replay else "")
        + f", {total_steps} steps; validation on {len(val_samples)} new-data images"
        + (f" and {len(retention)} retention images" if retention else "")
    )
    warmed = (
        resume is None
        and recipe is not None
        and recipe.before_loop(core, batcher, train_set, n_new, world, events.emit, stop.local)
    )

    def evaluate_now(before: bool = False) -> dict:
        acc, _ = evaluate_samples(core, batcher, val_samples, cfg.batch_size, device, cache,
                                  accelerator)  # fmt: skip
        rate = float("nan")
        if is_main_rank and cfg.seg_rate_samples:
            rate = seg_rate(core, batcher, val_samples[: cfg.seg_rate_samples], device)
        metrics = {**acc.as_dict(), "seg_rate": rate}
        if retention:
            kept, _ = evaluate_samples(core, batcher, retention, cfg.batch_size, device, cache,
                                       accelerator)  # fmt: skip
            metrics.update({f"retention_{k}": v for k, v in kept.as_dict().items()})
        metrics["selection"] = replay.selection_score(
            metrics[cfg.select_metric], metrics.get(f"retention_{cfg.select_metric}"),
            progress.retention_before, cfg.retention_margin,
        )  # fmt: skip
        events.emit("eval", step=progress.step, epoch=progress.epoch, before=before, **metrics)
        printer.evaluation(progress.step, metrics, before)
        return metrics

    eval_start = time.monotonic()
    if plan is not None and resume is None:
        # The numbers to beat (new data) and to keep (retention), before any step.
        before = evaluate_now(before=True)
        progress.retention_before = before.get(f"retention_{cfg.select_metric}")
    elif cfg.estimate:
        evaluate_now()
    eval_seconds = time.monotonic() - eval_start
    step_times: list[float] = []  # --estimate: when each optimizer step ended

    def save(kind: str, metrics: dict | None) -> None:
        if is_main_rank:
            path = write_checkpoint(kind, cfg, loaded, core, optimizer, progress, metrics)
            events.emit("checkpoint", step=progress.step, kind=kind, path=str(path),
                        metric=(metrics or {}).get(cfg.select_metric))  # fmt: skip
        accelerator.wait_for_everyone()

    if warmed and cfg.save_warmed:  # every weight, before any LISA-loop step (--init-from)
        save("warmed", None)
    if cfg.model.offload_sam_encoder and cache is not None and world == 1:
        # Every image encoded now (the work of the first epoch's cache misses, done earlier),
        # then SAM's image encoder leaves the GPU. One process only: DDP keeps its module's
        # buffers on one device.
        from lisa_demo.memory_savings import offload

        train_images = [train_set[i] for i in range(n_new)]
        if plan is not None and plan.replay is not None:  # every replay sample may be drawn
            train_images += [plan.replay[i] for i in range(len(plan.replay))]
        encoded = encode_every_image(core, batcher, train_images + val_samples + retention,
                                     cache, device, cfg.batch_size)  # fmt: skip
        offload(core.sam.vision_encoder)
        events.emit("sam_encoder_offloaded", images_encoded=encoded,
                    memory_mb=round(peak_memory_mb(device), 1))  # fmt: skip

    status = "finished"
    last_metrics: dict | None = None
    window_start, window_samples = time.monotonic(), 0
    run_start, start_step, run_samples = time.monotonic(), progress.step, 0
    clock = _ScheduleClock(run_start, stop.deadline) if cfg.schedule_by_time else None
    model.train()
    done = progress.step >= total_steps
    while not done and progress.epoch < epochs:
        train_mix.set_epoch(progress.epoch)
        batches = epoch_batches(n_train, cfg.batch_size, cfg.seed, progress.epoch, rank, world)
        micro = 0
        for index, batch_indices in enumerate(batches):
            if index < progress.batch_in_epoch:
                continue  # resumed mid-epoch: these were consumed before the stop
            # Phase 2: one micro-batch forward/backward (gradients accumulate).
            samples = [train_mix[i] for i in batch_indices]
            batch = batcher(samples, training=True, epoch=progress.epoch, indices=batch_indices)
            inputs = training_inputs(batch, device, cache, core.encode_images, feature_cache,
                                     core.encode_image_features)  # fmt: skip
            if recipe is not None:
                inputs.update(recipe.batch_inputs(samples, batch))
            micro += 1
            sync = micro % cfg.grad_accum == 0 or index == len(batches) - 1
            replayed = [n for n, i in enumerate(batch_indices) if train_mix.is_replay(i)]
            with accelerator.autocast():
                # The base model's [SEG] prompts for the replay samples (--replay-distill).
                reference = _base_prompts(core, inputs, base) if base and replayed else None
                with nullcontext() if sync else accelerator.no_sync(model):
                    out = model(**inputs)
                    loss = out.loss
                    if reference is not None:
                        distill_loss = _prompt_distance(out.prompts, reference, replayed)
                        loss = loss + cfg.replay_distill * distill_loss
                    accelerator.backward(loss / cfg.grad_accum)
            progress.batch_in_epoch = index + 1
            window_samples += len(samples) * world
            run_samples += len(samples) * world
            progress.samples_seen += len(samples) * world
            progress.epoch_losses.append(float(out.loss.detach()))
            if not sync:
                continue

            # Phase 3: optimizer step with clipping and the scheduled learning rate.
            lr = lr_at(progress.step, total_steps, cfg.warmup_steps, cfg.lr_scheduler,
                       cfg.learning_rate, clock.spent() if clock else 0.0)  # fmt: skip
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            if cfg.estimate:  # time a few steps; no logs, evaluations or checkpoints
                step_times.append(time.monotonic())
                done = len(step_times) > ESTIMATE_STEPS
                if done:
                    break
                continue

            # Phase 4: log, evaluate, checkpoint, stop.
            if progress.step % cfg.log_every == 0 or progress.step == total_steps:
                elapsed = time.monotonic() - window_start
                per_step = (time.monotonic() - run_start) / max(1, progress.step - start_step)
                events.emit(
                    "log", step=progress.step, epoch=progress.epoch,
                    loss=float(out.loss.detach()), **_loss_terms(out), lr=lr,
                    distill_loss=_num(distill_loss),
                    samples_per_sec=window_samples / max(elapsed, 1e-9),
                    memory_mb=round(peak_memory_mb(device), 1), total_steps=total_steps,
                    eta_seconds=round(per_step * (total_steps - progress.step), 1),
                    embedding_cache=_cache_stats(cache),
                )  # fmt: skip
                window_start, window_samples = time.monotonic(), 0
            per_step = (time.monotonic() - run_start) / max(1, progress.step - start_step)
            printer.step(progress.step, total_steps, float(out.loss.detach()),
                         run_samples / max(time.monotonic() - run_start, 1e-9),
                         per_step * (total_steps - progress.step))  # fmt: skip
            stopping = stop.should_stop(accelerator)
            if progress.step % eval_every == 0 or progress.step >= total_steps or stopping:
                last_metrics = evaluate_now()
                value = last_metrics["selection"]
                if value > progress.best_metric:
                    progress.best_metric = value
                    progress.best_retention = last_metrics.get(f"retention_{cfg.select_metric}")
                    progress.evals_without_improvement = 0
                    save("best", last_metrics)
                else:
                    progress.evals_without_improvement += 1
                if not cfg.save_best_only:
                    save("last", last_metrics)
                events.save_history() if is_main_rank else None
                if cfg.patience and progress.evals_without_improvement >= cfg.patience:
                    events.emit("early_stop", step=progress.step, patience=cfg.patience)
                    done = True
            if stopping:
                status = "stopped"
                done = True
            if progress.step >= total_steps:
                done = True
            if done:
                break
        if not done or progress.batch_in_epoch >= len(batches):
            _end_epoch(events, progress, last_metrics, cache, is_main_rank)
            progress.epoch += 1
            progress.batch_in_epoch = 0

    if cfg.estimate:
        return _report_estimate(cfg, events, printer, entered, run_start, step_times,
                                eval_seconds, total_steps, eval_every)  # fmt: skip

    # Phase 5: final checkpoint, epoch summary, curves, export.
    if progress.batch_in_epoch:
        _end_epoch(events, progress, last_metrics, cache, is_main_rank)
    if status == "stopped" or cfg.save_best_only is False and not _saved_at(cfg, progress.step):
        save("last", last_metrics)
    if is_main_rank:
        events.save_history()
        if cfg.export_model and cfg.model.train_all:
            _export_best(cfg, loaded, core)
    warning = replay.retention_warning(progress.retention_before, progress.best_retention,
                                       cfg.retention_margin)  # fmt: skip
    if warning:
        events.emit("warning", kind="retention", message=warning,
                    before=progress.retention_before, after=progress.best_retention)  # fmt: skip
    events.emit("end", status=status, error=None, step=progress.step,
                best_metric=progress.best_metric, warning=warning,
                retention_before=progress.retention_before,
                retention_best=progress.best_retention,
                peak_memory_mb=round(peak_memory_mb(device), 1))  # fmt: skip
    return TrainResult(status, warning)


ESTIMATE_STEPS = 3  # --estimate times this many optimizer steps, after a first one


def _report_estimate(
    cfg: TrainConfig, events: EventLog, printer: ProgressPrinter, entered: float,
    loop_start: float, step_times: list[float], eval_seconds: float, total_steps: int,
    eval_every: int,
) -> TrainResult:  # fmt: skip
    """--estimate: the run's duration from its measured start-up, evaluation and steps. The
    first step is left out (it also pays one-time costs); later steps of a first epoch still
    encode their images for the first time, as the real run's do."""
    if len(step_times) < 2:
        raise ConfigError("--estimate needs at least two optimizer steps of data")
    step_s = (step_times[-1] - step_times[0]) / (len(step_times) - 1)
    evaluations = total_steps // eval_every + (1 if total_steps % eval_every else 0)
    startup_s = loop_start - entered
    total_s = startup_s + step_s * total_steps + eval_seconds * evaluations
    estimate = {
        "startup_s": round(startup_s, 2), "step_s": round(step_s, 4),
        "eval_s": round(eval_seconds, 2), "total_steps": total_steps,
        "evaluations": evaluations, "total_s": round(total_s, 1),
        "loop_start_time": round(time.time() - (time.monotonic() - loop_start), 3),
    }  # fmt: skip
    events.emit("estimate", **estimate)
    printer.line(json.dumps(estimate))
    events.emit("end", status="estimated", error=None, step=0, warning=None)
    return TrainResult("estimated")


def encode_every_image(
    model, batcher: SampleBatcher, samples: list[Sample], cache: EmbeddingCache, device,
    batch_size: int,
) -> int:  # fmt: skip
    """Put the SAM embedding of every image of `samples` into `cache` (once per image);
    returns how many were encoded."""
    from lisa_demo.memory_savings import encode_all

    images = {}
    for sample in samples:
        encoded = batcher.images.get(sample).encoded
        images.setdefault(encoded.key, encoded.sam_pixel_values)
    keys = list(images)
    batches = (
        {"image_keys": keys[i : i + batch_size],
         "sam_pixel_values": torch.stack([images[k] for k in keys[i : i + batch_size]])}
        for i in range(0, len(keys), batch_size)
    )  # fmt: skip
    return encode_all(batches, cache, model.encode_images, device)


def _saved_at(cfg: TrainConfig, step: int) -> bool:
    """Whether checkpoints/last already holds this step (saved at the final evaluation)."""
    state = cfg.output_dir / "checkpoints" / "last" / "trainer_state.json"
    try:
        return load_trainer_state(state.parent)["step"] == step
    except (ValueError, OSError, KeyError):
        return False


def _num(value) -> float | None:
    return None if value is None else float(value.detach())


def _mask_side_parameters(model) -> list[torch.nn.Parameter]:
    """The [SEG] projection and SAM's mask decoder (what --mask-lr-scale scales)."""
    parts = (model.text_hidden_fcs, model.sam.mask_decoder)
    return [p for part in parts for p in part.parameters()]


class BaseWeights:
    """The starting values of the trainable weights peft cannot switch off (the projection,
    the mask decoder, a trained projector), to swap in for a forward of the model as it was.
    One extra copy of those weights."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter]) -> None:
        trainable = {id(p) for p in params}
        self.saved = [
            (param, param.detach().clone())
            for name, param in model.named_parameters()
            if id(param) in trainable and not _is_adapter(name)
        ]

    @contextmanager
    def swapped_in(self):
        for param, base in self.saved:
            param.data, base.data = base.data, param.data
        try:
            yield
        finally:
            for param, base in self.saved:
                param.data, base.data = base.data, param.data


def _is_adapter(name: str) -> bool:
    """A peft LoRA weight or trainable-token delta (what disable_adapter switches off)."""
    return "lora_" in name or "token_adapter" in name or "trainable_tokens" in name


def _base_prompts(core: LisaModel, inputs: dict, base: BaseWeights) -> list[torch.Tensor]:
    """The [SEG] prompts the model gave before training: the same forward with the LoRA
    adapters and trainable token rows switched off (peft) and the other trained weights at
    their starting values, without gradients."""
    with torch.no_grad(), core.llava.disable_adapter(), base.swapped_in():
        return [prompt.detach() for prompt in core(**inputs).prompts]


def _prompt_distance(
    prompts: list[torch.Tensor], reference: list[torch.Tensor], rows: list[int]
) -> torch.Tensor:
    """Mean squared distance between the batch's [SEG] prompts and the base model's, over the
    samples `rows` (the replay samples)."""
    return torch.stack(
        [torch.nn.functional.mse_loss(prompts[n], reference[n]) for n in rows]
    ).mean()


def _loss_terms(out) -> dict[str, float | None]:
    """Every `*_loss` term of a forward's output (LISA's, plus a recipe's)."""
    return {f.name: _num(getattr(out, f.name)) for f in fields(out) if f.name.endswith("_loss")}


def _encoder_parameters(model) -> list[torch.nn.Parameter]:
    """CLIP's tower and projector and SAM's image encoder (what --freeze-encoders keeps)."""
    llava = model.base_llava.model
    parts = (llava.vision_tower, llava.multi_modal_projector, model.sam.vision_encoder)
    return [p for part in parts for p in part.parameters()]


def _vision_trains(model) -> bool:
    """Whether any weight of LLaVA's vision tower or projector trains (then no feature cache)."""
    llava = model.base_llava
    vision = (llava.model.vision_tower, llava.model.multi_modal_projector)
    return any(p.requires_grad for part in vision for p in part.parameters())


def _cache_stats(cache: EmbeddingCache | None) -> dict | None:
    return None if cache is None else {"hits": cache.hits, "misses": cache.misses}


def _end_epoch(events: EventLog, progress: Progress, metrics, cache, is_main: bool) -> None:
    losses = progress.epoch_losses
    summary = {
        "epoch": progress.epoch,
        "step": progress.step,
        "train_loss": sum(losses) / len(losses) if losses else None,
        "val": metrics,
        "embedding_cache": _cache_stats(cache),
    }
    events.emit("epoch_end", **summary)
    if is_main:
        events.write_json(f"metrics_epoch_{progress.epoch}.json", summary)
    progress.epoch_losses = []


def _export_best(cfg: TrainConfig, loaded: LoadedLisa, core) -> None:
    from lisa_demo.checkpoint import load_trainable_state

    best = complete_folder(cfg.output_dir / "checkpoints" / "best")
    if best is not None:
        load_trainable_state(best, core)
    path = save_full_model(loaded, cfg.output_dir / "model")
    print(f"exported the best model to {path}")
