"""The pretraining-only pieces: encoder warm-ups, the target losses, frozen encoders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lisa_demo.checkpoint import WEIGHTS
from lisa_demo.data.synthetic import (
    COLOURS,
    DESCRIPTION_CLASSES,
    REGIONS,
    SHAPE_KINDS,
    SIZES,
    generate_dataset,
    object_classes,
    target_classes,
)
from lisa_demo.train.__main__ import main as train_main
from lisa_demo.train.warmup import patch_labels

BASE = ["--preset", "tiny-random", "--batch-size", "2", "--seg-rate-samples", "0"]


def square(x0: int, y0: int, x1: int, y1: int, **look) -> dict:
    return {"outline": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1]]], **look}


def test_patch_labels_take_the_object_covering_most_of_each_cell_if_a_quarter():
    """40x40 image, 2x2 grid of 20 px cells. A fills the top-left cell; B covers 6 of the 20
    columns of the bottom-right cell (30%); C covers 4 columns of the top-right cell (20%,
    below MIN_COVER); the bottom-left cell is empty."""
    a = square(0, 0, 19, 19, kind="star", colour="red", size="small")
    b = square(34, 20, 39, 39, kind="circle", colour="blue", size="large")
    c = square(36, 0, 39, 19, kind="cross", colour="green", size="medium")
    labels = patch_labels([a, b, c], 40, 40, grid=2)
    none = [len(SHAPE_KINDS), len(COLOURS), len(SIZES)]
    star, red, small = SHAPE_KINDS.index("star"), list(COLOURS).index("red"), 0
    circle, blue, large = SHAPE_KINDS.index("circle"), list(COLOURS).index("blue"), 2
    assert labels[:, 0].tolist() == [star, red, small]
    assert labels[:, 1].tolist() == none  # C: 20% < 25%
    assert labels[:, 2].tolist() == none
    assert labels[:, 3].tolist() == [circle, blue, large]


def test_object_and_target_classes_index_kind_colour_size_and_region():
    obj = {"kind": "heart", "colour": "blue", "size": "medium", "centre": [90.0, 10.0]}
    # width 100, height 60: x 90 is in the right third, y 10 in the top third
    assert object_classes(obj, 100, 60) == (
        SHAPE_KINDS.index("heart"),
        list(COLOURS).index("blue"),
        1,
        REGIONS.index("at the top right"),
    )
    scene = {
        "imageWidth": 100,
        "imageHeight": 60,
        "objects": [{**obj, "target": False}, {**obj, "centre": [50, 30], "target": True}],
    }
    assert target_classes(scene)[3] == REGIONS.index("in the middle")
    assert target_classes({"imageWidth": 1, "imageHeight": 1, "objects": []}) is None
    assert target_classes({"shapes": []}) is None  # plain ReasonSeg annotation


def test_target_loss_is_four_cross_entropies_plus_the_pull_to_the_description(tiny_loaded):
    """With a zero head every class is equally likely: CE = sum of log(class count). The pull
    is the MSE between the given prompts and the description prompts (kind + colour + size +
    region rows of the tables); rows marked -1 do not count."""
    from lisa_demo.config import LossWeights
    from lisa_demo.model import LisaModel

    base = tiny_loaded.model
    model = LisaModel(base.llava, base.sam, base.seg_token_id, hidden_size=256,
                      loss_weights=LossWeights(target=1.0))  # fmt: skip
    torch.nn.init.zeros_(model.target_head.weight)
    torch.nn.init.zeros_(model.target_head.bias)
    states = torch.randn(3, 256)
    prompts = torch.randn(3, 128)
    classes = [torch.tensor([[1, 2, 0, 4]]), torch.tensor([[-1, -1, -1, -1]]),
               torch.tensor([[3, 0, 2, 8]])]  # fmt: skip
    loss = model.target_loss(states, prompts, classes)
    tables = [t.weight.detach() for t in model.description_prompts.tables]
    d0 = tables[0][1] + tables[1][2] + tables[2][0] + tables[3][4]
    d2 = tables[0][3] + tables[1][0] + tables[2][2] + tables[3][8]
    mse = (((prompts[0] - d0) ** 2).sum() + ((prompts[2] - d2) ** 2).sum()) / (2 * 128)
    expected = sum(math.log(n) for n in DESCRIPTION_CLASSES) + mse
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert model.target_loss(states[:1], prompts[:1], classes[1:2]) is None


def test_pointing_loss_is_the_cross_entropy_of_the_real_last_layer_attention(
    tiny_loaded, make_inputs
):
    """Head 0 of the last layer, at each [SEG] query position, against the target's share of
    each CLIP patch. The reference is the attention transformers itself returns (eager), on
    a batch of two answers of different lengths (right padding). The 48x64 image splits into
    an 8x8 grid of 6x8 px cells: mask A fills cells (0,0), (0,1), (1,0), (1,1) (a quarter
    each); mask B fills cell (0,0) and half of (0,1) (shares 2/3 and 1/3)."""
    from lisa_demo.config import LossWeights
    from lisa_demo.inputs import collate_text
    from lisa_demo.model import LisaModel, seg_query_mask
    from tests.conftest import draw_scene

    base = tiny_loaded.model
    model = LisaModel(base.llava, base.sam, base.seg_token_id, hidden_size=256,
                      loss_weights=LossWeights(pointing=1.0))  # fmt: skip
    image = draw_scene()
    one = make_inputs(tiny_loaded, image, "Where is the red square?", "[SEG].")
    two = make_inputs(tiny_loaded, image, "Where is the blue disc?", "Sure, it is [SEG].")
    ids = [one["input_ids"][0].tolist(), two["input_ids"][0].tolist()]
    labels = [one["labels"][0].tolist(), two["labels"][0].tolist()]
    batch = collate_text(ids, labels, tiny_loaded.tokenizer.pad_token_id)
    mask_a = torch.zeros(1, 48, 64)
    mask_a[:, 0:12, 0:16] = 1
    mask_b = torch.zeros(1, 48, 64)
    mask_b[:, 0:6, 0:12] = 1
    inputs = {**batch, "pixel_values": torch.cat([one["pixel_values"], two["pixel_values"]]),
              "sam_pixel_values": torch.cat([one["sam_pixel_values"], two["sam_pixel_values"]]),
              "input_sizes": one["input_sizes"] * 2, "original_sizes": one["original_sizes"] * 2,
              "gt_masks": [mask_a, mask_b]}  # fmt: skip
    llava = base.llava
    was_training = llava.training
    model.train()
    try:
        with torch.no_grad():
            loss = model(**inputs).pointing_loss
            model.eval()
            assert model(**inputs).pointing_loss is None  # training only
            llava.set_attn_implementation("eager")
            attentions = llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               pixel_values=inputs["pixel_values"], output_attentions=True,
                               return_dict=True).attentions[-1]  # fmt: skip
    finally:
        llava.set_attn_implementation("sdpa")
        llava.train(was_training)
    image_id = llava.config.image_token_id
    query = seg_query_mask(batch["input_ids"], base.seg_token_id)
    shares = [{0: 0.25, 1: 0.25, 8: 0.25, 9: 0.25}, {0: 2 / 3, 1: 1 / 3}]
    terms = []
    for row, share in enumerate(shares):
        t = int(query[row].nonzero()[0])
        images = (batch["input_ids"][row] == image_id).nonzero().flatten()
        attention = attentions[row, 0, t, images]
        terms.append(-sum(w * math.log(float(attention[cell])) for cell, w in share.items()))
    assert loss.item() == pytest.approx(sum(terms) / 2, rel=1e-4)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    generate_dataset(root, {"train": 6, "val": 2}, seed=5)
    return root


def _params_of(run: Path, kind: str = "last") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / kind / WEIGHTS))


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def _initial() -> dict[str, torch.Tensor]:
    from lisa_demo.config import preset
    from lisa_demo.loading import load_lisa

    model = load_lisa(preset("tiny-random").replace(train_all=True), device="cpu").model
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(saved: dict, initial: dict, prefix: str) -> bool:
    names = [n for n in saved if n.startswith(prefix)]
    assert names, prefix
    return any(not torch.equal(saved[n], initial[n]) for n in names)


def test_warmups_train_the_encoders_and_the_target_loss_is_logged(scenes, tmp_path):
    """--train-all with both warm-ups, --target-weight and --pointing-weight: each warm-up
    reports and changes its encoder, the LISA loop logs the target and pointing losses, and
    the exported model carries the warmed-up encoders but no training-only head."""
    from lisa_demo.config import preset
    from lisa_demo.loading import load_lisa

    out = tmp_path / "run"
    code = train_main(
        ["--dataset", str(scenes), "--output-dir", str(out), *BASE, "--train-all",
         "--vision-warmup-minutes", "0.05", "--sam-warmup-minutes", "0.05",
         "--target-weight", "1", "--pointing-weight", "1", "--max-steps", "2", "--eval-every", "2",
         "--learning-rate", "1e-3", "--export-model"]
    )  # fmt: skip
    assert code == 0
    events = _events(out)
    assert events[0]["event"] == "start"  # readers (bundle, app) take the run's config there
    done = {e["stage"]: e for e in events if e["event"] == "warmup_done"}
    assert set(done) == {"vision", "sam"} and all(d["steps"] >= 1 for d in done.values())
    logs = [e for e in events if e["event"] == "log"]
    assert logs and all(e["target_loss"] is not None and e["target_loss"] > 0 for e in logs)
    assert all(e["pointing_loss"] is not None and e["pointing_loss"] > 0 for e in logs)
    saved, initial = _params_of(out), _initial()
    assert _changed(saved, initial, "sam.vision_encoder.")
    assert _changed(saved, initial, "llava.model.vision_tower.")
    assert any(n.startswith("description_prompts.") for n in saved)
    exported = load_lisa(preset("tiny-random").replace(
        llava=str(out / "model" / "llava"), sam=str(out / "model" / "sam"),
        heads=str(out / "model"), build_tiny=False), device="cpu")  # fmt: skip
    assert exported.model.target_head is None and exported.model.description_prompts is None
    tower = dict(exported.model.named_parameters())
    name = next(n for n in saved if n.startswith("sam.vision_encoder."))
    assert torch.equal(tower[name].detach(), saved[name].to(tower[name].dtype))


def test_frozen_encoders_stay_as_they_were_while_the_rest_trains(scenes, tmp_path):
    out = tmp_path / "run"
    code = train_main(
        ["--dataset", str(scenes), "--output-dir", str(out), *BASE, "--train-all",
         "--freeze-encoders", "--max-steps", "3", "--eval-every", "3", "--learning-rate", "1e-3"]
    )  # fmt: skip
    assert code == 0
    saved, initial = _params_of(out), _initial()
    for prefix in ("sam.vision_encoder.", "llava.model.vision_tower.",
                   "llava.model.multi_modal_projector."):  # fmt: skip
        assert not _changed(saved, initial, prefix), prefix
    assert _changed(saved, initial, "llava.model.language_model.")
    assert _changed(saved, initial, "sam.mask_decoder.")


def test_warmups_need_train_all(scenes, tmp_path, capsys):
    code = train_main(["--dataset", str(scenes), "--output-dir", str(tmp_path / "r"), *BASE,
                       "--sam-warmup-minutes", "1"])  # fmt: skip
    assert code != 0
    assert "--train-all" in capsys.readouterr().err


def test_warmup_learning_rates_reach_their_stages(scenes, tmp_path, monkeypatch):
    """--vision-warmup-lr and --sam-warmup-lr are the peak rates each warm-up runs with."""
    from lisa_demo.train import warmup

    seen = {}

    def record(stage):
        def run(*args, learning_rate, **kwargs):
            seen[stage] = learning_rate
            return {"stage": stage, "steps": 0, "seconds": 0.0}

        return run

    monkeypatch.setattr(warmup, "warm_up_vision", record("vision"))
    monkeypatch.setattr(warmup, "warm_up_sam", record("sam"))
    code = train_main(
        ["--dataset", str(scenes), "--output-dir", str(tmp_path / "r"), *BASE, "--train-all",
         "--vision-warmup-minutes", "1", "--sam-warmup-minutes", "1", "--vision-warmup-lr",
         "3e-3", "--sam-warmup-lr", "2e-3", "--max-steps", "1", "--eval-every", "1"]
    )  # fmt: skip
    assert code == 0
    assert seen == {"vision": 3e-3, "sam": 2e-3}


@pytest.mark.parametrize("flag", ["--vision-warmup-lr", "--sam-warmup-lr"])
def test_warmup_learning_rates_must_be_positive(scenes, tmp_path, capsys, flag):
    code = train_main(["--dataset", str(scenes), "--output-dir", str(tmp_path / "r"), *BASE,
                       "--train-all", "--vision-warmup-minutes", "1", flag, "0"])  # fmt: skip
    assert code != 0
    assert f"{flag} must be > 0" in capsys.readouterr().err


ENCODERS = (
    "sam.vision_encoder.",
    "llava.model.vision_tower.",
    "llava.model.multi_modal_projector.",
)


def test_save_warmed_then_init_from_starts_a_fresh_loop_on_the_warmed_weights(scenes, tmp_path):
    """--save-warmed writes checkpoints/warmed between the warm-ups and the LISA loop (step 0,
    the warmed encoders, the training-only prompts); --init-from starts a new run on exactly
    those weights with no warm-up and a fresh step count, and (frozen) keeps its encoders."""
    warm = tmp_path / "warm"
    code = train_main(
        ["--dataset", str(scenes), "--output-dir", str(warm), *BASE, "--train-all",
         "--vision-warmup-minutes", "0.05", "--sam-warmup-minutes", "0.05", "--target-weight", "1",
         "--freeze-encoders", "--save-warmed", "--max-steps", "2", "--eval-every", "2",
         "--learning-rate", "1e-3"]
    )  # fmt: skip
    assert code == 0
    kinds = [(e["kind"], e["step"]) for e in _events(warm) if e["event"] == "checkpoint"]
    assert kinds[0] == ("warmed", 0)
    state = json.loads((warm / "checkpoints" / "warmed" / "trainer_state.json").read_text())
    assert state["step"] == 0
    warmed, last, initial = _params_of(warm, "warmed"), _params_of(warm), _initial()
    assert any(n.startswith("description_prompts.") for n in warmed)
    for prefix in ENCODERS[:2]:
        assert _changed(warmed, initial, prefix), prefix  # the warm-ups trained them
    assert _changed(last, warmed, "llava.model.language_model.")  # the loop came after

    run = tmp_path / "from-warm"
    code = train_main(
        ["--dataset", str(scenes), "--output-dir", str(run), *BASE, "--train-all",
         "--target-weight", "1", "--freeze-encoders", "--init-from", str(warm), "--max-steps", "2",
         "--eval-every", "2", "--learning-rate", "1e-3"]
    )  # fmt: skip
    assert code == 0
    events = _events(run)
    start = events[0]
    assert start["event"] == "start" and start["start_step"] == 0
    assert start["initialized_from"] == str(warm / "checkpoints" / "warmed")
    assert not [e for e in events if e["event"].startswith("warmup")]
    assert [e["step"] for e in events if e["event"] == "eval"] == [2]  # 2 new steps, not 2 more
    saved = _params_of(run)
    for prefix in (*ENCODERS, "description_prompts."):  # the target loss pulls towards these
        assert not _changed(saved, warmed, prefix), prefix
    assert _changed(saved, warmed, "llava.model.language_model.")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--init-from", "X", "--resume", "X"], "either --resume"),
        (["--init-from", "X", "--sam-warmup-minutes", "1"], "drop --vision-warmup-minutes"),
        (["--save-warmed"], "add --vision-warmup-minutes"),
        (["--sam-warmup-minutes", "1", "--embedding-cache-dir", "C"], "drop --embedding-cache-dir"),
        (["--init-from", "NOWHERE"], "no checkpoint there"),
        (["--init-from", "MISSING"], "does not exist"),
    ],
)
def test_init_from_and_save_warmed_refuse_what_cannot_work(scenes, tmp_path, capsys, flags,
                                                           message):  # fmt: skip
    for folder in ("X", "NOWHERE"):  # folders without a checkpoint
        (tmp_path / folder).mkdir()
    flags = [str(tmp_path / f) if f in ("X", "NOWHERE", "C", "MISSING") else f for f in flags]
    code = train_main(["--dataset", str(scenes), "--output-dir", str(tmp_path / "r"), *BASE,
                       "--train-all", "--max-steps", "1", *flags])  # fmt: skip
    assert code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()
