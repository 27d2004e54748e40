"""The Inference tab: image + question -> overlay, answer, per-mask table and PNGs."""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from lisa_demo.ui import results
from lisa_demo.ui.gpu import on_gpu
from lisa_demo.ui.models import ModelRegistry, ModelUnavailable

log = logging.getLogger("lisa_demo.ui")

EXAMPLE_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_PROBABILITY = 0.5
BRUSH_COLOUR = "#ff00ff"


def image_input(label: str, **kwargs: Any) -> gr.Image:
    """A filepath gr.Image whose decoding errors reach users and API clients as a message.

    With type="filepath" and no image_mode gradio only opens the header (the app decodes the
    pixels itself), but an unreadable file fails inside gradio's preprocess with PIL's error.
    The instance's preprocess is wrapped rather than subclassed: gradio writes a .pyi stub
    next to the module of every Component subclass.
    """
    component = gr.Image(label=label, type="filepath", image_mode=None, **kwargs)
    preprocess = component.preprocess

    def readable_preprocess(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Exception as err:
            raise gr.Error(
                f"{label}: this file is not an image the app can read ({type(err).__name__}); "
                "use a PNG, JPEG, WebP, BMP, GIF or TIFF file."
            ) from err

    component.preprocess = readable_preprocess  # type: ignore[method-assign]
    return component


@dataclass
class InferenceTab:
    """The components other tabs and app-level events need."""

    model: gr.Dropdown
    status: gr.Markdown
    note: gr.Markdown  # what the chosen model can do (shown for the bundled tiny model)


def load_examples(folder: Path) -> list[list[str | None]]:
    """[[image, query, mask or None], ...] from NAME.jpg|png + NAME.json; [] if none."""
    if not folder.is_dir():
        return []
    examples = []
    for image in sorted(folder.iterdir()):
        spec_path = image.with_suffix(".json")
        if image.suffix.lower() not in EXAMPLE_IMAGE_SUFFIXES or not spec_path.is_file():
            continue
        try:
            spec = json.loads(spec_path.read_text())
            query = str(spec["query"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("skipping example %s: %s", spec_path, err)
            continue
        mask = folder / str(spec.get("mask") or "")
        examples.append(
            [str(image), query, str(mask) if spec.get("mask") and mask.is_file() else None]
        )
    return examples


def make_segment_handler(registry: ModelRegistry):
    """The `segment` event handler bound to a model registry."""

    @on_gpu
    def run_model(model_key: str, image: Any, query: str, threshold: float) -> Any:
        # Only picklable arguments cross the ZeroGPU boundary; the model is looked up here.
        backend = registry.get(model_key)
        with getattr(backend, "lock", None) or nullcontext():
            return backend.segment(image, query, threshold=threshold)

    def segment(
        image: str | None,
        query: str | None,
        ground_truth_mask: str | None = None,
        ground_truth_drawing: Any = None,
        threshold: float = DEFAULT_PROBABILITY,
        model: str | None = None,
    ) -> tuple:
        """Segment what the answer to `query` names.

        threshold: the mask probability (0 to 1) above which a pixel is in a mask; the model
        gets it as a logit on SAM's mask logits, log(p / (1 - p)) (0.5 -> 0.0).
        model: the Model dropdown's value or the label it shows.
        Returns the overlay, the answer, details (prose), the per-mask table, the mask PNGs
        (mask_1.png, ...) and the timings in seconds as a JSON object.
        """
        from lisa_demo.infer.pipeline import (
            InputError,
            check_query,
            load_image,
            probability_to_logit,
        )

        try:
            if not query or not query.strip():
                raise InputError("Type a question about the image first.")
            if not image:
                raise InputError("Add an image first: upload one, paste it or use the webcam.")
            query = check_query(query)
            pixels = load_image(image)
            gt = results.ground_truth(ground_truth_mask, ground_truth_drawing, pixels.shape[:2])
            result = run_model(model, pixels, query, probability_to_logit(threshold))
            return render_result(pixels, result, gt)
        except (InputError, results.GroundTruthError, ModelUnavailable) as err:
            raise gr.Error(str(err)) from err
        except Exception as err:
            log.exception("segmentation failed")
            raise gr.Error(
                f"Segmentation failed ({type(err).__name__}: {err}). The app is still running: "
                "try again, or another image or model."
            ) from err

    return segment


def render_result(image: Any, result: Any, gt: results.GroundTruth | None) -> tuple:
    """Values for (overlay, answer, details, table, files, timings): the first few masks when
    the answer has many, and one line about the rest."""
    masks, rest = results.shown_masks(result.masks)
    notes = [rest] if rest else []
    notes += [gt.note] if gt is not None and gt.note else []
    if gt is None:
        notes.append("Add a ground-truth mask to see the true IoU and Dice of each mask.")
    files = results.write_mask_pngs(masks, results.fresh_mask_dir())
    return (
        results.overlay(image, masks),
        result.answer,
        results.details_text(result, notes),
        results.mask_table(masks, gt),
        files,
        {key: round(float(value), 4) for key, value in (result.timings or {}).items()},
    )


def build_inference_tab(registry: ModelRegistry, examples_dir: Path) -> InferenceTab:
    """Lay out the tab inside the current gr.Tab and wire its events."""
    with gr.Row():
        with gr.Column(scale=1):
            image = image_input(
                "Image",
                sources=["upload", "clipboard", "webcam"],
                height=360,
                elem_id="input-image",
            )
            query = gr.Textbox(
                label="Question",
                placeholder="e.g. Which object could roll down a slope? Please segment it.",
                lines=2,
            )
            with gr.Row():
                model = gr.Dropdown(
                    label="Model",
                    choices=registry.choices(),
                    value=registry.default_key(),
                    # Checkpoints appear while the app runs; the registry checks the value.
                    allow_custom_value=True,
                    scale=4,
                )
                refresh = gr.Button("Refresh models", scale=1, size="sm")
            note = model_note(registry, registry.default_key(), elem_id="model-note")
            threshold = gr.Slider(
                0.05,
                0.95,
                value=DEFAULT_PROBABILITY,
                step=0.05,
                label="Mask threshold (probability)",
                info="Pixels whose mask probability is above this are in the mask.",
            )
            with gr.Accordion("Ground truth (optional): see the true IoU and Dice", open=False):
                with gr.Tab("Upload a mask"):
                    gt_mask = image_input(
                        "Ground-truth mask",
                        sources=["upload", "clipboard"],
                        height=220,
                        elem_id="ground-truth-mask",
                    )
                    gr.Markdown("Non-zero pixels are the object (or opaque ones, if transparent).")
                with gr.Tab("Draw on the image"):
                    gt_drawing = gr.ImageMask(
                        label="Paint the object",
                        type="numpy",
                        image_mode="RGBA",
                        layers=False,
                        sources=[],
                        transforms=[],
                        brush=gr.Brush(colors=[BRUSH_COLOUR], color_mode="fixed"),
                        height=320,
                    )
            run = gr.Button("Segment", variant="primary")
            examples = load_examples(examples_dir)
            if examples:
                gr.Examples(
                    examples=examples,
                    inputs=[image, query, gt_mask],
                    cache_examples=False,  # Spaces would otherwise run the model at start-up
                    label="Examples (with ground truth)",
                )
        with gr.Column(scale=1):
            status = gr.Markdown(registry.status(), label="Model status", elem_id="model-status")
            overlay = gr.AnnotatedImage(
                label="Masks", height=420, color_map=results.colour_map(), elem_id="overlay"
            )
            answer = gr.Textbox(label="Answer", interactive=False, lines=2)
            details = gr.Markdown(label="Details", elem_id="segment-details")
            table = gr.Dataframe(
                pd.DataFrame(columns=results.TABLE_COLUMNS + results.GT_COLUMNS),
                label="Per-mask scores",
                interactive=False,
                elem_id="mask-table",
            )
            files = gr.File(label="Masks as PNG", file_count="multiple", interactive=False)
            with gr.Accordion("Timings (JSON)", open=False):
                timings = gr.JSON(label="Seconds per stage", elem_id="segment-timings")

    image.change(lambda path: path, inputs=image, outputs=gt_drawing, api_visibility="private")
    # A new image from the user (upload, paste, webcam, clear) makes the ground truth of the
    # previous one meaningless: clear it. Examples set image and mask together and fire
    # none of these, so their masks stay.
    gr.on(
        [image.upload, image.clear, image.input],
        lambda: None,
        outputs=gt_mask,
        api_visibility="private",
        queue=False,
    )
    segment = make_segment_handler(registry)
    inputs = [image, query, gt_mask, gt_drawing, threshold, model]
    outputs = [overlay, answer, details, table, files, timings]
    run.click(
        segment,
        inputs=inputs,
        outputs=outputs,
        api_name="segment",
        api_description="Answer a question about an image and segment what the answer names.",
        concurrency_id="segment",  # one model call at a time, from the button or Enter
    )
    query.submit(
        segment, inputs=inputs, outputs=outputs, api_visibility="private", concurrency_id="segment"
    )
    refresh.click(
        lambda: refresh_models(registry),
        outputs=[model, status],
        api_visibility="private",
    )
    # Also fires when an event sets the value (Refresh, Use in Inference).
    model.change(
        lambda key: model_note(registry, key),
        inputs=model,
        outputs=note,
        api_visibility="private",
        show_progress="hidden",
    )
    return InferenceTab(model=model, status=status, note=note)


def model_note(registry: ModelRegistry, key: str | None, **kwargs: Any) -> gr.Markdown:
    """The note under the model dropdown for `key`, hidden when there is nothing to say."""
    text = registry.note(key)
    return gr.Markdown(text, visible=bool(text), **kwargs)


def refresh_models(registry: ModelRegistry, select: str | None = None) -> tuple:
    """Dropdown update (current checkpoints) and the status line."""
    choices = registry.choices()
    update = gr.update(choices=choices, value=select) if select else gr.update(choices=choices)
    return update, registry.status()
