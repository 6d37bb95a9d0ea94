"""For each family of the guide, a batched stage call gives each item what the diffusers pipeline,
called directly for that item alone with the same inputs and seed, gives. Tiny models, CPU, fp32."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from compel import Compel, CompelForSD, ReturnedEmbeddingsType
from diffusers import (
    AutoPipelineForImage2Image,
    ControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionLatentUpscalePipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from PIL import Image

from kits.helpers import ROUNDING_ATOL, local_model, stage_plan
from schemas.job import ResolvedParams
from workers.models import LoadedModel
from workers.stages.common import StageBatch, StageOutput
from workers.stages.img2img import run_img2img
from workers.stages.text2img import run_text2img
from workers.stages.upscale import run_upscale
from workers.tiny_models import write_all_tiny_models

pytestmark = pytest.mark.slow

PROMPTS = ["a cat wizard", "astronaut in a jungle", ""]
NEGATIVES: list[str | None] = ["ugly", None, "blurry, low quality"]
SEEDS = [7, 123, 2**40]
# A batched call sums in another order than a single one: equal up to float rounding.
ATOL = ROUNDING_ATOL


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_all_tiny_models(tmp_path_factory.mktemp("families"))


def sample(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


def batch(**inputs: Any) -> StageBatch:
    return StageBatch(prompts=PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, **inputs)


def compare(ours: StageOutput, direct: Callable[[int], np.ndarray], atol: float = ATOL) -> None:
    assert ours.images is not None and len(ours.images) == 3
    for index in range(3):
        np.testing.assert_allclose(
            ours.images[index], direct(index), atol=atol, rtol=0, err_msg=f"item {index}"
        )
    assert np.abs(ours.images[0] - ours.images[1]).max() > 1e-3, (
        "items must differ for the comparison to mean much"
    )


def loaded(name: str, folders: dict[str, Path]) -> tuple[LoadedModel, Any]:
    model = local_model(name, folders[name])
    return LoadedModel(name, model.entry), model


def seeded(index: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEEDS[index])


def test_sdxl_refiner_img2img_with_aesthetic_scores(folders: dict[str, Path]) -> None:
    model, resolved = loaded("tiny-sdxl-refiner", folders)
    plan = stage_plan({"type": "img2img", "aesthetic_score": 7.0, "negative_aesthetic_score": 2.0}, resolved)
    params = ResolvedParams(strength=0.6, guidance_scale=5.0, steps=8, size=(32, 32))
    images = [sample(1), sample(2), sample(3)]
    ours = run_img2img(model, plan, params, batch(images=images))
    direct = StableDiffusionXLImg2ImgPipeline.from_pretrained(folders["tiny-sdxl-refiner"])
    compare(
        ours,
        lambda i: direct(
            prompt=PROMPTS[i],
            negative_prompt=NEGATIVES[i],
            image=images[i],
            strength=0.6,
            guidance_scale=5.0,
            num_inference_steps=8,
            aesthetic_score=7.0,
            negative_aesthetic_score=2.0,
            generator=seeded(i),
            output_type="np",
        ).images[0],
    )


def test_kandinsky22_img2img(folders: dict[str, Path]) -> None:
    model, resolved = loaded("tiny-kandinsky22", folders)
    plan = stage_plan({"type": "img2img"}, resolved)
    params = ResolvedParams(strength=0.8, guidance_scale=4.0, steps=8, size=(64, 64))
    images = [sample(1, 64), sample(2, 64), sample(3, 64)]
    ours = run_img2img(model, plan, params, batch(images=images))
    direct = AutoPipelineForImage2Image.from_pretrained(folders["tiny-kandinsky22"])
    direct.set_progress_bar_config(disable=True)
    # Kandinsky's decoder amplifies batch rounding more than SD's (measured: up to 2e-3 of the [0, 1]
    # range, under one 8-bit level); a single-item batch matches exactly.
    compare(
        ours,
        lambda i: direct(
            prompt=PROMPTS[i],
            negative_prompt=NEGATIVES[i],
            image=images[i],
            strength=0.8,
            guidance_scale=4.0,
            num_inference_steps=8,
            width=64,
            height=64,
            generator=seeded(i),
            output_type="np",
        ).images[0],
        atol=5e-3,
    )
    alone = run_img2img(
        model,
        plan,
        params,
        StageBatch(
            prompts=PROMPTS[1:2], negative_prompts=NEGATIVES[1:2], seeds=SEEDS[1:2], images=images[1:2]
        ),
    )
    assert alone.images is not None
    np.testing.assert_array_equal(
        alone.images[0],
        direct(
            prompt=PROMPTS[1],
            image=images[1],
            strength=0.8,
            guidance_scale=4.0,
            num_inference_steps=8,
            width=64,
            height=64,
            generator=seeded(1),
            output_type="np",
        ).images[0],
    )


def test_sd_text2img(folders: dict[str, Path]) -> None:
    model, resolved = loaded("tiny-sd", folders)
    plan = stage_plan({"type": "text2img"}, resolved)
    params = ResolvedParams(guidance_scale=7.5, steps=6, size=(32, 48))
    ours = run_text2img(model, plan, params, batch())
    assert ours.images is not None and ours.images.shape == (3, 48, 32, 3)
    direct = StableDiffusionPipeline.from_pretrained(
        folders["tiny-sd"], safety_checker=None, requires_safety_checker=False
    )
    direct.set_progress_bar_config(disable=True)
    compare(
        ours,
        lambda i: direct(
            prompt=PROMPTS[i],
            negative_prompt=NEGATIVES[i],
            width=32,
            height=48,
            guidance_scale=7.5,
            num_inference_steps=6,
            generator=seeded(i),
            output_type="np",
        ).images[0],
    )


def test_x2_latent_upscaler_takes_sd_latents(folders: dict[str, Path]) -> None:
    sd = StableDiffusionImg2ImgPipeline.from_pretrained(folders["tiny-sd"])
    sd.set_progress_bar_config(disable=True)
    latents = sd(
        prompt=PROMPTS,
        image=[sample(1), sample(2), sample(3)],
        strength=0.8,
        num_inference_steps=4,
        generator=[seeded(i) for i in range(3)],
        output_type="latent",
    ).images
    model, resolved = loaded("tiny-sd-x2-latent-upscaler", folders)
    plan = stage_plan({"type": "upscale"}, resolved)
    params = ResolvedParams(guidance_scale=0.0, steps=4, size=(32, 32))
    ours = run_upscale(model, plan, params, batch(latents=latents))
    assert ours.images is not None and ours.images.shape == (3, 64, 64, 3)
    direct = StableDiffusionLatentUpscalePipeline.from_pretrained(folders["tiny-sd-x2-latent-upscaler"])
    direct.set_progress_bar_config(disable=True)
    compare(
        ours,
        lambda i: direct(
            prompt=PROMPTS[i],
            negative_prompt=NEGATIVES[i],
            image=latents[i : i + 1],
            guidance_scale=0.0,
            num_inference_steps=4,
            generator=seeded(i),
            output_type="np",
        ).images[0],
    )


def test_x4_upscaler_with_noise_level(folders: dict[str, Path]) -> None:
    model, resolved = loaded("tiny-sd-x4-upscaler", folders)
    plan = stage_plan({"type": "upscale"}, resolved)
    params = ResolvedParams(guidance_scale=9.0, steps=4, size=(32, 32), noise_level=30)
    images = [sample(1, 16), sample(2, 16), sample(3, 16)]
    ours = run_upscale(model, plan, params, batch(images=images))
    assert ours.images is not None and ours.images.shape == (3, 64, 64, 3)
    direct = StableDiffusionUpscalePipeline.from_pretrained(folders["tiny-sd-x4-upscaler"])
    direct.set_progress_bar_config(disable=True)
    compare(
        ours,
        lambda i: direct(
            prompt=PROMPTS[i],
            negative_prompt=NEGATIVES[i],
            image=images[i],
            noise_level=30,
            guidance_scale=9.0,
            num_inference_steps=4,
            generator=seeded(i),
            output_type="np",
        ).images[0],
    )


def test_controlnet_img2img(folders: dict[str, Path]) -> None:
    model, resolved = loaded("tiny-sd", folders)
    controlnet = local_model("tiny-controlnet-depth", folders["tiny-controlnet-depth"])
    plan = stage_plan(
        {"type": "img2img", "controlnet": "tiny-controlnet-depth", "controlnet_conditioning_scale": 0.7},
        resolved,
        controlnet=controlnet,
    )
    params = ResolvedParams(strength=0.8, guidance_scale=7.5, steps=6, size=(32, 32))
    images, controls = [sample(1), sample(2), sample(3)], [sample(11), sample(12), sample(13)]
    ours = run_img2img(
        model,
        plan,
        params,
        batch(images=images, control_images=controls),
    )
    direct = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
        folders["tiny-sd"],
        controlnet=ControlNetModel.from_pretrained(folders["tiny-controlnet-depth"]),
        safety_checker=None,
        requires_safety_checker=False,
    )
    direct.set_progress_bar_config(disable=True)
    compare(
        ours,
        lambda i: direct(
            prompt=PROMPTS[i],
            negative_prompt=NEGATIVES[i],
            image=images[i],
            control_image=controls[i],
            strength=0.8,
            guidance_scale=7.5,
            num_inference_steps=6,
            controlnet_conditioning_scale=0.7,
            generator=seeded(i),
            output_type="np",
        ).images[0],
    )


def test_compel_weighted_prompts(folders: dict[str, Path]) -> None:
    model, resolved = loaded("tiny-sd", folders)
    plan = stage_plan({"type": "img2img", "prompt_syntax": "compel"}, resolved)
    params = ResolvedParams(strength=0.8, guidance_scale=7.5, steps=6, size=(32, 32))
    prompts = ["a (cat)1.3 wizard", "astronaut in a jungle--", "(red fox)0.7 in snow"]
    images = [sample(1), sample(2), sample(3)]
    weighted = StageBatch(prompts=prompts, negative_prompts=NEGATIVES, seeds=SEEDS, images=images)
    ours = run_img2img(model, plan, params, weighted)
    direct = StableDiffusionImg2ImgPipeline.from_pretrained(folders["tiny-sd"])
    direct.set_progress_bar_config(disable=True)
    compel = CompelForSD(direct)

    def alone(i: int) -> np.ndarray:
        conditioning = compel(prompts[i], negative_prompt=NEGATIVES[i] or "")
        return direct(  # type: ignore[no-any-return]
            prompt_embeds=conditioning.embeds,
            negative_prompt_embeds=conditioning.negative_embeds,
            image=images[i],
            strength=0.8,
            guidance_scale=7.5,
            num_inference_steps=6,
            generator=seeded(i),
            output_type="np",
        ).images[0]

    compare(ours, alone)
    plain = run_img2img(
        model,
        stage_plan({"type": "img2img"}, resolved),
        params,
        weighted,
    )
    assert plain.images is not None and ours.images is not None
    assert np.abs(plain.images[0] - ours.images[0]).max() > 1e-3, "weights change the result"


def test_compel_on_the_sdxl_refiners_single_text_encoder(folders: dict[str, Path]) -> None:
    model, resolved = loaded("tiny-sdxl-refiner", folders)
    plan = stage_plan({"type": "img2img", "prompt_syntax": "compel"}, resolved)
    params = ResolvedParams(strength=0.6, guidance_scale=5.0, steps=6, size=(32, 32))
    prompts = ["a (cat)1.3 wizard", "astronaut in a jungle--", "(red fox)0.7 in snow"]
    images = [sample(1), sample(2), sample(3)]
    weighted = StageBatch(prompts=prompts, negative_prompts=NEGATIVES, seeds=SEEDS, images=images)
    ours = run_img2img(model, plan, params, weighted)
    direct = StableDiffusionXLImg2ImgPipeline.from_pretrained(folders["tiny-sdxl-refiner"])
    direct.set_progress_bar_config(disable=True)
    compel = Compel(
        tokenizer=direct.tokenizer_2,
        text_encoder=direct.text_encoder_2,
        requires_pooled=True,
        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
        truncate_long_prompts=False,
    )

    def alone(i: int) -> np.ndarray:
        embeds, pooled = compel(prompts[i])
        negative, negative_pooled = compel(NEGATIVES[i] or "")
        embeds, negative = compel.pad_conditioning_tensors_to_same_length([embeds, negative])
        return direct(  # type: ignore[no-any-return]
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=negative,
            negative_pooled_prompt_embeds=negative_pooled,
            image=images[i],
            strength=0.6,
            guidance_scale=5.0,
            num_inference_steps=6,
            generator=seeded(i),
            output_type="np",
        ).images[0]

    compare(ours, alone)
