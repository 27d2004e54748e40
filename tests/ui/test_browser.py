"""A real Chromium drives the page: example -> overlay and table, the ground truth cleared by
a new image, many-[SEG] output, then tiny (fake) runs: two validation curves, the estimate,
the retention warning."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from lisa_demo.config import PROJECT_ROOT
from tests.ui.conftest import EXAMPLE_QUERY, LaunchedApp, red_square_image

playwright = pytest.importorskip("playwright.sync_api")
expect = playwright.expect

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
TIMEOUT_MS = 30_000
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture
def page(fake_app: LaunchedApp) -> Iterator:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: install Debian's chromium ({CHROMIUM})")
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(fake_app.url)
        yield page
        browser.close()


def test_example_segments_then_a_training_run_streams(
    page, fake_app: LaunchedApp, no_run_after, monkeypatch, tmp_path
) -> None:
    monkeypatch.setenv("FAKE_TRAINER_STEP_S", "0.3")

    # The bundled model is chosen: the page says what it can do.
    expect(page.locator("#model-note")).to_be_visible()
    expect(page.locator("#model-note")).to_contain_text("synthetic coloured shapes only")

    # Inference with a ground truth painted on the image (no mask file).
    image_upload = page.locator("input[type=file]").first
    image_upload.set_input_files(str(fake_app.examples / "red_square.png"))
    page.get_by_label("Question").fill("Which one is red?")
    page.get_by_text("Ground truth (optional)").click()
    page.get_by_role("tab", name="Draw on the image").click()
    canvas = page.locator("canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] * 0.47, box["y"] + box["height"] * 0.42
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 80, y + 6, steps=6)
    page.mouse.up()
    page.get_by_role("button", name="Segment", exact=True).click()
    table = page.locator("#mask-table")
    expect(table).to_contain_text("0.93")
    expect(table).to_contain_text("true IoU")
    page.screenshot(path=str(ARTIFACTS / "inference-drawn.png"), full_page=True)

    # Inference: pick the example, segment, see the overlay legend and the table.
    page.get_by_text(EXAMPLE_QUERY).first.click()
    expect(page.get_by_label("Question")).to_have_value(EXAMPLE_QUERY)
    page.get_by_role("button", name="Segment", exact=True).click()
    expect(page.locator("#overlay").get_by_text("mask 1").first).to_be_visible()
    expect(page.locator("#segment-details")).not_to_contain_text("drawn mask")
    expect(page.locator("#segment-details")).to_contain_text("Image embeddings from cache")
    expect(page.get_by_label("Answer")).to_have_value(re.compile(r"\[SEG\]"))
    expect(table).to_contain_text("true IoU")  # the example's own mask
    page.screenshot(path=str(ARTIFACTS / "inference.png"), full_page=True)

    # The user's own image replaces the example's: its ground truth is cleared, not resized
    # and scored against the new image.
    other = tmp_path / "other.png"
    Image.fromarray(red_square_image(90, 200)).save(other)
    page.get_by_role("tab", name="Upload a mask").click()
    ground_truth = page.locator("#ground-truth-mask img")
    expect(ground_truth).to_have_count(1)  # the example's mask
    page.locator("input[type=file]").first.set_input_files(str(other))
    expect(ground_truth).to_have_count(0)
    # Segment once the upload has reached the server (the page shows the uploaded file): a
    # click during the upload still sends the example's image.
    expect(page.locator("#input-image img")).to_have_attribute("src", re.compile(r"other\.png"))
    page.get_by_role("button", name="Segment", exact=True).click()
    details = page.locator("#segment-details")
    expect(details).to_contain_text("Add a ground-truth mask")
    expect(table).not_to_contain_text("true IoU")

    # An answer that repeats [SEG]: the first masks and one line, no threshold advice.
    page.get_by_label("Question").fill("Show me many shapes")
    page.get_by_role("button", name="Segment", exact=True).click()
    expect(details).to_contain_text("Showing the first 4 of 12 masks")
    expect(details).not_to_contain_text("lower threshold")
    expect(table.locator("[role=row][data-index]")).to_have_count(4)
    expect(page.locator("#overlay").get_by_text("mask 4")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "inference-many-seg.png"), full_page=True)

    # Training: a short fake run; the log and the loss curve update while it runs.
    page.get_by_role("tab", name="Training").click()
    memory = page.locator("#training-memory")
    expect(memory).to_contain_text("Estimated GPU memory")  # computed on page load
    expect(memory).to_contain_text("Training step (batch 8)")  # the default run's batch
    page.get_by_label("Batch size").fill("4")
    expect(memory).to_contain_text("Training step (batch 4)")
    page.get_by_label("Batch size").fill("2")
    expect(memory).to_contain_text("Training step (batch 2)")
    page.screenshot(path=str(ARTIFACTS / "training-memory.png"), full_page=True)
    page.get_by_label("Max steps").fill("8")
    page.get_by_role("button", name="Estimate duration").click()
    expect(page.locator("#training-estimate")).to_contain_text("Estimated duration: about")
    page.get_by_role("button", name="Start training").click()
    log = page.locator("#training-log textarea")
    expect(log).to_have_value(re.compile(r"step 2/8"))
    progress = page.locator("#training-progress")
    expect(progress).to_contain_text("running")
    expect(page.locator("#loss-plot canvas, #loss-plot svg.marks").first).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "training-running.png"), full_page=True)

    # A second page (a reopened tab) shows the live run and follows it to the end.
    other = page.context.new_page()
    other.goto(fake_app.url)
    other.get_by_role("tab", name="Training").click()
    expect(other.locator("#training-log textarea")).to_have_value(re.compile(r"step \d/8"))
    expect(other.locator("#training-progress")).to_contain_text("finished")
    other.close()
    expect(progress).to_contain_text("finished")
    expect(log).to_have_value(re.compile(r"validation @ step 8"))
    # Two validation curves with points and axis values; the scores as numbers.
    plot = page.locator("#eval-plot")
    expect(plot).to_contain_text("new data gIoU")
    expect(plot).to_contain_text("retention gIoU")
    expect(plot.locator(".mark-symbol.role-mark path")).to_have_count(10)  # 5 evaluations x 2 sets
    expect(progress).to_contain_text("before")
    expect(progress).to_contain_text("0.800 / 0.760")
    # The log box shows its newest line.
    at_bottom = log.evaluate("box => box.scrollTop + box.clientHeight >= box.scrollHeight - 4")
    assert at_bottom and log.evaluate("box => box.scrollHeight > box.clientHeight")
    expect(page.locator("a[href$='-last.zip']").first).to_be_attached()
    page.screenshot(path=str(ARTIFACTS / "training-finished.png"), full_page=True)

    # Use in Inference selects the run's best checkpoint in the Inference tab.
    page.get_by_role("button", name="Use in Inference").click()
    expect(page.get_by_label("Question")).to_be_visible()
    expect(page.get_by_label("Model", exact=True)).to_have_value(re.compile(r"best"))
    page.screenshot(path=str(ARTIFACTS / "use-in-inference.png"), full_page=True)

    # A deliberately harmful setting (learning rate 0.05): the run ends with the warning.
    page.get_by_role("tab", name="Training").click()
    page.get_by_label("Max steps").fill("4")
    page.get_by_label("Learning rate", exact=True).fill("0.05")
    page.get_by_role("button", name="Start training").click()
    expect(progress).to_contain_text(re.compile(r"finished.*Warning: the model forgot", re.S))
    expect(progress.locator("strong", has_text="Warning: the model forgot")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "training-retention-warning.png"), full_page=True)
