"""A real Chromium drives the page: example -> overlay and table, then a tiny (fake) run."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lisa_demo.config import PROJECT_ROOT
from tests.ui.conftest import EXAMPLE_QUERY, LaunchedApp

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
    page, fake_app: LaunchedApp, no_run_after, monkeypatch
) -> None:
    monkeypatch.setenv("FAKE_TRAINER_STEP_S", "0.3")

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
    page.screenshot(path=str(ARTIFACTS / "inference.png"), full_page=True)

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
    expect(page.locator("a[href$='-last.zip']").first).to_be_attached()
    page.screenshot(path=str(ARTIFACTS / "training-finished.png"), full_page=True)

    # Use in Inference selects the run's best checkpoint in the Inference tab.
    page.get_by_role("button", name="Use in Inference").click()
    expect(page.get_by_label("Question")).to_be_visible()
    expect(page.get_by_label("Model", exact=True)).to_have_value(re.compile(r"best"))
    page.screenshot(path=str(ARTIFACTS / "use-in-inference.png"), full_page=True)
