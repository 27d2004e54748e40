"""The LISA Studio Blocks app: an Inference tab and a Training tab over one model registry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gradio as gr

from lisa_demo.ui.inference_tab import build_inference_tab, refresh_models
from lisa_demo.ui.models import ModelRegistry, ModelSpec, Segmenter, checkpoint_key, load_pipeline
from lisa_demo.ui.runs import TRAINING, TrainingManager
from lisa_demo.ui.settings import AppSettings
from lisa_demo.ui.training_tab import build_training_tab, follow, refresh_training_models

TITLE = "LISA Studio"
INTRO = (
    "# LISA Studio\n"
    "Reasoning segmentation: a LLaVA model answers a question about an image, and every "
    "`[SEG]` token in its answer becomes a mask through SAM's mask decoder. Fine-tune it on "
    "your own data in the **Training** tab."
)
INJECTED_KEY = "backend"


def build_app(
    settings: AppSettings | None = None,
    *,
    backend: Segmenter | None = None,
    loader: Callable[[ModelSpec], Segmenter] | None = None,
    manager: TrainingManager = TRAINING,
) -> gr.Blocks:
    """Build (not launch) the app.

    settings: what to serve; AppSettings.from_env() when None.
    backend: an object with `segment(image, query, threshold)` serving every model choice
        (tests use a fake); it is offered as the one base model.
    loader: how a model choice becomes a Segmenter (default: LisaPipeline.from_config).
    manager: the training-run registry (module-level, so runs outlive a closed tab).
    """
    settings = settings or AppSettings.from_env()
    if backend is not None:
        registry = ModelRegistry(
            settings,
            loader=lambda spec: backend,
            base_specs=[ModelSpec(INJECTED_KEY, "test backend", settings.preset)],
        )
    else:
        registry = ModelRegistry(settings, loader=loader or load_pipeline)

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs() as tabs:
            with gr.Tab("Inference", id="inference") as inference_page:
                inference = build_inference_tab(registry, settings.examples_dir)
            with gr.Tab("Training", id="training"):
                training = build_training_tab(settings, manager)

        def use_in_inference() -> tuple:
            state = manager.snapshot()
            if state is None:
                raise gr.Error("No training run yet: start one first.")
            folder = state.best_checkpoint()
            if folder is None:
                raise gr.Error(f"Run {state.run_id} has no checkpoint yet; wait for one.")
            try:
                key = checkpoint_key(settings.runs_dir, folder)
            except ValueError as err:
                raise gr.Error(f"{folder} is outside this app's runs folder") from err
            dropdown, status = refresh_models(registry, select=key)
            return dropdown, status, gr.Tabs(selected="inference")

        training.use_in_inference.click(
            use_in_inference,
            outputs=[inference.model, inference.status, tabs],
            api_visibility="private",
        )
        inference_page.select(
            lambda: refresh_models(registry),
            outputs=[inference.model, inference.status],
            api_visibility="private",
        )

        def follow_run():
            yield from follow(manager)

        # A reopened page shows the live (or last) run again and follows it.
        demo.load(
            lambda: refresh_models(registry),
            outputs=[inference.model, inference.status],
            api_visibility="private",
        )
        demo.load(
            lambda: refresh_training_models(settings),
            outputs=training.model,
            api_visibility="private",
            show_progress="hidden",
        )
        demo.load(
            follow_run,
            outputs=training.outputs,
            api_visibility="private",
            concurrency_limit=None,
            show_progress="hidden",
        )
    return demo


def allowed_paths(settings: AppSettings) -> list[str]:
    """Folders whose files the app returns (checkpoint zips live in the runs folder)."""
    return [str(Path(settings.runs_dir).resolve())]
