"""Settings from the environment and the model registry, without loading any model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lisa_demo.ui import models
from lisa_demo.ui.models import ModelRegistry, ModelSpec, ModelUnavailable
from lisa_demo.ui.settings import AppSettings, default_host, server_paths_allowed


def test_settings_from_env_and_flags() -> None:
    env = {"LISA_PRESET": "tiny-random", "LISA_SAM": "my/sam", "LISA_ALLOW_SERVER_PATHS": "1"}
    settings = AppSettings.from_env(env, sam="flag/sam")
    assert settings.preset == "tiny-random" and settings.sam == "flag/sam"
    assert settings.allow_server_paths
    defaults = AppSettings.from_env({})
    assert defaults.preset == "tiny" and not defaults.allow_server_paths


def test_spaces_bind_publicly_and_never_allow_server_paths() -> None:
    assert default_host({}) == "127.0.0.1"
    assert default_host({"SPACE_ID": "me/lisa"}) == "0.0.0.0"
    assert not server_paths_allowed({"SPACE_ID": "me/lisa", "LISA_ALLOW_SERVER_PATHS": "1"})


def test_missing_bundled_model_gives_a_status_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(models, "BUNDLED_MODEL_DIR", tmp_path / "absent")
    registry = ModelRegistry(AppSettings(runs_dir=tmp_path / "runs"), loader=_never)
    assert registry.choices() == []
    assert "--preset tiny-random" in registry.status()
    with pytest.raises(ModelUnavailable, match="--preset tiny-random"):
        registry.get(None)


def test_configured_preset_is_offered_and_default(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(models, "BUNDLED_MODEL_DIR", tmp_path / "absent")
    settings = AppSettings(preset="tiny-random", runs_dir=tmp_path / "runs")
    registry = ModelRegistry(settings, loader=_never)
    assert registry.choices() == [("tiny-random", "configured")]
    assert registry.default_key() == "configured" and registry.status() == ""


def test_real_7b_preset_needs_a_gpu(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(models, "gpu_available", lambda: False)
    settings = AppSettings(preset="llava-1.5-7b", runs_dir=tmp_path / "runs")
    registry = ModelRegistry(settings, loader=_never)
    assert "configured" not in dict((v, k) for k, v in registry.choices())
    assert "needs a GPU" in registry.status()


def test_run_checkpoints_become_choices_and_load_once(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(models, "BUNDLED_MODEL_DIR", tmp_path / "absent")
    runs = tmp_path / "runs"
    for kind in ("best", "last"):
        folder = runs / "run-1" / "checkpoints" / kind
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text("{}")
    (runs / "run-1" / "ui_run.json").write_text(json.dumps({"preset": "tiny-random"}))
    loaded: list[ModelSpec] = []
    registry = ModelRegistry(AppSettings(runs_dir=runs), loader=lambda s: loaded.append(s) or s)
    keys = [key for _, key in registry.choices()]
    assert keys == ["checkpoint:run-1/checkpoints/best", "checkpoint:run-1/checkpoints/last"]
    spec = registry.get("checkpoint:run-1/checkpoints/best")
    registry.get("checkpoint:run-1/checkpoints/best")
    assert len(loaded) == 1 and spec.preset == "tiny-random"
    assert Path(spec.checkpoint) == runs / "run-1" / "checkpoints" / "best"
    with pytest.raises(ModelUnavailable, match="Unknown model"):
        registry.get("checkpoint:run-2/checkpoints/best")


def _never(spec: ModelSpec):
    raise AssertionError("no model may load in this test")


def test_a_cli_run_is_loaded_with_the_model_config_of_its_start_event(tmp_path) -> None:
    import dataclasses

    from lisa_demo.config import preset

    trained = preset("tiny-random").replace(use_lora=True, lora_r=4, lora_targets=("q_proj",))
    start = {"event": "start", "config": {"model": dataclasses.asdict(trained) | {"new": 1}}}
    run = tmp_path / "runs" / "cli-run"
    (run / "checkpoints" / "last").mkdir(parents=True)
    (run / "checkpoints" / "last" / "manifest.json").write_text("{}")
    (run / "events.jsonl").write_text(json.dumps(start) + "\n")
    [spec] = models.find_checkpoint_specs(tmp_path / "runs", fallback_preset="tiny")
    assert spec.model_config() == trained
