"""The Training tab: data source, settings, memory estimate, start/stop, live log, curves and
checkpoints."""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from lisa_demo.config import (
    BUNDLED_MODEL_DIR,
    CONVERTED_PRESETS,
    PRECISIONS,
    PRESETS,
    QUANTIZATIONS,
    ConfigError,
    ModelConfig,
    full_model_config,
    preset,
)
from lisa_demo.data.synthetic import CONCEPTS, LOOK_ALIKE_SHARE
from lisa_demo.memory import GIB, MemoryEstimate, MemoryPlan, estimate_memory
from lisa_demo.ui.models import CONFIGURED_KEY, FullModel, known_full_models
from lisa_demo.ui.runs import (
    PRESET_DEFAULT,
    RunBusy,
    RunError,
    RunState,
    TrainingManager,
    TrainRequest,
    estimate_markdown,
)
from lisa_demo.ui.settings import DEFAULT_PRESET, AppSettings

FOLLOW_POLL_S = 0.5
REFRESH_S = 5.0  # re-send the progress line this often even without events (elapsed time)
# A running trainer's view goes to the page at most this often: building and sending it shares
# the CPU with the trainer (on 2 cores, an update every half second slowed training by a third).
UPDATE_S = 2.0
SOURCE_CHOICES = [
    ("Synthetic scenes (generated)", "synthetic"),
    ("Upload a .zip (ReasonSeg layout)", "zip"),
]
FOLDER_CHOICE = ("Folder on the server", "folder")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULERS = ("cosine", "linear", "constant")
NO_CONCEPT = "none"
# The default run teaches the bundled model the concept its pretraining left out (a short
# LoRA fine-tune on CPU, with replay). Its settings were chosen by a measured comparison, and
# the model card gives its before/after numbers on the new concept and on what the model knew
# (assets/tiny-lisa/README.md, "Choosing the fine-tune's defaults").
DEFAULT_RUN = {
    "scenes": 400, "focus": "heart", "max_steps": 600, "learning_rate": 1.5e-3,
    "batch_size": 8, "eval_every": 300, "max_val_samples": 40, "lora_rank": 16,
    "lora_targets": list(LORA_TARGETS), "explained_answers": True, "pointing_weight": 0.0,
    "train_projector": False, "lora_dropout": ModelConfig.lora_dropout,
    "replay_share": 0.3, "retention_margin": TrainRequest.retention_margin,
    "mask_lr_scale": TrainRequest.mask_lr_scale, "replay_distill": TrainRequest.replay_distill,
    "look_alikes": ["diamond"],
}  # fmt: skip
# gradio's own autoscroll only follows a textbox whose content is under 100 px taller than
# the box, so the log box is scrolled to its newest line in the page after each update.
FOLLOW_LOG_JS = """() => { requestAnimationFrame(() => {
    const box = document.querySelector("#training-log textarea");
    if (box) { box.scrollTop = box.scrollHeight; }
}); }"""
ESTIMATE_HINT = (
    "Estimate duration times the start-up and a few steps of these settings on this machine "
    "(about half a minute for the bundled model)."
)
NO_RUN = "No training run yet. Choose data and settings, then press Start."
ZIP_HELP = (
    "A .zip with train/ and val/ folders of NAME.jpg + NAME.json pairs (ReasonSeg layout), or "
    "one folder of pairs (every fifth becomes validation)."
)
MEMORY_TITLE = "**Estimated GPU memory**"
TINY_PRESETS = ("tiny", "tiny-random")
TINY_NOTE = (
    "These are GPU figures (a CUDA context alone takes 0.5 GiB); the tiny models themselves "
    "need well under 1 GB and train on a CPU."
)


BUNDLED_LABEL = "tiny (the bundled tiny LISA)"


@dataclass
class TrainingTab:
    """The components app-level events need."""

    outputs: list[gr.components.Component]  # what a follower updates
    use_in_inference: gr.Button
    model: gr.Dropdown  # the model to fine-tune: a preset or a full model


def training_model_choices(settings: AppSettings) -> list[tuple[str, str]]:
    """(label, value) of every model the tab fine-tunes: the presets (the bundled model is
    "tiny"), then the full models of the models folder and the configured one."""
    presets = [
        (BUNDLED_LABEL if name == DEFAULT_PRESET else name, name)
        for name in PRESETS
        if name not in CONVERTED_PRESETS
    ]  # listed as full models once converted
    full_models, _ = known_full_models(settings)
    return presets + [(full.label, full.key) for full in full_models]


def training_full_model(settings: AppSettings, choice: str) -> FullModel | None:
    """The full model a choice names (None for a preset); RunError if unknown."""
    if choice in PRESETS:
        return None
    full_models, _ = known_full_models(settings)
    for full in full_models:
        if full.key == choice:
            return full
    known = ", ".join(value for _, value in training_model_choices(settings))
    raise RunError(f"unknown model {choice!r} to fine-tune; choose one of: {known}")


def training_model_folder(settings: AppSettings, choice: str) -> str | None:
    """What the trainer's --model gets for a choice (a folder or a Hub repo), None for a
    preset; RunError if unknown."""
    full = training_full_model(settings, choice)
    return None if full is None else full.source


def default_training_preset(settings: AppSettings) -> str:
    """The app's configured model, or tiny-random while the bundled model is missing."""
    values = [value for _, value in training_model_choices(settings)]
    if settings.model and CONFIGURED_KEY in values:
        return CONFIGURED_KEY
    if settings.preset == DEFAULT_PRESET and not BUNDLED_MODEL_DIR.is_dir():
        return "tiny-random"
    return settings.preset


def plot_value(frame: pd.DataFrame) -> pd.DataFrame | None:
    """None instead of an empty frame: a LinePlot that first gets an empty frame never draws
    the lines of later updates (gradio 6.31 front end)."""
    return None if frame.empty else frame


def idle_outputs() -> tuple:
    return "", NO_RUN, None, None, []


def state_outputs(state: RunState, files: object) -> tuple:
    return (
        state.log_text(),
        state.progress_markdown(),
        plot_value(state.loss_frame()),
        plot_value(state.eval_frame()),
        files,
    )


def follow(manager: TrainingManager) -> Iterator[tuple]:
    """Yield the run's view whenever it changes, until its trainer has exited.

    Checkpoint files are sent only when they change (gr.skip() otherwise, so gradio does not
    re-hash big zips every step) and always with the last update.
    """
    last_version, last_files, last_sent = None, None, 0.0
    while True:
        since = time.monotonic() - last_sent
        version = manager.version()
        if (
            version is not None
            and last_version is not None
            and since < REFRESH_S
            and (version == last_version or since < UPDATE_S)
        ):
            time.sleep(FOLLOW_POLL_S)  # nothing new, or too soon: no copy, no update
            continue
        state = manager.snapshot()
        if state is None:
            yield idle_outputs()
            return
        if version != last_version or state.done or since > REFRESH_S:
            files = state.checkpoint_files()
            changed = files != last_files or state.done
            yield state_outputs(state, files if changed else gr.skip())
            last_version, last_files, last_sent = version, files, time.monotonic()
        if state.done:
            return
        time.sleep(FOLLOW_POLL_S)


def _concept(value: str | None) -> str | None:
    return None if not value or value == NO_CONCEPT else value


def build_request(
    settings: AppSettings,
    source: str = "synthetic",
    synthetic_scenes: float = 64,
    hold_out_concept: str | None = None,
    focus_concept: str | None = None,
    dataset_zip: str | None = None,
    server_folder: str | None = None,
    preset: str = DEFAULT_PRESET,
    train_for: str = "steps",
    epochs: float = 1,
    max_steps: float = 50,
    learning_rate: float = 3e-4,
    lora_rank: float = 8,
    lora_targets: list[str] | None = None,
    batch_size: float = 2,
    grad_accum: float = 1,
    max_train_samples: float = 0,
    max_val_samples: float = 0,
    lr_scheduler: str = "cosine",
    precision: str = PRESET_DEFAULT,
    quantization: str = PRESET_DEFAULT,
    eval_every: float = 0,
    explained_answers: bool = False,
    pointing_weight: float = 0.0,
    train_projector: bool = False,
    lora_dropout: float = TrainRequest.lora_dropout,
    replay_share: float = TrainRequest.replay_share,
    retention_margin: float = TrainRequest.retention_margin,
    replay_folder: str | None = None,
    mask_lr_scale: float | None = TrainRequest.mask_lr_scale,
    replay_distill: float = TrainRequest.replay_distill,
    look_alikes: list[str] | None = None,
) -> TrainRequest:
    """The tab's controls (in the order of TRAIN_INPUTS) as a TrainRequest; gr.Error when
    they ask for something this app does not allow or that cannot work."""
    server_folders = source == "folder" or (replay_folder or "").strip()
    if server_folders and not settings.allow_server_paths:
        raise gr.Error("Server folders are disabled; upload a .zip instead.")
    try:
        return TrainRequest(
            model=training_model_folder(settings, preset),
            source=source,
            synthetic_n=int(synthetic_scenes or 0),
            exclude_concept=_concept(hold_out_concept),
            focus_concept=_concept(focus_concept),
            zip_path=dataset_zip,
            folder_path=(server_folder or "").strip() or None,
            preset=preset,
            length=train_for,
            epochs=int(epochs or 0),
            max_steps=int(max_steps or 0),
            learning_rate=float(learning_rate),
            lora_r=int(lora_rank),
            lora_targets=tuple(lora_targets or ()),
            batch_size=int(batch_size),
            grad_accum=int(grad_accum),
            max_train_samples=int(max_train_samples or 0),
            max_val_samples=int(max_val_samples or 0),
            lr_scheduler=lr_scheduler,
            precision=precision,
            quantization=quantization,
            eval_every=int(eval_every or 0),
            explained_answers=bool(explained_answers),
            pointing_weight=float(pointing_weight or 0),
            train_projector=bool(train_projector),
            lora_dropout=float(0 if lora_dropout is None else lora_dropout),
            replay_share=float(replay_share or 0),
            retention_margin=float(0 if retention_margin is None else retention_margin),
            replay_folder=(replay_folder or "").strip() or None,
            mask_lr_scale=None if mask_lr_scale is None else float(mask_lr_scale),
            replay_distill=float(
                TrainRequest.replay_distill if replay_distill is None else replay_distill
            ),
            look_alikes=tuple(dict.fromkeys(look_alikes or ())),
        )
    except RunError as err:
        raise gr.Error(str(err)) from err
    except (TypeError, ValueError) as err:
        raise gr.Error(f"Invalid training settings: {err}") from err


def make_train_handler(settings: AppSettings, manager: TrainingManager):
    """The streaming `train` handler: start a run, then follow it."""

    def train(
        source: str = "synthetic",
        synthetic_scenes: float = 64,
        hold_out_concept: str | None = None,
        focus_concept: str | None = None,
        dataset_zip: str | None = None,
        server_folder: str | None = None,
        preset: str = DEFAULT_PRESET,
        train_for: str = "steps",
        epochs: float = 1,
        max_steps: float = 50,
        learning_rate: float = 3e-4,
        lora_rank: float = 8,
        lora_targets: list[str] | None = None,
        batch_size: float = 2,
        grad_accum: float = 1,
        max_train_samples: float = 0,
        max_val_samples: float = 0,
        lr_scheduler: str = "cosine",
        precision: str = PRESET_DEFAULT,
        quantization: str = PRESET_DEFAULT,
        eval_every: float = 0,
        explained_answers: bool = False,
        pointing_weight: float = 0.0,
        train_projector: bool = False,
        lora_dropout: float = TrainRequest.lora_dropout,
        replay_share: float = TrainRequest.replay_share,
        retention_margin: float = TrainRequest.retention_margin,
        replay_folder: str | None = None,
        mask_lr_scale: float | None = TrainRequest.mask_lr_scale,
        replay_distill: float = TrainRequest.replay_distill,
        look_alikes: list[str] | None = None,
    ) -> Iterator[tuple]:
        request = build_request(
            settings, source, synthetic_scenes, hold_out_concept, focus_concept, dataset_zip,
            server_folder, preset, train_for, epochs, max_steps, learning_rate, lora_rank,
            lora_targets, batch_size, grad_accum, max_train_samples, max_val_samples,
            lr_scheduler, precision, quantization, eval_every, explained_answers,
            pointing_weight, train_projector, lora_dropout, replay_share, retention_margin,
            replay_folder, mask_lr_scale, replay_distill, look_alikes,
        )  # fmt: skip
        try:
            manager.start(settings, request)
        except (RunBusy, RunError) as err:
            raise gr.Error(str(err)) from err
        except OSError as err:
            raise gr.Error(f"Could not start the trainer: {err}") from err
        yield from follow(manager)

    return train


def make_estimate_handler(settings: AppSettings, manager: TrainingManager):
    """The handler that measures a few steps of the chosen run and estimates its duration."""

    def estimate_duration(*values: object) -> str:
        request = build_request(settings, *values)  # type: ignore[arg-type]
        try:
            return estimate_markdown(manager.estimate(settings, request))
        except (RunBusy, RunError) as err:
            raise gr.Error(str(err)) from err
        except OSError as err:
            raise gr.Error(f"Could not start the trainer: {err}") from err

    # The API names its parameters after the signature: the same as /train's.
    signature = inspect.signature(build_request)
    estimate_duration.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=list(signature.parameters.values())[1:], return_annotation=str
    )
    return estimate_duration


def training_model_config(
    settings: AppSettings,
    preset_name: str,
    quantization: str,
    precision: str,
    lora_rank: int,
    lora_targets: tuple[str, ...],
    train_projector: bool = False,
) -> ModelConfig:
    """The model configuration a run started with these settings trains (LoRA, as the trainer
    does by default; the app's own LLaVA/SAM overrides when it is the app's preset).
    `preset_name` is a training model choice: a preset or a full model's key."""
    changes: dict[str, object] = {
        "use_lora": True,
        "lora_r": lora_rank,
        "lora_targets": lora_targets,
        "train_projector": train_projector,
    }
    if precision != PRESET_DEFAULT:
        changes["precision"] = precision
    if quantization != PRESET_DEFAULT:
        changes["quantization"] = quantization
    try:
        full = training_full_model(settings, preset_name)
    except RunError as err:
        raise ConfigError(str(err)) from err
    if full is not None:
        if full.folder is None:  # never download weights for an estimate
            raise ConfigError(f"{full.source} is not downloaded yet: it downloads when first used")
        return full_model_config(full.folder).replace(**changes)
    if preset_name == settings.preset:
        changes.update({k: v for k, v in (("llava", settings.llava), ("sam", settings.sam)) if v})
    if preset_name == "tiny" and not BUNDLED_MODEL_DIR.is_dir():
        changes["build_tiny"] = True  # not bundled yet: the same architecture, built here
    return preset(preset_name).replace(**changes)


def _size(n_bytes: int) -> str:
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.0f} MiB"


def _plan_row(name: str, plan: MemoryPlan) -> str:
    return f"| {name} | {_size(plan.allocated)} | {_size(plan.total)} | {plan.card} |"


def memory_markdown(estimate: MemoryEstimate, cfg: ModelConfig, preset_name: str) -> str:
    """preset_name: what the estimate is for, as the page names it."""
    """The estimate as a short Markdown table: peaks and the smallest card that holds them."""
    setting = estimate.setting
    targets = ", ".join(cfg.lora_targets)
    quantization = setting["quantization"]
    weights = "no quantization" if quantization == "none" else f"{quantization} quantization"
    checkpointing = "on" if setting["gradient_checkpointing"] else "off"
    lines = [
        MEMORY_TITLE,
        "",
        "| | peak allocated | card must hold | smallest card |",
        "|---|---:|---:|---|",
        _plan_row(f"Training step (batch {setting['batch_size']})", estimate.training),
        _plan_row("Inference", estimate.inference),
        "",
        f"{preset_name}: {weights}, {setting['precision']}, LoRA rank {setting['lora_r']} on "
        f"{targets}{', the image projector' if cfg.train_projector else ''}, "
        f"{setting['seq_len']} tokens per sample, gradient checkpointing {checkpointing}, "
        "AdamW. The card must hold the peak plus the CUDA context (0.5 GiB) "
        "and 10% allocator slack.",
    ]
    if preset_name in TINY_PRESETS:
        lines += ["", TINY_NOTE]
    return "\n".join(lines)


def _choice_label(settings: AppSettings, choice: str) -> str:
    if choice in PRESETS:
        return choice
    labels = dict((value, label) for label, value in training_model_choices(settings))
    return labels.get(choice, choice)


def make_memory_handler(settings: AppSettings):
    """The handler that turns the tab's model settings into the memory estimate's Markdown."""

    def estimate_training_memory(
        preset_name: str = DEFAULT_PRESET,
        quantization: str = PRESET_DEFAULT,
        precision: str = PRESET_DEFAULT,
        lora_rank: float | None = 8,
        lora_targets: list[str] | None = None,
        batch_size: float | None = 2,
        train_projector: bool = False,
    ) -> str:
        if not lora_rank or lora_rank < 1:
            return f"{MEMORY_TITLE}: set a LoRA rank of at least 1."
        if not lora_targets:
            return f"{MEMORY_TITLE}: choose at least one LoRA target."
        if not batch_size or batch_size < 1:
            return f"{MEMORY_TITLE}: set a batch size of at least 1."
        try:
            cfg = training_model_config(
                settings, preset_name, quantization, precision, int(lora_rank),
                tuple(lora_targets), bool(train_projector),
            )  # fmt: skip
            estimate = estimate_memory(cfg, batch_size=int(batch_size))
        except ConfigError as err:
            return f"{MEMORY_TITLE}: not available for these settings ({err})."
        except Exception as err:  # an estimate must never break the tab
            what = f"for {_choice_label(settings, preset_name)} " if preset_name else ""
            return f"{MEMORY_TITLE}: could not be computed {what}({type(err).__name__}: {err})."
        return memory_markdown(estimate, cfg, _choice_label(settings, preset_name))

    return estimate_training_memory


def make_stop_handler(manager: TrainingManager):
    def stop_training() -> str:
        message = manager.stop()
        gr.Info(message)
        return message

    return stop_training


def _source_visibility(source: str) -> tuple:
    return (
        gr.update(visible=source == "synthetic"),
        gr.update(visible=source == "zip"),
        gr.update(visible=source == "folder"),
    )


def _length_visibility(train_for: str) -> tuple:
    return gr.update(visible=train_for == "epochs"), gr.update(visible=train_for == "steps")


def build_training_tab(settings: AppSettings, manager: TrainingManager) -> TrainingTab:
    """Lay out the tab inside the current gr.Tab and wire its events."""
    sources = SOURCE_CHOICES + ([FOLDER_CHOICE] if settings.allow_server_paths else [])
    concepts = [NO_CONCEPT, *CONCEPTS]
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            source = gr.Radio(sources, value="synthetic", label="Data")
            with gr.Group(visible=True) as synthetic_box:
                synthetic_n = gr.Number(
                    DEFAULT_RUN["scenes"], label="Synthetic scenes", precision=0, minimum=2
                )
                with gr.Row():
                    hold_out = gr.Dropdown(concepts, value=NO_CONCEPT, label="Hold out concept")
                    focus = gr.Dropdown(
                        concepts,
                        value=DEFAULT_RUN["focus"],
                        label="Focus concept",
                        info="scenes whose targets are this; its name's token rows train too",
                    )
                look_alikes = gr.Dropdown(
                    list(CONCEPTS),
                    value=DEFAULT_RUN["look_alikes"],
                    multiselect=True,
                    label="Look-alikes",
                    info=f"hard negatives: {LOOK_ALIKE_SHARE:.0%} of the scenes also show one "
                    "of these beside the target (the heart run's model mistook hearts for "
                    "diamonds)",
                )
                explained = gr.Checkbox(
                    DEFAULT_RUN["explained_answers"],
                    label="Answers describe the target (as in the bundled model's pretraining)",
                )
            with gr.Group(visible=False) as zip_box:
                dataset_zip = gr.File(label="Dataset .zip", file_types=[".zip"], type="filepath")
                gr.Markdown(ZIP_HELP)
            with gr.Group(visible=False) as folder_box:
                server_folder = gr.Textbox(
                    label="Server folder",
                    placeholder="/data/reasonseg (holds train/ and val/)",
                    visible=settings.allow_server_paths,
                )
            with gr.Accordion("Settings", open=True):
                preset = gr.Dropdown(
                    training_model_choices(settings),
                    value=default_training_preset(settings),
                    label="Model to fine-tune",
                    info="a preset, or a full model (the bundled one, those in the models "
                    "folder, the one the app was started with)",
                    # The models folder is scanned again on page load; the handler checks.
                    allow_custom_value=True,
                )
                with gr.Row():
                    train_for = gr.Radio(["steps", "epochs"], value="steps", label="Train for")
                    max_steps = gr.Number(
                        DEFAULT_RUN["max_steps"], label="Max steps", precision=0, minimum=1
                    )
                    epochs = gr.Number(1, label="Epochs", precision=0, minimum=1, visible=False)
                with gr.Row():
                    learning_rate = gr.Number(
                        DEFAULT_RUN["learning_rate"], label="Learning rate", minimum=0
                    )
                    scheduler = gr.Dropdown(list(SCHEDULERS), value="cosine", label="Scheduler")
                    pointing = gr.Number(
                        DEFAULT_RUN["pointing_weight"],
                        label="Pointing loss weight",
                        info="teaches the [SEG] state to attend to its target's image patches; "
                        "0 = off",
                        minimum=0,
                    )
                with gr.Row():
                    lora_rank = gr.Number(
                        DEFAULT_RUN["lora_rank"], label="LoRA rank", precision=0, minimum=1
                    )
                    lora_dropout = gr.Number(
                        DEFAULT_RUN["lora_dropout"],
                        label="LoRA dropout",
                        info="on each LoRA layer's input; 0 saves about a sixth of a CPU "
                        "step with all seven targets",
                        minimum=0,
                        maximum=0.99,
                    )
                    lora_targets = gr.CheckboxGroup(
                        list(LORA_TARGETS), value=DEFAULT_RUN["lora_targets"], label="LoRA targets"
                    )
                    projector = gr.Checkbox(
                        DEFAULT_RUN["train_projector"],
                        label="Train the image projector too",
                        info="LLaVA's vision-to-text projector (frozen in LISA); helps a concept "
                        "the base never saw",
                    )
                with gr.Row():
                    replay_share = gr.Number(
                        DEFAULT_RUN["replay_share"],
                        label="Replay share",
                        info="share of each epoch drawn from what the model already knew "
                        "(the bundled model's synthetic scenes, or the replay folder); 0 = none",
                        minimum=0,
                        maximum=0.95,
                    )
                    retention_margin = gr.Number(
                        DEFAULT_RUN["retention_margin"],
                        label="Retention margin (gIoU)",
                        info="the run warns when the best checkpoint lost more than this on "
                        "the retention set",
                        minimum=0,
                    )
                    mask_lr_scale = gr.Number(
                        DEFAULT_RUN["mask_lr_scale"],
                        label="Mask side: learning rate x",
                        info="the [SEG] projection and SAM's mask decoder learn at this multiple "
                        "of the learning rate; 0 keeps them as they are; empty: 0 for a trained "
                        "model (the bundled one, a LISA), 1 for a base LLaVA preset",
                        minimum=0,
                    )
                    replay_distill = gr.Number(
                        DEFAULT_RUN["replay_distill"],
                        label="Replay distillation weight",
                        info="keeps the replay samples' [SEG] prompts at the model's own from "
                        "before the run; 0 = off",
                        minimum=0,
                    )
                    replay_folder = gr.Textbox(
                        label="Replay folder on the server",
                        placeholder="/data/base-domain (train/ replayed, val/ for retention)",
                        visible=settings.allow_server_paths,
                    )
                with gr.Row():
                    batch_size = gr.Number(
                        DEFAULT_RUN["batch_size"], label="Batch size", precision=0, minimum=1
                    )
                    grad_accum = gr.Number(1, label="Grad accumulation", precision=0, minimum=1)
                    eval_every = gr.Number(
                        DEFAULT_RUN["eval_every"],
                        label="Eval every (steps, 0 = per epoch)",
                        precision=0,
                        minimum=0,
                    )
                with gr.Row():
                    max_train = gr.Number(
                        0, label="Max train samples (0 = all)", precision=0, minimum=0
                    )
                    max_val = gr.Number(
                        DEFAULT_RUN["max_val_samples"],
                        label="Max val samples (0 = all)",
                        precision=0,
                        minimum=0,
                    )
                with gr.Row():
                    precision = gr.Dropdown(
                        [PRESET_DEFAULT, *PRECISIONS], value=PRESET_DEFAULT, label="Precision"
                    )
                    quantization = gr.Dropdown(
                        [PRESET_DEFAULT, *QUANTIZATIONS], value=PRESET_DEFAULT, label="Quantization"
                    )
            memory = gr.Markdown(elem_id="training-memory")
            with gr.Row():
                estimate = gr.Button("Estimate duration")
                start = gr.Button("Start training", variant="primary")
                stop = gr.Button("Stop", variant="stop")
                use = gr.Button("Use in Inference")
            duration = gr.Markdown(ESTIMATE_HINT, elem_id="training-estimate")
            notice = gr.Markdown(label="Status", elem_id="training-notice")
        with gr.Column(scale=3):
            progress = gr.Markdown(NO_RUN, label="Progress", elem_id="training-progress")
            with gr.Row():
                loss_plot = gr.LinePlot(
                    x="step", y="value", color="series", label="Training loss", elem_id="loss-plot"
                )
                # Points, not lines: a line needs two evaluations, and the first one (before
                # the first step) should show at once.
                eval_plot = gr.ScatterPlot(
                    x="step",
                    y="value",
                    color="series",
                    label="Validation gIoU: new data and retention",
                    elem_id="eval-plot",
                    y_lim=[0, 1],
                )
            log = gr.Textbox(
                label="Log", lines=12, max_lines=12, autoscroll=True, elem_id="training-log"
            )
            checkpoints = gr.File(label="Checkpoints (.zip)", file_count="multiple")

    outputs = [log, progress, loss_plot, eval_plot, checkpoints]
    log.change(None, js=FOLLOW_LOG_JS, api_visibility="private", queue=False)
    source.change(
        _source_visibility,
        inputs=source,
        outputs=[synthetic_box, zip_box, folder_box],
        api_visibility="private",
    )
    train_for.change(
        _length_visibility, inputs=train_for, outputs=[epochs, max_steps], api_visibility="private"
    )
    gr.on(
        None,  # on page load and whenever one of the inputs changes
        make_memory_handler(settings),
        inputs=[preset, quantization, precision, lora_rank, lora_targets, batch_size, projector],
        outputs=memory,
        api_visibility="private",
        trigger_mode="always_last",
        concurrency_limit=None,
        show_progress="hidden",
    )
    train_inputs = [
        source,
        synthetic_n,
        hold_out,
        focus,
        dataset_zip,
        server_folder,
        preset,
        train_for,
        epochs,
        max_steps,
        learning_rate,
        lora_rank,
        lora_targets,
        batch_size,
        grad_accum,
        max_train,
        max_val,
        scheduler,
        precision,
        quantization,
        eval_every,
        explained,
        pointing,
        projector,
        lora_dropout,
        replay_share,
        retention_margin,
        replay_folder,
        mask_lr_scale,
        replay_distill,
        look_alikes,
    ]  # fmt: skip
    estimate.click(
        make_estimate_handler(settings, manager),
        inputs=train_inputs,
        outputs=duration,
        api_name="estimate_training",
        api_description="Measure a few steps of this run and estimate how long it takes here.",
    )
    start.click(
        make_train_handler(settings, manager),
        inputs=train_inputs,
        outputs=outputs,
        api_name="train",
        api_description="Start a training run and stream its log, curves and checkpoints.",
        concurrency_limit=None,  # followers only wait; a second start must get its message
        trigger_mode="multiple",
    )
    stop.click(
        make_stop_handler(manager),
        outputs=notice,
        api_name="stop_training",
        api_description="Ask the running training run to stop (it saves checkpoints/last).",
        concurrency_limit=None,
    )
    return TrainingTab(outputs=outputs, use_in_inference=use, model=preset)


def refresh_training_models(settings: AppSettings) -> dict:
    """The training model dropdown's choices now (models may have been converted since)."""
    return gr.update(choices=training_model_choices(settings))
