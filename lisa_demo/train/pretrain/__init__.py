"""The from-scratch pretraining recipe of the bundled tiny model. None of it is in LISA.

LISA starts from a pretrained CLIP and a pretrained SAM; the tiny model has neither, and
LISA's losses alone teach both encoders too slowly on a CPU. So its recipe (the model card,
assets/tiny-lisa/README.md, has the command and what each part bought) adds:

    options.py     its settings: warm-up minutes and rates, extra loss weights; their flags
    warmup.py      short supervised stages for CLIP and SAM before the LISA loop
    objectives.py  extra loss terms in the LISA loop and their training-only heads
    targets.py     per-batch inputs of those terms (clicks, target classes)
    recipe.py      all of it behind the loop's `Recipe` interface (lisa_demo.train.loop)

The training CLI builds the recipe from the run's options and hands it to the loop; the core
(model, config, loading, checkpoints, inference) never imports this package. Importing it
loads the options only.
"""

from lisa_demo.train.pretrain.options import PretrainOptions

__all__ = ["PretrainOptions"]
