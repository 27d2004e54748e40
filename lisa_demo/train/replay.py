"""Fine-tuning without forgetting: replay data of the base model's domain and a retention set.

A fine-tune on a narrow set (every target a heart) teaches the model that every answer is that
thing, and it forgets the rest. Two remedies live here:

- **Replay**: each epoch mixes the new samples with samples of what the model already knew,
  so that a share (`--replay-share`) of what it trains on comes from its own domain.
- **Retention**: a second validation set from that domain, scored before the run and at every
  evaluation. The best checkpoint is chosen by a rule that counts it (`selection_score`), and
  a run whose best checkpoint lost more than `--retention-margin` on it ends with a warning.

Where the base domain comes from, in this order:
1. `--replay-dir DIR`, a ReasonSeg folder of the base domain: DIR/train (or DIR itself) is
   replayed and DIR/val is the retention set (without val/, every fifth image of DIR is).
2. A full model trained here on synthetic scenes (the bundled model: its manifest's
   training_config names them): synthetic scenes of every concept are generated for replay,
   with the base's answers (explained or not, extra queries), and held-out scenes without the
   focus concept (or the concept the base never saw) for retention.
3. Nothing: no replay (a warning says the model may forget), and the retention set is every
   second image of the new data's validation split, the only held-out data there is.
"""

from __future__ import annotations

import copy
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lisa_demo.config import ConfigError, ModelConfig, read_full_model_manifest
from lisa_demo.data.reasonseg import ReasonSegDataset, Sample

# Synthetic replay and retention scenes come from their own seeds (offsets of the run's
# --synthetic-seed), away from the pretraining seed (1) and the model card's evaluation seeds
# (4242, 4343, 4444, 9001).
REPLAY_SEED_OFFSET = 100_000
RETENTION_SEED_OFFSET = 200_000
RETENTION_EVERY = 5  # --replay-dir without val/: every fifth image is held out for retention
_EPS = 1e-9  # a loss of exactly the margin (up to float rounding) is within it
DEFAULT_RETENTION = 100  # synthetic retention scenes with --retention-samples 0
REPLAY_DIR = "replay"  # OUT/replay: the generated synthetic replay and retention scenes
NO_REPLAY_WARNING = (
    "no replay data for this model's domain: the fine-tune sees only the new data and may "
    "forget what the model knew; give --replay-dir DIR (a ReasonSeg folder of data like its "
    "training data). Retention is measured on half of the new validation data."
)


@dataclass
class ReplayPlan:
    """Where replay samples and the retention set come from for one run."""

    source: str  # "dir" | "synthetic" | "none"
    replay: ReasonSegDataset | None  # the replay pool (None: no replay)
    retention: list[Sample]  # the retention set, first query of each image ([] = none)
    description: str  # one line for the start event and the page
    warning: str | None = None  # said at the start: the run may forget


def synthetic_domain(model: ModelConfig) -> dict | None:
    """The training config of a full model trained here on synthetic scenes (the bundled
    model), or None (a converted LISA, a Hub model, random weights)."""
    if not model.heads or model.train_all:
        return None
    try:
        manifest = read_full_model_manifest(model.heads)
    except ConfigError:
        return None
    config = manifest.get("training_config")
    if isinstance(config, dict) and int(config.get("synthetic") or 0) > 0:
        return config
    return None


def replay_count(n_new: int, share: float) -> int:
    """Replay samples per epoch so that they are `share` of the mixed epoch (0 <= share < 1)."""
    if share <= 0 or n_new <= 0:
        return 0
    return max(1, round(n_new * share / (1.0 - share)))


class ReplayMix(Sequence[Sample]):
    """The new samples (indices 0..n_new-1), then `replay_count(n_new, share)` replay samples.

    The replay part is drawn from the pool without repeats until it is used up (then the next
    pass starts, in a new order); `set_epoch(e)` draws epoch e's part, so each epoch sees other
    replay samples when the pool is larger than one epoch's part. Deterministic per seed.
    """

    def __init__(self, new: Sequence[Sample], replay: Sequence[Sample], share: float, seed: int):
        if not 0.0 <= share < 1.0:
            raise ValueError(f"the replay share must be in [0, 1), got {share}")
        self.new, self.replay = new, replay
        self.n_new = len(new)
        self.n_replay = replay_count(self.n_new, share) if len(replay) else 0
        self.seed = seed
        self.epoch = 0
        self._drawn: list[int] = []
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for part in (self.new, self.replay):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)
        self._drawn = self._draw(epoch)

    def _draw(self, epoch: int) -> list[int]:
        """Pool indices of epoch `epoch`: positions [epoch * k, (epoch + 1) * k) of an endless
        sequence of shuffled passes over the pool."""
        pool, k = len(self.replay), self.n_replay
        orders: dict[int, list[int]] = {}
        drawn = []
        for position in range(epoch * k, (epoch + 1) * k):
            passes, offset = divmod(position, pool)
            if passes not in orders:
                orders[passes] = list(range(pool))
                random.Random(f"replay/{self.seed}/{passes}").shuffle(orders[passes])
            drawn.append(orders[passes][offset])
        return drawn

    def is_replay(self, index: int) -> bool:
        return index >= self.n_new

    def __len__(self) -> int:
        return self.n_new + self.n_replay

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index < self.n_new:
            return self.new[index]
        return self.replay[self._drawn[index - self.n_new]]


class _Prefix(Sequence[Sample]):
    """The first n samples of a dataset (--max-train-samples), keeping set_epoch."""

    def __init__(self, dataset: ReasonSegDataset, n: int) -> None:
        self.dataset, self.n = dataset, n

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.dataset[index]


def mix(train: ReasonSegDataset, n_new: int, plan: ReplayPlan | None, share: float, seed: int):
    """The training sequence: the first n_new new samples, plus replay when the plan has it."""
    new = _Prefix(train, n_new)
    if plan is None or plan.replay is None or share <= 0:
        return ReplayMix(new, [], 0.0, seed)
    return ReplayMix(new, plan.replay, share, seed)


# Choosing the best checkpoint -----------------------------------------------------------------
def selection_score(
    new: float, retention: float | None, retention_before: float | None, margin: float
) -> float:
    """The number the best checkpoint maximises, counting both validation sets.

    Without a retention set: the new data's metric. With one: a checkpoint that kept the
    retention metric within `margin` of its value before the run ranks above every one that
    did not, and among those by the new data's metric (score 1 + new, in [1, 2]); the others
    rank by how little they lost (score 1 - loss, below 1).
    """
    if retention is None or retention_before is None:
        return new
    loss = retention_before - retention
    if loss <= margin + _EPS:
        return 1.0 + new
    return 1.0 - loss


def retention_warning(before: float | None, after: float | None, margin: float) -> str | None:
    """The warning a run ends with when its best checkpoint lost more than `margin`."""
    if before is None or after is None or before - after <= margin + _EPS:
        return None
    return (
        f"the model forgot: retention gIoU fell from {before:.3f} to {after:.3f} "
        f"({before - after:.3f}, more than the {margin:.3f} margin); add replay data "
        "(--replay-share, --replay-dir), lower the learning rate or train fewer weights"
    )


# Building the plan --------------------------------------------------------------------------
def first_queries(dataset: ReasonSegDataset, limit: int = 0) -> list[Sample]:
    """The first query of each image (LISA's validation protocol), at most `limit` (0 = all)."""
    samples = [dataset[i] for i in range(len(dataset))]
    return samples[: limit or None]


def _subset(dataset: ReasonSegDataset, keep) -> ReasonSegDataset:
    """A copy of `dataset` holding the records whose index satisfies `keep`."""
    part = copy.copy(dataset)
    part.records = [r for i, r in enumerate(dataset.records) if keep(i)]
    part.set_epoch(dataset.epoch)
    return part


def split_validation(val: ReasonSegDataset) -> tuple[ReasonSegDataset, ReasonSegDataset | None]:
    """(new-data validation, retention) when there is no base-domain data: every second image
    (odd positions) becomes the retention set; one image stays new-data validation only."""
    if len(val.records) < 2:
        return val, None
    return _subset(val, lambda i: i % 2 == 0), _subset(val, lambda i: i % 2 == 1)


def plan_from_dir(folder: Path, queries: str, seed: int, limit: int) -> ReplayPlan:
    """Replay DIR/train (or DIR), retention DIR/val (or every fifth image of DIR)."""
    folder = Path(folder)
    train_dir = folder / "train" if (folder / "train").is_dir() else folder
    pool = ReasonSegDataset(train_dir, queries=queries, seed=seed)
    if (folder / "val").is_dir():
        held = ReasonSegDataset(folder / "val", queries="first", seed=seed)
        where = f"{folder}/val"
    else:
        held = _subset(ReasonSegDataset(train_dir, queries="first", seed=seed),
                       lambda i: i % RETENTION_EVERY == 0)  # fmt: skip
        pool = _subset(pool, lambda i: i % RETENTION_EVERY != 0)
        where = f"every {RETENTION_EVERY}th image of {folder}"
    if not len(pool.records) or not len(held.records):
        raise ConfigError(f"--replay-dir {folder}: too few images for replay and retention")
    retention = first_queries(held, limit)
    return ReplayPlan(
        "dir", pool, retention,
        f"replay from {train_dir} ({len(pool.records)} images); retention: {where} "
        f"({len(retention)} images)",
    )  # fmt: skip


def generate_synthetic(
    root: Path,
    domain: dict,
    scenes: int,
    retention_scenes: int,
    seed: int,
    exclude: str | None,
) -> None:
    """OUT/replay/train (scenes of every concept, made like the base's training scenes) and
    OUT/replay/val (held-out scenes without `exclude`), written aside and renamed."""
    from lisa_demo.data.synthetic import DEFAULT_EXTRA_FAMILIES, generate_dataset

    tmp = root.with_name(f".{root.name}-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    families = tuple(domain.get("synthetic_extra_families") or DEFAULT_EXTRA_FAMILIES)
    generate_dataset(
        tmp, {"train": scenes}, seed + REPLAY_SEED_OFFSET,
        extra_queries=int(domain.get("synthetic_extra_queries") or 0), extra_families=families,
    )  # fmt: skip
    generate_dataset(tmp, {"val": retention_scenes}, seed + RETENTION_SEED_OFFSET, exclude)
    tmp.rename(root)


def synthetic_plan(root: Path, domain: dict, seed: int, limit: int) -> ReplayPlan:
    """The plan over generated scenes in `root` (OUT/replay)."""
    explanations = None
    if domain.get("synthetic_explanations"):
        explanations = root / "train_explanations.json"
    queries = str(domain.get("queries") or "random")
    pool = None  # none generated with --replay-share 0
    if (root / "train").is_dir():
        pool = ReasonSegDataset(
            root / "train", queries=queries, explanations=explanations, seed=seed
        )
    retention = first_queries(ReasonSegDataset(root / "val", queries="first", seed=seed), limit)
    replayed = (
        f"replay: {len(pool.records)} synthetic samples of every concept (the base model's domain)"
        if pool is not None
        else "no replay (--replay-share 0)"
    )
    return ReplayPlan(
        "synthetic", pool, retention,
        f"{replayed}; retention: {len(retention)} held-out synthetic scenes",
    )  # fmt: skip
