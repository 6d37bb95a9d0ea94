"""What `validate` says of samplers and presets: a name with no diffusers equivalent, a combination
that cannot work (each in one line naming the field, on the spec's line or the item's), a sampler
the stage's pipeline cannot use; the model's sampler a stage runs when it names none; a preset's
adapter among the stage's loras; and the parameters items resolve to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from jobs.manifest import validate_job
from jobs.registry import Registry
from kits.helpers import write_job
from schemas.errors import ConfigError, SpecError
from schemas.job import Defaults, Item, resolve_params
from schemas.messages import StagePlan

CLASSES = {
    "sd": ("StableDiffusionImg2ImgPipeline", "DDIMScheduler"),
    "sdxl": ("StableDiffusionXLPipeline", "EulerDiscreteScheduler"),
    "refiner": ("StableDiffusionXLImg2ImgPipeline", "EulerDiscreteScheduler"),
    "kandinsky": ("KandinskyV22Img2ImgCombinedPipeline", "DDPMScheduler"),
    "x4": ("StableDiffusionUpscalePipeline", "DDIMScheduler"),
    "flow": ("StableDiffusionImg2ImgPipeline", "FlowMatchEulerDiscreteScheduler"),
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("registry")
    lines = ["models:"]
    for name, (pipeline, scheduler) in CLASSES.items():
        (root / name).mkdir()
        index = {"_class_name": pipeline, "scheduler": ["diffusers", scheduler]}
        (root / name / "model_index.json").write_text(json.dumps(index))
        lines += [f"  {name}:", f"    source: {name}"]
    lines += ["  sd-fast:", "    source: sd", "    sampler: DPM++ 2M Karras"]
    lines += ["  x4-fast:", "    source: x4", "    sampler: euler"]
    (root / "models.yaml").write_text("\n".join(lines) + "\n")
    return Registry.load(root / "models.yaml")


ITEMS: list[dict[str, object]] = [{"id": "a", "image": "https://example.com/a.png", "prompt": "p"}]


def job(tmp_path: Path, stages: list[dict[str, Any]], items: list[dict[str, object]] = ITEMS) -> Path:
    if stages[0]["type"] == "text2img":
        items = [{name: value for name, value in item.items() if name != "image"} for item in items]
    spec = write_job(tmp_path, items, stage=stages[0])
    data = json.loads(spec.read_text())
    data["stages"] = stages
    spec.write_text(json.dumps(data, indent=2))
    return spec


def problems(tmp_path: Path, registry: Registry, stages: list[dict[str, Any]], **kwargs: Any) -> list[str]:
    with pytest.raises(SpecError) as caught:
        validate_job(job(tmp_path, stages, **kwargs), registry)
    return [str(problem).split(": ", 1)[1] for problem in caught.value.problems]


def planned(tmp_path: Path, registry: Registry, stages: list[dict[str, Any]]) -> tuple[StagePlan, ...]:
    return validate_job(job(tmp_path, stages), registry).recipe


def img2img(**fields: Any) -> dict[str, Any]:
    return {"type": "img2img", "model": "sd", **fields}


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        (
            img2img(sampler="DPM fast"),
            "stages.0.sampler: 'DPM fast' has no diffusers equivalent here; samplers: ddim, ddpm, pndm",
        ),
        (img2img(schedule="beta", sampler="euler"), "stages.0.schedule: 'beta': diffusers' use_beta_sigmas"),
        (img2img(sampler="DPM++ 2M Karras", schedule="exponential"), "stages.0: schedule: the sampler"),
        (
            img2img(preset="lcm", guidance_scale=7.5),
            "stages.0: guidance_scale: preset lcm takes 0-2, not 7.5",
        ),
        (img2img(preset="lcm", steps=20), "stages.0: steps: preset lcm runs 4-8 steps, not 20"),
        (img2img(preset="lcm", sampler="euler"), "stages.0: sampler: preset lcm runs lcm; leave sampler out"),
        (
            img2img(preset="turbo", schedule="karras"),
            "stages.0: schedule: preset turbo runs euler_a with the",
        ),
        (img2img(preset="hyper-3"), "stages.0.preset: unknown preset 'hyper-3'; presets: lcm, tcd, hyper-2"),
        (img2img(sampler="dpmpp_2m", eta=0.5), "stages.0: eta: dpmpp_2m takes none (ddim, tcd do)"),
        (img2img(preset_lora=False), "stages.0: preset_lora: it replaces a preset's adapter; set preset too"),
        (
            img2img(schedule="karras"),
            "stages.0.schedule: name the sampler it is for: neither the stage nor sd",
        ),
        (img2img(eta=0.2), "stages.0.eta: name a sampler that takes it (ddim, tcd do)"),
        (
            img2img(model="kandinsky", sampler="euler"),
            "stages.0.sampler: kandinsky: KandinskyV22Img2ImgCombinedPipeline runs its own prior and decoder",
        ),
        (
            img2img(model="flow", sampler="euler"),
            "stages.0.sampler: flow: its scheduler is FlowMatchEulerDiscreteScheduler, which the samplers",
        ),
        (
            img2img(model="refiner", preset="lcm"),
            "stages.0.preset_lora: preset lcm publishes LoRAs for SD 1.x and SDXL checkpoints, and "
            "refiner is StableDiffusionXLImg2ImgPipeline: give its adapter as preset_lora",
        ),
        (
            {"type": "upscale", "model": "x4", "sampler": "euler"},
            "stages.0: sampler: upscalers run their checkpoint's own scheduler",
        ),
        (
            img2img(sampler="pndm", steps=10, strength=0.2),
            "stages.0: steps: pndm (PLMS) goes wrong with 2 of 10",
        ),
        (img2img(sampler="lcm", steps=60), "stages.0: steps: lcm runs at most 50 steps"),
        (
            {"type": "upscale", "model": "x4-fast"},
            "stages.0.model: x4-fast has a sampler; upscalers run their own",
        ),
    ],
)
def test_a_combination_that_cannot_work_is_refused_in_one_line_naming_the_field(
    tmp_path: Path, registry: Registry, stage: dict[str, Any], expected: str
) -> None:
    found = problems(tmp_path, registry, [stage])
    assert any(problem.startswith(expected) for problem in found), found


def test_spec_problems_are_on_the_stages_line_and_item_problems_on_the_items(
    tmp_path: Path, registry: Registry
) -> None:
    items: list[dict[str, object]] = [
        *ITEMS,
        {"id": "b", "image": "https://example.com/b.png", "guidance_scale": 5},
    ]
    with pytest.raises(SpecError) as caught:
        validate_job(job(tmp_path, [img2img(preset="lcm")], items), registry)
    (problem,) = caught.value.problems
    assert (Path(problem.file).name, problem.line) == ("items.jsonl", 2)
    assert problem.message.startswith("guidance_scale: preset lcm takes 0-2, not 5")
    with pytest.raises(SpecError) as caught:
        validate_job(job(tmp_path, [img2img(sampler="DPM fast")]), registry)
    (problem,) = caught.value.problems
    assert (
        Path(problem.file).name == "job.json"
        and problem.line is not None
        and problem.field == "stages.0.sampler"
    )


def test_an_item_cannot_choose_a_sampler(tmp_path: Path, registry: Registry) -> None:
    items: list[dict[str, object]] = [{**ITEMS[0], "sampler": "euler"}]
    (found,) = problems(tmp_path, registry, [img2img(sampler="dpmpp_2m")], items=items)
    assert found.startswith(
        "sampler: unknown field; an item cannot choose its sampler: set it on the stage"
    ), found


def test_a_stage_runs_its_models_sampler_unless_it_names_its_own_or_a_preset(
    tmp_path: Path, registry: Registry
) -> None:
    stages: list[dict[str, Any]] = [
        {"type": "img2img", "model": "sd-fast"},
        {"type": "img2img", "model": "sd-fast", "schedule": "exponential"},
        {"type": "img2img", "model": "sd-fast", "sampler": "euler_a"},
        {"type": "img2img", "model": "sd-fast", "preset": "lcm", "preset_lora": False},
    ]
    recipe = planned(tmp_path, registry, stages)
    resolved = [resolve_params(Item(id="a"), plan.spec, Defaults()) for plan in recipe]
    assert [(params.sampler, params.schedule) for params in resolved] == [
        ("dpmpp_2m", "karras"),
        ("dpmpp_2m", "exponential"),
        ("euler_a", None),
        ("lcm", None),
    ]
    assert (resolved[3].steps, resolved[3].guidance_scale, resolved[3].preset) == (4, 1.0, "lcm")


def test_a_preset_adds_the_adapter_it_publishes_for_the_models_family(
    tmp_path: Path, registry: Registry
) -> None:
    cases: list[tuple[dict[str, Any], list[tuple[str, str | None, float]]]] = [
        (img2img(preset="lcm"), [("latent-consistency/lcm-lora-sdv1-5", None, 1.0)]),
        (
            {"type": "text2img", "model": "sdxl", "preset": "hyper-4"},
            [("ByteDance/Hyper-SD", "Hyper-SDXL-4steps-lora.safetensors", 1.0)],
        ),
        # Listed by the stage already: its weight stays.
        (
            img2img(preset="tcd", loras=[{"source": "h1t/TCD-SD15", "weight": 0.5}]),
            [("h1t/TCD-SD15", None, 0.5)],
        ),
        (img2img(preset="turbo"), []),  # turbo checkpoints are distilled: no adapter
        (img2img(preset="lcm", preset_lora={"source": "my/lcm", "weight": 0.7}), [("my/lcm", None, 0.7)]),
        (img2img(model="refiner", preset="lcm", preset_lora=False), []),
    ]
    for index, (stage, adapters) in enumerate(cases):
        (plan,) = planned(tmp_path / str(index), registry, [stage])
        assert [(lora.source, lora.weight_name, lora.weight) for lora in plan.loras] == adapters, stage


def test_the_builtin_sd15_takes_the_sd1_adapters(tmp_path: Path, registry: Registry) -> None:
    (plan,) = planned(tmp_path, registry, [img2img(model="sd15", preset="lcm")])
    assert [lora.source for lora in plan.loras] == ["latent-consistency/lcm-lora-sdv1-5"]


def test_a_models_sampler_is_checked_where_the_registry_is_read(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  m:\n    source: org/m\n    sampler: DPM adaptive\n")
    with pytest.raises(
        ConfigError, match=r"models.yaml:4: models.m.sampler: 'DPM adaptive' has no diffusers"
    ):
        Registry.load(path)
    path.write_text("models:\n  m:\n    source: org/m\n    schedule: karras\n")
    with pytest.raises(ConfigError, match="schedule: name the sampler it is for"):
        Registry.load(path)
