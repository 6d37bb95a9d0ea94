"""The registry's real-world checkpoint fields (loras, config, vae, safety_checker, s3:// sources) and
a stage's own loras: how each is placed, what is refused in one line naming where, and what validate
checks (adapters that exist and fit, s3:// sources that hold objects, latent handovers between models
whose VAEs differ). Model folders here are tiny random-weight ones written to disk; nothing loads."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
import yaml
from pydantic import TypeAdapter, ValidationError
from safetensors.torch import save_file

from jobs.manifest import validate_job
from jobs.registry import Registry
from jobstate.storage import forget_s3_clients
from kits.helpers import stage_plan, write_job
from schemas.errors import ConfigError, SpecError
from schemas.job import JobSpec, StageSpec
from schemas.registry import LoraRef, ModelEntry, ResolvedModel
from workers.tiny_models import (
    write_tiny_lora,
    write_tiny_sd,
    write_tiny_sd_x2_latent_upscaler,
    write_tiny_sd_x4_upscaler,
    write_tiny_single_file,
    write_tiny_vae,
)

TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def shelf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/ beside a models.yaml: tiny-sd, an x4 upscaler, a VAE, a single-file checkpoint, LoRAs."""
    root = tmp_path_factory.mktemp("shelf")
    models = root / "models"
    sd = write_tiny_sd(models / "tiny-sd")
    write_tiny_sd_x4_upscaler(models / "tiny-x4")
    write_tiny_sd_x2_latent_upscaler(models / "tiny-x2", vae_from=sd)
    write_tiny_vae(models / "tiny-vae")
    write_tiny_single_file(sd, models / "tiny-sd.safetensors")
    write_tiny_lora(root / "loras" / "style", sd, seed=1, text_encoder=True)
    # A LoRA for a wider UNet: the module is tiny-sd's, its sizes are not.
    misfit = {
        f"unet.{TO_Q}.lora_A.weight": torch.zeros(4, 128),
        f"unet.{TO_Q}.lora_B.weight": torch.zeros(128, 4),
    }
    save_file(misfit, root / "loras" / "wider.safetensors")
    text = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"  # SD 1.5's naming, with text_model.
    save_file(
        {f"{text}.lora_A.weight": torch.zeros(4, 64), f"{text}.lora_B.weight": torch.zeros(64, 4)},
        root / "loras" / "wider-text.safetensors",
    )
    (root / "loras" / "empty").mkdir()
    return root


def registry_of(shelf: Path, models: dict[str, dict[str, Any]], check: bool = True) -> Registry:
    path = shelf / "models.yaml"
    path.write_text(yaml.safe_dump({"models": models}), encoding="utf-8")
    registry = Registry.load(path)
    registry.check_sources = check
    return registry


def load_error(shelf: Path, entry: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        registry_of(shelf, {"m": {"dtype": "float32", **entry}})
    text = str(caught.value)
    assert "\n" not in text
    return text


def resolve_error(registry: Registry, name: str = "m") -> str:
    with pytest.raises(ConfigError) as caught:
        registry.resolve(name)
    text = str(caught.value)
    assert text.startswith(f"model {name!r} in {registry.path}: ") and "\n" not in text, text
    return text


def test_every_field_is_placed_as_workers_load_it(shelf: Path) -> None:
    registry = registry_of(
        shelf,
        {
            "styled": {
                "source": "models/tiny-sd",
                "loras": [{"source": "loras/style", "weight": 0.7}, {"source": "org/hub-lora"}],
                "vae": "models/tiny-vae",
                "safety_checker": False,
            },
            "single": {"source": "models/tiny-sd.safetensors", "config": "models/tiny-sd"},
            "single-hub-config": {"source": "models/tiny-sd.safetensors", "config": "org/sd-config"},
        },
    )
    styled = registry.resolve("styled").entry
    assert styled.loras == (
        LoraRef(source=str(shelf / "loras" / "style"), weight=0.7),
        LoraRef(source="org/hub-lora", weight=1.0),  # a hub id stays one
    )
    assert styled.vae == str(shelf / "models" / "tiny-vae")
    # The latent family follows the VAE that decodes.
    assert styled.vae_family == f"vae:{shelf / 'models' / 'tiny-vae'}"
    assert styled.safety_checker is False
    single = registry.resolve("single").entry
    assert (single.source, single.config) == (
        str(shelf / "models/tiny-sd.safetensors"),
        str(shelf / "models/tiny-sd"),
    )
    assert single.pipeline == "StableDiffusionImg2ImgPipeline"  # read from its config's model_index.json
    assert registry.resolve("single-hub-config").entry.config == "org/sd-config"
    # What workers are handed survives the trip as JSON.
    assert ModelEntry.model_validate_json(styled.model_dump_json()) == styled


def test_s3_sources_are_neither_folders_nor_hub_ids(shelf: Path) -> None:
    registry = registry_of(
        shelf,
        {
            "remote": {
                "source": "s3://models-bucket/published/tiny-sd/",
                "vae": "s3://models-bucket/published/vae",
                "loras": [{"source": "s3://models-bucket/loras/style.safetensors"}],
            }
        },
        check=False,
    )
    entry = registry.resolve("remote").entry
    assert entry.source == "s3://models-bucket/published/tiny-sd/"
    assert entry.vae == "s3://models-bucket/published/vae"
    assert entry.loras[0].source == "s3://models-bucket/loras/style.safetensors"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"source": "models/tiny-sd", "config": "models/tiny-sd"}, "config is for single-file sources"),
        ({"source": "models/tiny-sd.safetensors"}, "a single-file source needs config"),
        ({"source": "models/tiny-sd", "vae": "vae.safetensors"}, "vae: a diffusers AutoencoderKL folder"),
        ({"source": "models/tiny-sd", "fuse_qkv": True, "loras": [{"source": "loras/style"}]}, "fuse_qkv"),
        (
            {"source": "models/tiny-sd", "loras": [{"source": "a"}, {"source": "a", "weight": 2}]},
            "a is listed twice",
        ),
        ({"source": "models/tiny-sd", "loras": [{"source": "a", "weight": 11}]}, "less than or equal to 10"),
        (
            {"source": "models/tiny-sd", "loras": [{"source": "a", "wieght": 1}]},
            "models.m.loras.0.wieght: unknown field; did you mean 'weight'?",
        ),
    ],
)
def test_a_bad_field_is_one_line_naming_where(shelf: Path, entry: dict[str, Any], message: str) -> None:
    text = load_error(shelf, entry)
    assert text.startswith(f"model registry {shelf / 'models.yaml'}:") and message in text, text


def test_vae_family_cannot_be_declared_beside_a_vae(shelf: Path) -> None:
    text = load_error(shelf, {"source": "models/tiny-sd", "vae": "models/tiny-vae", "vae_family": "sd"})
    assert "models.m.vae_family: the latent family follows `vae`" in text, text


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"source": "models/tiny-sdd.safetensors", "config": "models/tiny-sd"}, "no such file; did you mean"),
        ({"source": "models/tiny-sd.safetensors", "config": "models/tiny-vae"}, "config "),
        ({"source": "models/tiny-sd", "vae": "models/tiny-vea"}, "vae "),
        (
            {"source": "models/tiny-sd", "loras": [{"source": "loras/missing.safetensors"}]},
            "no such file or folder",
        ),
        ({"source": "models/tiny-sd", "loras": [{"source": "loras/empty"}]}, "no LoRA weights in the folder"),
        (
            {"source": "models/tiny-sd", "loras": [{"source": "loras/wider.safetensors"}]},
            f"unet.{TO_Q} takes 128 and gives 128 in the adapter, but 64 and 64 in the model",
        ),
        (
            {"source": "models/tiny-sd", "loras": [{"source": "loras/wider-text.safetensors"}]},
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj takes 64 and gives 64 in the adapter, "
            "but 32 and 32 in the model",
        ),
        (
            # The x4 upscaler's UNet has no attention in its second block.
            {"source": "models/tiny-x4", "loras": [{"source": "loras/style"}]},
            "it adapts unet.down_blocks.1.attentions.0",
        ),
        (
            {"source": "models/tiny-x2", "loras": [{"source": "loras/style"}]},
            "loras[0]: StableDiffusionLatentUpscalePipeline takes no LoRA adapters",
        ),
    ],
)
def test_a_source_or_adapter_that_cannot_load_is_one_line(
    shelf: Path, entry: dict[str, Any], message: str
) -> None:
    registry = registry_of(shelf, {"m": {"dtype": "float32", **entry}})
    text = resolve_error(registry)
    assert message in text, text


def test_adapters_that_exist_and_fit_pass(shelf: Path) -> None:
    registry = registry_of(
        shelf,
        {
            "folder": {"source": "models/tiny-sd", "loras": [{"source": "loras/style"}]},
            "file": {
                "source": "models/tiny-sd",
                "loras": [{"source": "loras/style/pytorch_lora_weights.safetensors", "weight": -0.5}],
            },
        },
    )
    assert registry.resolve("folder").entry.loras[0].source == str(shelf / "loras" / "style")
    assert registry.resolve("file").entry.loras[0].weight == -0.5


def test_validate_reports_an_adapter_that_does_not_fit(shelf: Path, tmp_path: Path) -> None:
    registry = registry_of(
        shelf, {"m": {"source": "models/tiny-sd", "loras": [{"source": "loras/wider.safetensors"}]}}
    )
    spec = write_job(tmp_path, [{"id": "a", "image": "a.png"}], model="m")
    with pytest.raises(SpecError) as caught:
        validate_job(spec, registry)
    assert any(
        "stages.0.model" in str(p) and "made for another model?" in str(p) for p in caught.value.problems
    )


def two_stage_job(tmp_path: Path, first: str, second: str, handover: str) -> Path:
    spec = write_job(tmp_path, [{"id": "a", "image": "a.png"}], model=first)
    data = json.loads(spec.read_text())
    data["stages"] = [
        {"type": "img2img", "model": first, "handover": handover, "steps": 4},
        {"type": "img2img", "model": second, "steps": 4},
    ]
    spec.write_text(json.dumps(data))
    return spec


def test_latents_pass_only_between_models_decoding_with_the_same_vae(shelf: Path, tmp_path: Path) -> None:
    registry = registry_of(
        shelf,
        {
            "plain": {"source": "models/tiny-sd", "vae_family": "tiny-sd"},
            "plain-too": {"source": "models/tiny-sd", "vae_family": "tiny-sd"},
            "own-vae": {"source": "models/tiny-sd", "vae": "models/tiny-vae"},
            "own-vae-too": {"source": "models/tiny-sd", "vae": "models/tiny-vae"},
        },
    )
    with pytest.raises(SpecError) as caught:
        validate_job(two_stage_job(tmp_path, "plain", "own-vae", "latent"), registry)
    assert [p.field for p in caught.value.problems] == ["stages.0.handover"]
    assert "latent handover needs models of one VAE family" in str(caught.value.problems[0])
    # auto falls back to the decoded image; the same VAE on both sides hands latents.
    assert (
        validate_job(two_stage_job(tmp_path, "plain", "own-vae", "auto"), registry).recipe[0].handover
        == "image"
    )
    assert (
        validate_job(two_stage_job(tmp_path, "plain", "plain-too", "auto"), registry).recipe[0].handover
        == "latent"
    )
    same = validate_job(two_stage_job(tmp_path, "own-vae", "own-vae-too", "latent"), registry)
    assert same.recipe[0].handover == "latent"


@pytest.fixture
def fresh_s3_client(s3_endpoint: str) -> Iterator[None]:
    """A client of its own for this test's moto endpoint, and none of it left behind."""
    forget_s3_clients()
    yield
    forget_s3_clients()


def test_validate_checks_that_s3_sources_hold_objects(
    shelf: Path, s3_bucket: str, fresh_s3_client: None
) -> None:
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="models/tiny-sd/model_index.json", Body=b"{}")
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="loras/style.safetensors", Body=b"x")
    registry = registry_of(
        shelf,
        {
            "present": {
                "source": f"s3://{s3_bucket}/models/tiny-sd",
                "loras": [{"source": f"s3://{s3_bucket}/loras/style.safetensors"}],
            },
            # A prefix is a folder: models/tiny is not models/tiny-sd.
            "prefix": {"source": f"s3://{s3_bucket}/models/tiny"},
            "lora": {
                "source": "models/tiny-sd",
                "loras": [{"source": f"s3://{s3_bucket}/loras/other.safetensors"}],
            },
            "bucket": {"source": f"s3://{s3_bucket}-missing/models/tiny-sd/"},
        },
    )
    assert registry.resolve("present").entry.source == f"s3://{s3_bucket}/models/tiny-sd"
    assert "no such object or prefix" in resolve_error(registry, "prefix")
    assert f"loras[0].source: s3://{s3_bucket}/loras/other.safetensors: no such object" in resolve_error(
        registry, "lora"
    )
    assert "cannot list it" in resolve_error(registry, "bucket")


def test_a_stage_adds_its_own_adapters_to_its_model_s(shelf: Path, tmp_path: Path) -> None:
    spec = TypeAdapter(StageSpec).validate_python(
        {
            "type": "img2img",
            "model": "m",
            "loras": [{"source": "/abs/b.safetensors"}, {"source": "/abs/a.safetensors", "weight": 0.2}],
        }
    )
    entry = ModelEntry(source="/abs/model", loras=(LoraRef(source="/abs/a.safetensors", weight=0.9),))
    plan = stage_plan(spec.model_dump(), ResolvedModel(name="m", entry=entry))
    # The model's adapter keeps its place and takes the stage's weight; the stage's new one follows.
    assert plan.loras == (
        LoraRef(source="/abs/a.safetensors", weight=0.2),
        LoraRef(source="/abs/b.safetensors", weight=1.0),
    )
    assert plan.loras[0].adapter_name == entry.loras[0].adapter_name  # one adapter, whatever its weight
    with pytest.raises(ValidationError, match="listed twice"):
        TypeAdapter(StageSpec).validate_python(
            {"type": "img2img", "model": "m", "loras": [{"source": "x"}, {"source": "x"}]}
        )
    with pytest.raises(ValidationError, match="loras"):
        TypeAdapter(StageSpec).validate_python({"type": "resize", "loras": [{"source": "x"}]})
    job = write_job(
        tmp_path,
        [{"id": "a", "image": "a.png"}],
        stage={"type": "text2img", "model": "sd15", "loras": [{"source": "org/lora"}]},
    )
    assert JobSpec.model_validate_json(job.read_text()).stages[0].loras == (LoraRef(source="org/lora"),)  # type: ignore[union-attr]


def test_a_stage_s_adapters_are_placed_and_checked_against_its_model(shelf: Path) -> None:
    registry = registry_of(shelf, {"m": {"source": "models/tiny-sd"}})
    model = registry.resolve("m")
    loras = (
        LoraRef(source="loras/style"),
        LoraRef(source="loras/wider.safetensors", weight=0.5),
        LoraRef(source="org/hub-lora"),
    )
    placed, problems = registry.stage_loras(loras, model, base_dir=shelf)
    assert [lora.source for lora in placed] == [
        str(shelf / "loras" / "style"),
        str(shelf / "loras" / "wider.safetensors"),
        "org/hub-lora",
    ]
    assert [field for field, _ in problems] == ["loras.1.source"]
    assert "made for another model?" in problems[0][1]
    registry.check_sources = False
    assert registry.stage_loras(loras, model, base_dir=shelf)[1] == []


def test_a_jobs_stage_adapters_are_relative_to_the_job_and_validated_with_it(
    shelf: Path, tmp_path: Path
) -> None:
    registry = registry_of(shelf, {"m": {"source": "models/tiny-sd", "dtype": "float32"}})
    stage = {"type": "img2img", "model": "m", "loras": [{"source": "style"}, {"source": "wider.safetensors"}]}
    job_dir = shelf / "loras"
    spec = write_job(job_dir / "job", [{"id": "a", "image": "https://example.com/a.png"}], stage=stage)
    spec = spec.rename(job_dir / "job.json")  # the adapters are beside the spec
    (job_dir / "items.jsonl").write_text((job_dir / "job" / "items.jsonl").read_text())
    with pytest.raises(SpecError) as caught:
        validate_job(spec, registry)
    (problem,) = caught.value.problems
    assert (problem.file, problem.field) == (str(spec), "stages.0.loras.1.source")
    assert "made for another model?" in problem.message
    stage["loras"] = [{"source": "style", "weight": 0.5}]
    spec.write_text(json.dumps(json.loads(spec.read_text()) | {"stages": [stage]}))
    (plan,) = validate_job(spec, registry).recipe
    assert plan.loras == (LoraRef(source=str(job_dir / "style"), weight=0.5),)
