"""Settings from the environment and the model registry, without loading any model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lisa_demo.config import BUNDLED_MODEL_DIR, PROJECT_ROOT, full_model_config
from lisa_demo.ui import models
from lisa_demo.ui.models import (
    BUNDLED_KEY,
    TINY_MODEL_NOTE,
    ModelRegistry,
    ModelSpec,
    ModelUnavailable,
)
from lisa_demo.ui.settings import AppSettings
from tests.ui.conftest import TINY_LISA_NAME

TINY_LISA_KEY = f"model:{TINY_LISA_NAME}"
TINY_LISA_LABEL = f"{TINY_LISA_NAME} (LISA, llava_v1)"


def test_settings_from_env_and_flags() -> None:
    env = {"LISA_PRESET": "tiny-random", "LISA_SAM": "my/sam", "LISA_ALLOW_SERVER_PATHS": "1"}
    settings = AppSettings.from_env(env, sam="flag/sam")
    assert settings.preset == "tiny-random" and settings.sam == "flag/sam"
    assert settings.allow_server_paths
    defaults = AppSettings.from_env({})
    assert defaults.preset == "tiny" and not defaults.allow_server_paths
    assert defaults.model is None and defaults.models_dir == PROJECT_ROOT / "models"


def test_full_model_settings_from_env_and_flags(tmp_path) -> None:
    env = {
        "LISA_MODEL": "/m/lisa-7b",
        "LISA_MODELS_DIR": str(tmp_path),
        "LISA_QUANTIZATION": "4bit",
    }
    settings = AppSettings.from_env(env)
    assert (settings.model, settings.models_dir) == ("/m/lisa-7b", tmp_path)
    assert settings.quantization == "4bit" and settings.preset == "tiny"
    assert AppSettings.from_env(env, model="/flag/lisa", models_dir="/flag").model == "/flag/lisa"
    assert AppSettings.from_env(env, models_dir="/flag").models_dir == Path("/flag")
    # A flag naming the model replaces the variables that name it the other way.
    by_preset = AppSettings.from_env(env, preset="tiny-random")
    assert by_preset.model is None and by_preset.preset == "tiny-random"
    by_model = AppSettings.from_env({"LISA_PRESET": "llava-1.5-7b", "LISA_SAM": "s"}, model="/m")
    assert (by_model.model, by_model.preset, by_model.sam) == ("/m", "tiny", None)
    with pytest.raises(ValueError, match="names the whole model"):
        AppSettings.from_env({"LISA_MODEL": "/m", "LISA_LLAVA": "some/llava"})


def test_app_flags_refuse_a_bad_model_folder_in_one_line(tmp_path, capsys) -> None:
    import app

    (tmp_path / "file").write_text("")
    for argv, message in (
        (["--model", str(tmp_path / "absent")], "does not exist"),
        (["--model", "absent-here"], "model folder not found"),
        (["--model", str(tmp_path)], "is not a full model folder"),
        (["--model", str(BUNDLED_MODEL_DIR), "--preset", "tiny-random"], "drop --preset"),
        (["--models-dir", str(tmp_path / "file")], "is a file"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            app.main(argv)  # refused before any app is built
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert app.model_error(app.parse_args(["--model", str(BUNDLED_MODEL_DIR)])) is None


def _settings(tmp_path: Path, **fields: object) -> AppSettings:
    """Settings whose runs and models folders are empty unless given."""
    fields.setdefault("models_dir", tmp_path / "models")
    return AppSettings(runs_dir=tmp_path / "runs", **fields)


def test_missing_bundled_model_gives_a_status_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(models, "BUNDLED_MODEL_DIR", tmp_path / "absent")
    registry = ModelRegistry(_settings(tmp_path), loader=_never)
    assert registry.choices() == []
    assert "--preset tiny-random" in registry.status()
    with pytest.raises(ModelUnavailable, match="--preset tiny-random"):
        registry.get(None)


def test_configured_preset_is_offered_and_default(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(models, "BUNDLED_MODEL_DIR", tmp_path / "absent")
    registry = ModelRegistry(_settings(tmp_path, preset="tiny-random"), loader=_never)
    assert registry.choices() == [("tiny-random", "configured")]
    assert registry.default_key() == "configured" and registry.status() == ""


def test_real_7b_preset_needs_a_gpu(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(models, "gpu_available", lambda: False)
    registry = ModelRegistry(_settings(tmp_path, preset="llava-1.5-7b"), loader=_never)
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
    registry = ModelRegistry(_settings(tmp_path), loader=lambda s: loaded.append(s) or s)
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


# Full models: the models folder, the configured one, what a CPU can serve, the note -----------
def test_models_folder_lists_a_converted_lisa_after_the_bundled_model(
    tmp_path, converted_models_dir
) -> None:
    (converted_models_dir.parent / "not-a-model").mkdir(exist_ok=True)  # ignored
    registry = ModelRegistry(_settings(tmp_path, models_dir=converted_models_dir), _never)
    assert registry.choices() == [
        ("bundled tiny LISA", BUNDLED_KEY),
        (TINY_LISA_LABEL, TINY_LISA_KEY),
    ]
    assert registry.default_key() == BUNDLED_KEY and registry.status() == ""
    [spec] = [spec for spec in registry.specs() if spec.key == TINY_LISA_KEY]
    cfg = spec.model_config()
    assert cfg == full_model_config(converted_models_dir / TINY_LISA_NAME)
    assert cfg.prompt_format == "llava_v1" and cfg.quantization == "none"


def test_configured_full_model_is_the_default_and_listed_once(
    tmp_path, converted_models_dir
) -> None:
    folder = converted_models_dir / TINY_LISA_NAME
    settings = _settings(tmp_path, models_dir=converted_models_dir, model=str(folder))
    registry = ModelRegistry(settings, _never)
    assert registry.choices() == [
        ("bundled tiny LISA", BUNDLED_KEY),
        (TINY_LISA_LABEL, "configured"),
    ]
    assert registry.default_key() == "configured"
    # With a fine-tuned checkpoint on top, the plain model stays a choice of its own.
    checkpoint = tmp_path / "ckpt"
    registry = ModelRegistry(dataclasses.replace(settings, checkpoint=str(checkpoint)), _never)
    assert [key for _, key in registry.choices()] == [BUNDLED_KEY, TINY_LISA_KEY, "configured"]
    assert registry.choices()[2][0] == f"{TINY_LISA_LABEL} + ckpt"
    # --model assets/tiny-lisa alone is the default model, not a second entry.
    registry = ModelRegistry(_settings(tmp_path, model=str(BUNDLED_MODEL_DIR)), _never)
    assert registry.choices() == [("bundled tiny LISA", BUNDLED_KEY)]


def test_a_configured_folder_that_is_no_full_model_gives_a_status_line(tmp_path) -> None:
    registry = ModelRegistry(_settings(tmp_path, model=str(tmp_path / "absent")), _never)
    assert registry.choices() == [("bundled tiny LISA", BUNDLED_KEY)]
    assert "LISA_MODEL" in registry.status() and "model folder not found" in registry.status()


def _big_full_model(folder: Path, llava_bytes: int) -> Path:
    """A full-model folder whose llava/ weights take `llava_bytes` (a sparse file)."""
    for part in ("llava", "sam"):
        (folder / part).mkdir(parents=True)
    (folder / "projection.safetensors").write_bytes(b"")
    manifest = {"format": "lisa-studio-bundle", "prompt_format": "llava_v1", "converted_from": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with (folder / "llava" / "model-00001-of-00002.safetensors").open("wb") as handle:
        handle.truncate(llava_bytes)
    return folder


def test_a_full_model_too_big_for_a_cpu_is_offered_only_with_a_gpu(tmp_path, monkeypatch) -> None:
    _big_full_model(tmp_path / "models" / "lisa-7b", 13_500_000_000)
    _big_full_model(tmp_path / "models" / "small", 1_900_000_000)
    monkeypatch.setattr(models, "gpu_available", lambda: False)
    registry = ModelRegistry(_settings(tmp_path), _never)
    keys = [key for _, key in registry.choices()]
    assert keys == [BUNDLED_KEY, "model:small"]
    assert registry.status() == (
        "lisa-7b (LISA, llava_v1) needs a GPU and none is available here (its LLaVA weights "
        "take 13.5 GB, more than a CPU serves here), so it is not offered; run on a GPU machine "
        "(or a GPU Space) or choose a smaller model."
    )
    monkeypatch.setattr(models, "gpu_available", lambda: True)
    assert [key for _, key in registry.choices()] == [BUNDLED_KEY, "model:lisa-7b", "model:small"]
    assert registry.status() == ""


def test_lisa_quantization_applies_to_full_models(tmp_path, converted_models_dir, monkeypatch):
    settings = _settings(tmp_path, models_dir=converted_models_dir, quantization="4bit")
    monkeypatch.setattr(models, "gpu_available", lambda: True)
    registry = ModelRegistry(settings, _never)
    [spec] = [spec for spec in registry.specs() if spec.key == TINY_LISA_KEY]
    assert spec.label == f"{TINY_LISA_LABEL} 4bit"
    assert spec.model_config().quantization == "4bit"
    assert spec.model_config().prompt_format == "llava_v1"
    monkeypatch.setattr(models, "gpu_available", lambda: False)
    assert TINY_LISA_KEY not in [key for _, key in registry.choices()]
    assert "4bit quantization runs on a GPU" in registry.status()


def _run(runs: Path, name: str, trained: object) -> str:
    """A run folder whose start event recorded `trained` (a ModelConfig); its best key."""
    folder = runs / name / "checkpoints" / "best"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    start = {"event": "start", "config": {"model": dataclasses.asdict(trained)}}
    (runs / name / "events.jsonl").write_text(json.dumps(start) + "\n")
    return f"checkpoint:{name}/checkpoints/best"


def test_the_tiny_model_note_follows_the_choice(tmp_path, converted_models_dir) -> None:
    from lisa_demo.config import preset

    fine_tune = {"use_lora": True, "lora_r": 4}
    lisa = full_model_config(converted_models_dir / TINY_LISA_NAME).replace(**fine_tune)
    runs = tmp_path / "runs"
    from_lisa = _run(runs, "run-lisa", lisa)
    from_bundled = _run(runs, "run-bundled", preset("tiny").replace(**fine_tune))
    from_random = _run(runs, "run-random", preset("tiny-random").replace(**fine_tune))
    registry = ModelRegistry(_settings(tmp_path, models_dir=converted_models_dir), _never)
    assert registry.note(BUNDLED_KEY) == TINY_MODEL_NOTE
    assert "synthetic coloured shapes only" in TINY_MODEL_NOTE
    assert "python -m lisa_demo.convert" in TINY_MODEL_NOTE and "docs/SPACE.md" in TINY_MODEL_NOTE
    assert registry.note(from_bundled) == TINY_MODEL_NOTE
    for key in (TINY_LISA_KEY, from_lisa, from_random, "no-such-model", None):
        assert registry.note(key) == "", key
    # The run fine-tuned from the converted LISA reloads on that base, prompt format included.
    [spec] = [spec for spec in registry.specs() if spec.key == from_lisa]
    assert spec.model_config() == lisa and spec.model_config().prompt_format == "llava_v1"


def test_a_configured_hub_repo_is_offered_and_downloaded_only_on_load(
    tmp_path, monkeypatch, capsys
) -> None:
    import app

    repo = "nobody-here/lisa-studio-test-model"
    assert app.model_error(app.parse_args(["--model", repo])) is None  # checked on first use
    monkeypatch.setattr(models, "gpu_available", lambda: False)
    registry = ModelRegistry(_settings(tmp_path, model=repo), loader=models.load_pipeline)
    label = f"{repo} (from the Hub, downloaded on first use)"
    assert registry.choices() == [("bundled tiny LISA", BUNDLED_KEY), (label, "configured")]
    assert registry.default_key() == "configured" and registry.note("configured") == ""
    # Offline (the tests are), loading it says how to download it; the app keeps serving.
    with pytest.raises(ModelUnavailable, match=f"hf download {repo} --local-dir DIR"):
        registry.get("configured")


def test_a_downloaded_hub_repo_is_labelled_from_its_manifest(
    tmp_path, converted_models_dir, monkeypatch
) -> None:
    repo = "someone/tiny-lisa-studio"
    cached = converted_models_dir / TINY_LISA_NAME
    monkeypatch.setattr(models, "local_model_folder", lambda source: cached)
    registry = ModelRegistry(_settings(tmp_path, model=repo), _never)
    assert registry.choices()[-1] == (f"{repo} (LISA, llava_v1)", "configured")
