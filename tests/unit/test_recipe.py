"""Planning chains: which model each stage runs on and whether latents or images are handed over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.manifest import validate_job
from jobs.registry import Registry
from kits.helpers import write_job
from schemas.errors import SpecError

CLASSES = {
    "sd": "StableDiffusionImg2ImgPipeline",
    "sd-style": "StableDiffusionImg2ImgPipeline",
    "kandinsky": "KandinskyV22Img2ImgCombinedPipeline",
    "x2": "StableDiffusionLatentUpscalePipeline",
    "x4": "StableDiffusionUpscalePipeline",
}
FAMILIES = {"sd": "sd", "sd-style": "sd", "kandinsky": "movq", "x2": "sd", "x4": "x4"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("registry")
    lines = ["models:"]
    for name, class_name in CLASSES.items():
        (root / name).mkdir()
        (root / name / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
        lines += [f"  {name}:", f"    source: {name}", f"    vae_family: {FAMILIES[name]}"]
    lines += [
        "  cn:",
        "    source: lllyasviel/control_v11f1p_sd15_depth",
        "  depth:",
        "    source: some/depth",
    ]
    (root / "models.yaml").write_text("\n".join(lines) + "\n")
    return Registry.load(root / "models.yaml")


ITEM = [{"id": "a", "image": "a.png", "prompt": "astronaut"}]


def plan(
    tmp_path: Path, registry: Registry, stages: list[dict[str, object]], items: object = ITEM
) -> list[str]:
    spec = write_job(tmp_path, items, stage=stages[0])  # type: ignore[arg-type]
    data = json.loads(spec.read_text())
    data["stages"] = stages
    spec.write_text(json.dumps(data))
    job = validate_job(spec, registry)
    return [f"{p.name}:{p.model.name}:{p.handover}:{','.join(p.save)}" for p in job.recipe]


def problems(
    tmp_path: Path, registry: Registry, stages: list[dict[str, object]], items: object = ITEM
) -> list[str]:
    with pytest.raises(SpecError) as caught:
        plan(tmp_path, registry, stages, items)
    return [f"{p.field}: {p.message}" for p in caught.value.problems]


def test_latents_go_between_models_of_one_vae_family(tmp_path: Path, registry: Registry) -> None:
    stages: list[dict[str, object]] = [
        {"type": "img2img", "model": "sd"},
        {"type": "img2img", "model": "sd-style", "prompt_template": "{prompt}, charliebo artstyle"},
        {"type": "upscale", "model": "x2"},
        {"type": "upscale", "model": "x4"},
    ]
    assert plan(tmp_path, registry, stages) == [
        "s0-img2img:sd:latent:",
        "s1-img2img:sd-style:latent:",
        "s2-upscale:x2:image:",  # the x4 upscaler needs pixels
        "s3-upscale:x4:none:image",
    ]


def test_images_go_between_families_and_on_request(tmp_path: Path, registry: Registry) -> None:
    stages: list[dict[str, object]] = [
        {"type": "img2img", "model": "sd", "handover": "image", "save": ["image", "latent"]},
        {"type": "img2img", "model": "sd-style"},
        {"type": "img2img", "model": "kandinsky"},
    ]
    assert plan(tmp_path, registry, stages) == [
        "s0-img2img:sd:image:image,latent",
        "s1-img2img:sd-style:image:",
        "s2-img2img:kandinsky:none:image",
    ]


def test_latent_handover_between_incompatible_models_is_rejected(tmp_path: Path, registry: Registry) -> None:
    found = problems(
        tmp_path,
        registry,
        [
            {"type": "img2img", "model": "sd", "handover": "latent"},
            {"type": "img2img", "model": "kandinsky"},
        ],
    )
    assert found == [
        "stages.0.handover: latent handover needs models of one VAE family (sd: sd, kandinsky: movq)"
    ]
    found = problems(
        tmp_path,
        registry,
        [
            {"type": "upscale", "model": "x2", "handover": "latent"},
            {"type": "upscale", "model": "x4"},
        ],
    )
    assert found == ["stages.0.handover: latent handover needs models of one VAE family (x2: sd, x4: x4)"]


def test_stage_types_must_fit_their_models(tmp_path: Path, registry: Registry) -> None:
    found = problems(
        tmp_path, registry, [{"type": "upscale", "model": "sd"}, {"type": "img2img", "model": "x4"}]
    )
    assert found == [
        "stages.0.model: upscale needs an upscaler model (StableDiffusionLatentUpscalePipeline, "
        "StableDiffusionUpscalePipeline); sd is StableDiffusionImg2ImgPipeline",
        "stages.1.model: x4 is an upscaler (StableDiffusionUpscalePipeline); use it in an upscale stage",
    ]


def test_spec_level_stage_rules(tmp_path: Path, registry: Registry) -> None:
    found = problems(
        tmp_path,
        registry,
        [
            {"type": "img2img", "model": "sd", "control": "depth"},
            {"type": "text2img", "model": "sd"},
            {"type": "upscale", "model": "x2", "prompt_syntax": "compel"},
            {"type": "img2img", "model": "sd", "prompt_template": "{prompt} {style}"},
        ],
    )
    assert found == [
        "stages.0: control needs a controlnet",
        "stages.2: upscalers take plain prompts; prompt_syntax: compel is for img2img and text2img",
        "stages.3.prompt_template: only {prompt} may be used, found ['style']",
    ]
    found = problems(
        tmp_path, registry, [{"type": "img2img", "model": "sd"}, {"type": "text2img", "model": "sd"}]
    )
    assert found == ["stages.1.type: text2img can only be the first stage"]


def test_text2img_items_take_no_image_and_controls_need_a_controlnet(
    tmp_path: Path, registry: Registry
) -> None:
    rows = [
        {"id": "a", "prompt": "x"},
        {"id": "b", "image": "b.png"},
        {"id": "c", "image": "c.png", "control_image": "d.png"},
    ]
    found = problems(
        tmp_path,
        registry,
        [{"type": "text2img", "model": "sd"}, {"type": "img2img", "model": "sd-style"}],
        rows,
    )
    assert found == [
        "image: the first stage is text2img, which takes no image",
        "image: the first stage is text2img, which takes no image",
        "control_image: no stage of this job has a controlnet",
    ]
    assert plan(
        tmp_path,
        registry,
        [{"type": "text2img", "model": "sd"}, {"type": "img2img", "model": "sd-style"}],
        rows[:1],
    ) == ["s0-text2img:sd:latent:", "s1-img2img:sd-style:none:image"]


def test_controlnet_stages_read_images(tmp_path: Path, registry: Registry) -> None:
    stages: list[dict[str, object]] = [
        {"type": "img2img", "model": "sd"},
        {"type": "img2img", "model": "sd", "controlnet": "cn", "control": "depth", "depth_model": "depth"},
    ]
    assert plan(tmp_path, registry, stages) == ["s0-img2img:sd:image:", "s1-img2img:sd:none:image"]
    found = problems(tmp_path, registry, [{"type": "img2img", "model": "sd", "controlnet": "nope"}])
    assert found[0].startswith("stages.0.controlnet: unknown model 'nope'")
