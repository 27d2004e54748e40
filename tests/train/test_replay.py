"""Replay mixing, the best-checkpoint rule and the retention warning; one real fine-tune of the
bundled model with synthetic replay and a harmful learning rate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lisa_demo.config import BUNDLED_MODEL_DIR, preset
from lisa_demo.data.reasonseg import ReasonSegDataset
from lisa_demo.data.synthetic import generate_dataset
from lisa_demo.train.replay import (
    ReplayMix,
    replay_count,
    retention_warning,
    selection_score,
    split_validation,
    synthetic_domain,
)

ROOT = Path(__file__).resolve().parents[2]


class Part(list):
    """A list that records set_epoch calls, like ReasonSegDataset's."""

    epochs: list[int]

    def set_epoch(self, epoch: int) -> None:
        self.__dict__.setdefault("epochs", []).append(epoch)


def test_replay_count_makes_the_share_of_the_mixed_epoch():
    assert replay_count(400, 0.5) == 400  # 400 / (400 + 400)
    assert replay_count(400, 0.25) == 133  # 400 * 0.25 / 0.75 = 133.3
    assert replay_count(90, 0.4) == 60  # 60 / 150 = 0.4
    assert replay_count(400, 0.0) == 0
    assert replay_count(1, 0.01) == 1  # any share > 0 replays something


def test_replay_mix_keeps_every_new_sample_and_draws_the_pool_without_repeats():
    new = Part(f"new{i}" for i in range(10))
    pool = Part(f"old{i}" for i in range(7))
    mix = ReplayMix(new, pool, share=0.5, seed=3)
    assert len(mix) == 20 and mix.n_replay == 10
    drawn = []
    for epoch in range(3):
        mix.set_epoch(epoch)
        items = [mix[i] for i in range(len(mix))]
        assert items[:10] == list(new)  # the new samples, once each, every epoch
        assert [mix.is_replay(i) for i in (9, 10)] == [False, True]
        drawn += items[10:]
    # 30 draws from a pool of 7: every consecutive block of 7 is the whole pool (no sample
    # comes back before all the others have been seen).
    for start in range(0, 28, 7):
        assert sorted(drawn[start : start + 7]) == sorted(pool), drawn
    assert new.epochs[-3:] == [0, 1, 2] and pool.epochs[-3:] == [0, 1, 2]
    # Deterministic per seed; another seed draws another order.
    again = ReplayMix(new, pool, share=0.5, seed=3)
    assert [again[i] for i in range(10, 20)] == drawn[:10]
    other = ReplayMix(new, pool, share=0.5, seed=4)
    assert [other[i] for i in range(10, 20)] != drawn[:10]
    with pytest.raises(IndexError):
        mix[20]


def test_no_replay_leaves_the_new_samples_alone():
    new = Part(["a", "b", "c"])
    assert list(ReplayMix(new, Part(), share=0.5, seed=0)) == ["a", "b", "c"]
    assert list(ReplayMix(new, Part(["x"]), share=0.0, seed=0)) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="replay share"):
        ReplayMix(new, Part(["x"]), share=1.0, seed=0)


def test_best_checkpoint_rule_counts_both_sets():
    margin = 0.03
    # Within the margin (retention 0.80 -> 0.78): ranked by the new data, 1 + new.
    kept = selection_score(0.60, 0.78, 0.80, margin)
    assert kept == pytest.approx(1.60)
    # Past it (0.80 -> 0.50): below every kept checkpoint, whatever it scores on new data,
    # and ranked by how little it lost (1 - 0.30).
    forgot = selection_score(0.95, 0.50, 0.80, margin)
    assert forgot == pytest.approx(0.70)
    assert kept > forgot
    assert selection_score(0.10, 0.79, 0.80, margin) > forgot
    assert selection_score(0.95, 0.70, 0.80, margin) > forgot  # lost 0.10 < 0.30
    # Retention that improved counts as kept; a better new score then wins.
    assert selection_score(0.70, 0.85, 0.80, margin) > kept
    # No retention set (or no score before the run): the new data's metric alone.
    assert selection_score(0.42, None, None, margin) == 0.42
    assert selection_score(0.42, 0.5, None, margin) == 0.42


def test_retention_warning_only_past_the_margin():
    assert retention_warning(0.80, 0.78, 0.03) is None
    assert retention_warning(0.80, 0.77, 0.03) is None  # exactly the margin
    message = retention_warning(0.808, 0.336, 0.03)
    assert message and "0.808" in message and "0.336" in message and "0.472" in message
    assert retention_warning(None, 0.3, 0.03) is None


def test_split_validation_gives_every_second_image_to_retention(tmp_path):
    generate_dataset(tmp_path, {"val": 5}, seed=8)
    val = ReasonSegDataset(tmp_path / "val", queries="first")
    new, held = split_validation(val)
    names = [r.name for r in val.records]
    assert [r.name for r in new.records] == names[0::2]
    assert [r.name for r in held.records] == names[1::2]
    assert len(val.records) == 5  # the input is left alone
    one = ReasonSegDataset(tmp_path / "val", queries="first")
    one.records = one.records[:1]
    assert split_validation(one)[1] is None


def test_only_a_model_trained_on_synthetic_scenes_has_a_synthetic_domain():
    if not BUNDLED_MODEL_DIR.is_dir():
        pytest.skip("the bundled model is not in assets/tiny-lisa")
    domain = synthetic_domain(preset("tiny"))
    assert domain is not None and domain["synthetic"] > 0
    assert domain["exclude_concept"] == "heart"
    assert synthetic_domain(preset("tiny-random")) is None
    assert synthetic_domain(preset("tiny").replace(train_all=True)) is None


@pytest.mark.skipif(not BUNDLED_MODEL_DIR.is_dir(), reason="needs the bundled model")
def test_harmful_fine_tune_of_the_bundled_model_replays_and_ends_with_a_warning(tmp_path):
    """Synthetic replay and retention for the bundled model, an evaluation before the first
    step, and a learning rate far too high: the run ends with the retention warning, in
    events.jsonl and as the CLI's last line."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "lisa_demo.train", "--preset", "tiny", "--synthetic", "8",
         "--max-steps", "3", "--batch-size", "4", "--learning-rate", "0.05",
         "--lr-scheduler", "constant", "--max-val-samples", "4", "--retention-samples", "6",
         "--seg-rate-samples", "0", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("warning: the model forgot"), lines[-3:]
    assert any(line.startswith("step 1/3 · loss") and "left" in line for line in lines), lines
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    start = events[0]
    assert start["dataset"]["replay"] == start["dataset"]["new"] > 0  # share 0.5
    assert start["dataset"]["retention"] == 6
    evals = [e for e in events if e["event"] == "eval"]
    assert evals[0]["step"] == 0 and evals[0]["before"] is True
    assert all(e["retention_n"] == 6 and e["n"] == 4 for e in evals)
    warning = [e for e in events if e["event"] == "warning"]
    assert [w["kind"] for w in warning] == ["retention"]
    end = events[-1]
    assert end["event"] == "end" and end["warning"] == warning[0]["message"]
    assert end["retention_before"] == evals[0]["retention_giou"]
    assert end["retention_before"] - end["retention_best"] > 0.03
    # Replay scenes of every concept, retention scenes without the base's held-out concept.
    retention = [json.loads(p.read_text()) for p in (out / "replay" / "val").glob("*.json")]
    assert len(retention) == 6
    assert all("heart" not in json.dumps(a["objects"]) for a in retention)


def test_lr_scales_put_the_mask_side_and_the_projector_in_their_own_groups(tmp_path):
    import torch

    from lisa_demo.train.loop import build_optimizer
    from lisa_demo.train.options import parse_args

    language, decoder = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    params = [*language.parameters(), *decoder.parameters()]
    mask_side = {id(p) for p in decoder.parameters()}
    base = ["--synthetic", "4", "--output-dir", str(tmp_path), "--learning-rate", "1e-3"]
    one = build_optimizer(params, parse_args([*base, "--mask-lr-scale", "1"]), mask_side)
    assert len(one.param_groups) == 1  # scale 1: one group, as before
    scaled = build_optimizer(params, parse_args([*base, "--mask-lr-scale", "0.3"]), mask_side)
    groups = scaled.param_groups
    assert [g["lr_scale"] for g in groups] == [1.0, 0.3]
    assert [{id(p) for p in g["params"]} for g in groups] == [
        {id(p) for p in language.parameters()}, mask_side
    ]  # fmt: skip
    projector = torch.nn.Linear(2, 2)
    both = build_optimizer(
        [*params, *projector.parameters()],
        parse_args([*base, "--mask-lr-scale", "0", "--projector-lr-scale", "0.1"]),
        mask_side, {id(p) for p in projector.parameters()},
    )  # fmt: skip
    assert [g["lr_scale"] for g in both.param_groups] == [1.0, 0.0, 0.1]
    assert [len(g["params"]) for g in both.param_groups] == [2, 2, 2]


def test_distillation_reference_is_the_model_before_training(tmp_path):
    """The reference prompts come from the same model with its LoRA adapters and trainable
    token rows switched off and its other trained weights (projection, mask decoder) at their
    starting values: exactly the untouched model's, however far training moved."""
    import torch

    from lisa_demo.loading import load_lisa
    from lisa_demo.train.data import SampleBatcher, training_inputs
    from lisa_demo.train.loop import BaseWeights, _base_prompts, _prompt_distance

    generate_dataset(tmp_path, {"train": 2}, seed=5)
    data = ReasonSegDataset(tmp_path / "train", queries="first")
    tuned = load_lisa(preset("tiny-random").replace(use_lora=True, train_tokens=("heart",)),
                      device="cpu", for_training=True)  # fmt: skip
    batcher = SampleBatcher(tuned.processor, tuned.sam_processor, fmt=tuned.prompt_format)
    inputs = training_inputs(batcher([data[0], data[1]], training=True), "cpu", None, None)
    params = [p for p in tuned.model.parameters() if p.requires_grad]
    base = BaseWeights(tuned.model, params)
    tuned.model.eval()  # LoRA's dropout off, so that forwards repeat exactly
    with torch.no_grad():
        untouched = tuned.model(**inputs).prompts  # before any step (LoRA's B is zero)
        for param in params:  # "training" moves every adapter, the projection, the decoder
            param.add_(0.05 * torch.randn_like(param))
        moved = tuned.model(**inputs).prompts
    reference = _base_prompts(tuned.model, inputs, base)
    assert torch.equal(tuned.model(**inputs).prompts[0], moved[0])  # trained weights are back
    for ours, base, now in zip(reference, untouched, moved, strict=True):
        torch.testing.assert_close(ours, base)
        assert not torch.allclose(now, base)
    # The distance averages each replay row's mean squared difference.
    a = [torch.zeros(1, 2), torch.ones(1, 2), torch.full((1, 2), 3.0)]
    b = [torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2)]
    assert _prompt_distance(a, b, [1, 2]).item() == pytest.approx((1.0 + 9.0) / 2)


def test_fine_tune_defaults_keep_the_mask_side_and_distil_replay(tmp_path):
    """A fine-tune's defaults are the conservative ones the model card measured: a full
    model's mask side frozen (scale 0) and replay distillation on; --train-all and a base
    preset (untrained projection) train the mask side at the full rate; an explicit value wins
    either way."""
    from lisa_demo.train.options import parse_args

    base = ["--synthetic", "4", "--output-dir", str(tmp_path)]
    fine_tune = parse_args(base)
    assert (fine_tune.mask_lr_scale, fine_tune.replay_distill) == (0.0, 3.0)
    assert parse_args([*base, "--preset", "tiny-random", "--train-all"]).mask_lr_scale == 1.0
    # a base LLaVA preset: the projection starts untrained, so the mask side must learn
    assert parse_args([*base, "--preset", "llava-1.5-7b"]).mask_lr_scale == 1.0
    assert parse_args([*base, "--mask-lr-scale", "0.5"]).mask_lr_scale == 0.5
    assert parse_args([*base, "--replay-distill", "0"]).replay_distill == 0.0
