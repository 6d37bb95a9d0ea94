"""A registry entry's local source is checked where its models load (or are validated for): a missing
or misspelt folder, one that is no diffusers folder, weights of its variant that are not there. A
producer that only submits does not check, since its machine may hold no model at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.registry import Registry
from schemas.errors import ConfigError


def registry_with(tmp_path: Path, **entry: object) -> Registry:
    folder = tmp_path / "models" / "tiny-sd"
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (tmp_path / "not-a-model").mkdir(exist_ok=True)
    models = tmp_path / "models.yaml"
    models.write_text(json.dumps({"models": {"m": {"dtype": "float32", **entry}}}))
    registry = Registry.load(models)
    registry.check_sources = True
    return registry


def test_a_folder_relative_to_models_yaml_resolves_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = registry_with(tmp_path, source="models/tiny-sd")
    monkeypatch.chdir("/")
    resolved = registry.resolve("m")
    assert resolved.entry.source == str(tmp_path / "models" / "tiny-sd")
    assert resolved.entry.pipeline == "StableDiffusionPipeline"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("models/tiny-sdd", "models/tiny-sdd: no such folder; did you mean 'tiny-sd'?"),
        ("./models/other", "models/other: no such folder"),
        ("not-a-modl", "not-a-modl: no such folder; did you mean 'not-a-model'?"),  # close to a folder here
        ("not-a-model", "not a diffusers folder (no model_index.json or config.json)"),
    ],
)
def test_a_local_source_that_cannot_load_is_one_line_naming_the_model(
    tmp_path: Path, source: str, message: str
) -> None:
    registry = registry_with(tmp_path, source=source)
    with pytest.raises(ConfigError) as caught:
        registry.resolve("m")
    text = str(caught.value)
    assert text.startswith(f"model 'm' in {tmp_path / 'models.yaml'}: ") and message in text
    assert "\n" not in text


def test_a_variant_whose_weights_are_missing_is_an_error(tmp_path: Path) -> None:
    registry = registry_with(tmp_path, source="models/tiny-sd", variant="fp16")
    with pytest.raises(ConfigError, match=r"variant 'fp16': no \*\.fp16\.\* weights under"):
        registry.resolve("m")
    (tmp_path / "models" / "tiny-sd" / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    assert registry.resolve("m").entry.variant == "fp16"


def test_hub_ids_and_a_producer_that_only_submits_are_not_checked(tmp_path: Path) -> None:
    registry = registry_with(tmp_path, source="org/some-model")
    assert registry.resolve("m").entry.source == "org/some-model"  # a hub id, left to the worker
    registry = registry_with(tmp_path, source="models/tiny-sdd")
    registry.check_sources = False
    assert registry.resolve("m").entry.source == str(tmp_path / "models" / "tiny-sdd")
