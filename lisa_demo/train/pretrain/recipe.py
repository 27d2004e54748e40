"""The pretraining recipe as the training loop sees it (the loop's `Recipe` interface)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lisa_demo.config import ConfigError
from lisa_demo.data.reasonseg import ReasonSegDataset, Sample
from lisa_demo.model import LisaModel
from lisa_demo.train.data import SampleBatcher
from lisa_demo.train.pretrain import objectives, warmup
from lisa_demo.train.pretrain.options import PretrainOptions
from lisa_demo.train.pretrain.targets import TargetClasses, click_points


class PretrainRecipe:
    """Encoder warm-ups before the LISA loop, training-only heads and extra loss terms in it."""

    def __init__(self, options: PretrainOptions, seed: int = 0) -> None:
        self.options = options
        self.seed = seed
        self.targets = TargetClasses()

    def attach(self, model: LisaModel) -> None:
        objectives.attach(model, self.options)

    def before_loop(
        self, model: LisaModel, batcher: SampleBatcher, train_set: ReasonSegDataset,
        n_train: int, world: int, emit: Callable[..., None], should_stop: Callable[[], bool],
    ) -> bool:  # fmt: skip
        """The encoder warm-ups (they share the loop's batcher, so each image is decoded
        and preprocessed once); True when they ran."""
        o = self.options
        if not o.warms_up:
            return False
        if world > 1:
            raise ConfigError("the encoder warm-ups run in one process: drop accelerate launch")
        model.train()
        samples = warmup.warmup_samples(train_set, n_train, o.warmup_images)
        if o.vision_warmup_minutes:
            warmup.warm_up_vision(model, batcher, samples, o.vision_warmup_minutes,
                                  learning_rate=o.vision_warmup_lr, seed=self.seed, emit=emit,
                                  should_stop=should_stop)  # fmt: skip
        if o.sam_warmup_minutes:
            w = model.loss_weights
            warmup.warm_up_sam(model, batcher, samples, o.sam_warmup_minutes,
                               learning_rate=o.sam_warmup_lr, seed=self.seed,
                               bce_weight=w.bce, dice_weight=w.dice, emit=emit,
                               should_stop=should_stop)  # fmt: skip
        return True

    def batch_inputs(self, samples: list[Sample], batch: dict) -> dict:
        extra: dict = {}
        if self.options.point or self.options.prompt:
            extra["click_points"] = click_points(batch)
        if self.options.target:
            extra["target_classes"] = self.targets.batch(samples)
        return extra

    def wrap(self, model: LisaModel) -> nn.Module:
        return objectives.PretrainingModel(model, self.options)


def recipe_for(options: PretrainOptions, seed: int = 0) -> PretrainRecipe | None:
    """The recipe a run's options ask for; None when they add nothing (plain LISA)."""
    return PretrainRecipe(options, seed) if options.active else None
