"""Fixtures: a launched app wired to the fake backend and the fake trainer, and its client."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from gradio_client import Client, handle_file  # noqa: E402

from lisa_demo.ui import AppSettings, build_app  # noqa: E402
from lisa_demo.ui.runs import TRAINING  # noqa: E402
from tests.ui.fakes import FakeBackend  # noqa: E402

FAKE_TRAINER = "tests.ui.fake_trainer"
EXAMPLE_QUERY = "Which shape is red? Please segment it."
SQUARE = (slice(30, 70), slice(40, 100))  # rows, columns of the red square
TINY_LISA_NAME = "tiny-lisa-v1"  # the converted tiny LISA's folder in converted_models_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def red_square_image(height: int = 120, width: int = 160) -> np.ndarray:
    image = np.full((height, width, 3), 235, dtype=np.uint8)
    image[SQUARE] = (220, 20, 20)
    image[80:110, 10:40] = (20, 60, 220)  # a blue distractor
    return image


def write_examples(folder: Path) -> Path:
    """One example like assets/examples/: NAME.png + NAME.json + NAME_mask.png."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(red_square_image()).save(folder / "red_square.png")
    mask = np.zeros((120, 160), dtype=np.uint8)
    mask[SQUARE] = 255
    Image.fromarray(mask).save(folder / "red_square_mask.png")
    spec = {"query": EXAMPLE_QUERY, "mask": "red_square_mask.png"}
    (folder / "red_square.json").write_text(json.dumps(spec))
    return folder


@dataclass
class LaunchedApp:
    client: Client
    url: str
    settings: AppSettings
    backend: FakeBackend | None
    examples: Path

    def segment_example(self, **overrides: object) -> tuple:
        """The example through the `segment` endpoint (also: is the app still serving?)."""
        kwargs: dict[str, object] = {
            "image": handle_file(str(self.examples / "red_square.png")),
            "query": EXAMPLE_QUERY,
            "ground_truth_mask": handle_file(str(self.examples / "red_square_mask.png")),
        }
        kwargs.update(overrides)
        return self.client.predict(**kwargs, api_name="/segment")


def launch(demo) -> str:
    port = free_port()
    demo.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        show_error=True,
    )
    return f"http://127.0.0.1:{port}/"


def wait_for_no_run(timeout: float = 30.0) -> None:
    """Stop a run left over by a test and wait until its trainer has exited."""
    TRAINING.stop()
    deadline = time.monotonic() + timeout
    while TRAINING.run is not None and TRAINING.run.alive:
        if time.monotonic() > deadline:
            raise AssertionError("a training run did not end")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def fake_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaunchedApp]:
    root = tmp_path_factory.mktemp("fake-app")
    examples = write_examples(root / "examples")
    settings = AppSettings(
        runs_dir=root / "runs", examples_dir=examples, trainer_module=FAKE_TRAINER
    )
    backend = FakeBackend()
    demo = build_app(settings, backend=backend)
    url = launch(demo)
    client = Client(url, download_files=False, verbose=False)
    yield LaunchedApp(client, url, settings, backend, examples)
    wait_for_no_run()
    demo.close()


@pytest.fixture
def no_run_after() -> Iterator[None]:
    """Tests that start runs leave none behind (the manager is process-wide)."""
    wait_for_no_run()
    yield
    wait_for_no_run()


@pytest.fixture(scope="session")
def converted_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder (LISA_MODELS_DIR) holding one full model, tiny-lisa-v1: the tiny random
    LISA in LISA's checkpoint layout, converted in fp32 (about 15 s, once per pytest run).

    Random weights rarely say [SEG], so its LM-head row becomes 1.3 x the row of the token the
    model says most to the example question: answers then hold [SEG] tokens (nothing but, up
    to the token limit) and masks.
    """
    from collections import Counter

    from safetensors.torch import load_file, save_file

    from lisa_demo.config import full_model_config
    from lisa_demo.convert import convert
    from lisa_demo.infer.pipeline import LisaPipeline
    from lisa_demo.tiny_lisa import write_tiny_lisa

    root = tmp_path_factory.mktemp("converted")
    source = write_tiny_lisa(root / "lisa-src")
    out = root / "models" / TINY_LISA_NAME
    out.mkdir(parents=True)
    manifest = convert(source, out, dtype_name="fp32", log=lambda _: None)
    pipeline = LisaPipeline.from_config(full_model_config(out), device="cpu", max_new_tokens=4)
    tokens = pipeline.segment(red_square_image(), EXAMPLE_QUERY).token_ids
    common = Counter(tokens).most_common(1)[0][0]
    del pipeline
    index = json.loads((out / "llava" / "model.safetensors.index.json").read_text())
    weights = out / "llava" / index["weight_map"]["lm_head.weight"]
    state = load_file(weights)
    state["lm_head.weight"][manifest["seg_token_id"]] = state["lm_head.weight"][common] * 1.3
    save_file(state, str(weights), metadata={"format": "pt"})
    return out.parent
