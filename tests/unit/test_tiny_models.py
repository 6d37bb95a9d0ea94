"""Every tiny model loads back through the loader a worker uses and runs a batch of two with one
generator per item; the hand-offs between them fit: SD latents into the style model and into the x2
latent upscaler, its output into the x4 upscaler, a depth map into the ControlNet, Compel embeddings
into SD and the SDXL refiner."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from compel import Compel, ReturnedEmbeddingsType
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForText2Image,
    ControlNetModel,
    DiffusionPipeline,
    KandinskyV22CombinedPipeline,
    KandinskyV22Img2ImgCombinedPipeline,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionLatentUpscalePipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from PIL import Image
from transformers import pipeline as transformers_pipeline

from kits.helpers import ROUNDING_ATOL
from workers.tiny_models import write_all_tiny_models

pytestmark = pytest.mark.slow

NAMES = {
    "tiny-sd",
    "tiny-sd-style",
    "tiny-sdxl-refiner",
    "tiny-kandinsky22",
    "tiny-sd-x2-latent-upscaler",
    "tiny-sd-x4-upscaler",
    "tiny-controlnet-depth",
    "tiny-depth-estimator",
    "tiny-clip",
}
PROMPTS = ["a cat wizard", "astronaut in a jungle"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tensors this small gain nothing from a second thread, and on a busy two-core machine OpenMP
    threads spinning while they wait for each other made this module over ten times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_all_tiny_models(tmp_path_factory.mktemp("tiny-models"))


def quiet(pipeline: Any) -> Any:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_img2img(folder: Path) -> Any:
    return quiet(AutoPipelineForImage2Image.from_pretrained(folder, torch_dtype=torch.float32))


def load_pipeline(folder: Path) -> Any:
    return quiet(DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32))


@pytest.fixture(scope="module")
def sd(models: dict[str, Path]) -> Any:
    return load_img2img(models["tiny-sd"])


def sample(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_all_models_are_written_by_name_and_deterministically(
    models: dict[str, Path], tmp_path: Path
) -> None:
    assert set(models) == NAMES
    assert all(folder.name == name and folder.is_dir() for name, folder in models.items())
    write_all_tiny_models(tmp_path)
    assert digests(tmp_path) == digests(models["tiny-sd"].parent)


def test_sd_img2img_and_text2img_from_pipe(sd: Any) -> None:
    assert isinstance(sd, StableDiffusionImg2ImgPipeline)
    images = sd(
        prompt=PROMPTS,
        image=[sample(1), sample(2)],
        strength=0.8,
        num_inference_steps=4,
        generator=generators(1, 2),
        output_type="np",
    ).images
    assert images.shape == (2, 32, 32, 3)
    alone = sd(
        prompt=PROMPTS[0],
        image=sample(1),
        strength=0.8,
        num_inference_steps=4,
        generator=generators(1),
        output_type="np",
    ).images
    np.testing.assert_allclose(images[0], alone[0], atol=ROUNDING_ATOL, rtol=0)  # a batch of 2 against 1

    text2img = quiet(AutoPipelineForText2Image.from_pipe(sd))
    assert isinstance(text2img, StableDiffusionPipeline)
    images = text2img(
        prompt=PROMPTS,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=generators(1, 2),
        output_type="np",
    ).images
    assert images.shape == (2, 32, 32, 3)


def test_sd_latents_go_into_the_style_model_as_image(models: dict[str, Path], sd: Any) -> None:
    style = load_img2img(models["tiny-sd-style"])
    assert isinstance(style, StableDiffusionImg2ImgPipeline)
    for name, weights in sd.vae.state_dict().items():
        assert torch.equal(weights, style.vae.state_dict()[name])
    assert not torch.equal(sd.unet.conv_in.weight, style.unet.conv_in.weight)

    latents = sd(
        prompt=PROMPTS,
        image=[sample(1), sample(2)],
        strength=0.8,
        num_inference_steps=4,
        generator=generators(1, 2),
        output_type="latent",
    ).images
    assert latents.shape == (2, 4, 16, 16)
    images = style(
        prompt=PROMPTS,
        image=latents,
        strength=0.5,
        num_inference_steps=4,
        generator=generators(3, 4),
        output_type="np",
    ).images
    assert images.shape == (2, 32, 32, 3)


def test_sdxl_refiner_runs_with_aesthetic_scores(models: dict[str, Path]) -> None:
    refiner = load_img2img(models["tiny-sdxl-refiner"])
    assert isinstance(refiner, StableDiffusionXLImg2ImgPipeline)
    assert refiner.text_encoder is None and refiner.tokenizer is None
    assert refiner.config.requires_aesthetics_score

    def run(aesthetic_score: float) -> Any:
        return refiner(
            prompt=PROMPTS,
            image=[sample(1), sample(2)],
            strength=0.5,
            num_inference_steps=4,
            aesthetic_score=aesthetic_score,
            negative_aesthetic_score=2.5,
            generator=generators(1, 2),
            output_type="np",
        ).images

    high = run(6.0)
    assert high.shape == (2, 32, 32, 3)
    assert np.abs(high - run(1.0)).max() > 1e-4


def test_kandinsky22_combined_img2img_and_text2img_from_pipe(models: dict[str, Path]) -> None:
    kandinsky = load_img2img(models["tiny-kandinsky22"])
    assert isinstance(kandinsky, KandinskyV22Img2ImgCombinedPipeline)
    common = dict(
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=4.0,
        prior_num_inference_steps=2,
        prior_guidance_scale=4.0,
        output_type="np",
    )
    images = kandinsky(
        prompt=PROMPTS, image=[sample(1), sample(2)], strength=0.5, generator=generators(1, 2), **common
    ).images
    assert images.shape == (2, 32, 32, 3)

    # With negative prompts the prior runs prompts and negatives as one batch: one generator for each.
    images = kandinsky(
        prompt=PROMPTS,
        negative_prompt=["blurry", "ugly"],
        image=[sample(1), sample(2)],
        strength=0.5,
        generator=generators(1, 2, 11, 12),
        **common,
    ).images
    assert images.shape == (2, 32, 32, 3)

    text2img = quiet(AutoPipelineForText2Image.from_pipe(kandinsky))
    assert isinstance(text2img, KandinskyV22CombinedPipeline)
    assert text2img(prompt=PROMPTS, generator=generators(1, 2), **common).images.shape == (2, 32, 32, 3)


def test_x4_upscaler_takes_pixels(models: dict[str, Path]) -> None:
    upscaler = load_pipeline(models["tiny-sd-x4-upscaler"])
    assert isinstance(upscaler, StableDiffusionUpscalePipeline)
    assert upscaler.vae.config.scaling_factor == 0.08333
    images = upscaler(
        prompt=PROMPTS,
        image=[sample(1), sample(2)],
        num_inference_steps=2,
        noise_level=20,
        generator=generators(1, 2),
        output_type="np",
    ).images
    assert images.shape == (2, 128, 128, 3)


def test_sd_latents_through_x2_latent_upscaler_then_x4_upscaler(models: dict[str, Path], sd: Any) -> None:
    x2 = load_pipeline(models["tiny-sd-x2-latent-upscaler"])
    x4 = load_pipeline(models["tiny-sd-x4-upscaler"])
    assert isinstance(x2, StableDiffusionLatentUpscalePipeline)

    latents = sd(
        prompt=PROMPTS,
        image=[sample(1), sample(2)],
        strength=0.8,
        num_inference_steps=4,
        generator=generators(1, 2),
        output_type="latent",
    ).images
    assert latents.shape == (2, 4, 16, 16)

    x2_call = dict(prompt=PROMPTS, image=latents, num_inference_steps=2, guidance_scale=0.0)
    upscaled_latents = x2(**x2_call, generator=generators(3, 4), output_type="latent").images
    assert upscaled_latents.shape == (2, 4, 32, 32)
    pixels = x2(**x2_call, generator=generators(3, 4), output_type="np").images
    assert pixels.shape == (2, 64, 64, 3)
    with torch.no_grad():
        decoded = x2.vae.decode(upscaled_latents / x2.vae.config.scaling_factor).sample
    decoded_np = x2.image_processor.postprocess(decoded, output_type="np")
    np.testing.assert_allclose(decoded_np, pixels, atol=1e-5, rtol=0)

    images = x2(**x2_call, generator=generators(3, 4)).images
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    final = x4(
        prompt=PROMPTS, image=images, num_inference_steps=2, noise_level=20, generator=generators(5, 6)
    ).images
    assert [image.size for image in final] == [(256, 256), (256, 256)]


def test_x2_latent_upscaler_takes_pixels(models: dict[str, Path]) -> None:
    x2 = load_pipeline(models["tiny-sd-x2-latent-upscaler"])
    images = x2(
        prompt=PROMPTS,
        image=[sample(1), sample(2)],
        num_inference_steps=2,
        generator=generators(1, 2),
        output_type="np",
    ).images
    assert images.shape == (2, 64, 64, 3)


def test_depth_map_drives_the_controlnet_img2img(models: dict[str, Path], sd: Any) -> None:
    estimator = transformers_pipeline("depth-estimation", model=str(models["tiny-depth-estimator"]))
    results = estimator([sample(3, 48), sample(4, 48)])
    assert [result["depth"].size for result in results] == [(48, 48), (48, 48)]
    assert all(result["depth"].mode == "L" for result in results)
    control_images = [result["depth"].convert("RGB").resize((32, 32)) for result in results]

    controlnet = ControlNetModel.from_pretrained(models["tiny-controlnet-depth"], torch_dtype=torch.float32)
    assert controlnet.config.cross_attention_dim == sd.unet.config.cross_attention_dim
    pipeline = quiet(AutoPipelineForImage2Image.from_pipe(sd, controlnet=controlnet))
    assert isinstance(pipeline, StableDiffusionControlNetImg2ImgPipeline)

    def run(scale: float) -> Any:
        return pipeline(
            prompt=PROMPTS,
            image=[sample(1), sample(2)],
            control_image=control_images,
            controlnet_conditioning_scale=scale,
            strength=0.8,
            num_inference_steps=4,
            generator=generators(1, 2),
            output_type="np",
        ).images

    controlled = run(0.8)
    assert controlled.shape == (2, 32, 32, 3)
    assert np.abs(controlled - run(0.0)).max() > 1e-4


def test_compel_weighted_prompts_for_sd(sd: Any) -> None:
    compel = Compel(tokenizer=sd.tokenizer, text_encoder=sd.text_encoder)
    weighted = compel(["a (cat)1.3 wizard", "astronaut in a jungle--"])
    assert weighted.shape == (2, 77, 32)
    assert not torch.allclose(weighted, compel(["a cat wizard", "astronaut in a jungle"]))
    plain_ours = sd.encode_prompt(["a cat wizard"], "cpu", 1, False)[0]
    torch.testing.assert_close(compel(["a cat wizard"]), plain_ours)

    negative = compel(["ugly", "blurry"])
    weighted, negative = compel.pad_conditioning_tensors_to_same_length([weighted, negative])
    images = sd(
        prompt_embeds=weighted,
        negative_prompt_embeds=negative,
        image=[sample(1), sample(2)],
        strength=0.8,
        num_inference_steps=2,
        generator=generators(1, 2),
        output_type="np",
    ).images
    assert images.shape == (2, 32, 32, 3)


def test_compel_weighted_prompts_for_the_sdxl_refiner(models: dict[str, Path]) -> None:
    refiner = load_img2img(models["tiny-sdxl-refiner"])
    compel = Compel(
        tokenizer=refiner.tokenizer_2,
        text_encoder=refiner.text_encoder_2,
        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
        requires_pooled=True,
    )
    embeds, pooled = compel(["a (cat)1.3 wizard", "astronaut in a jungle--"])
    negative, negative_pooled = compel(["ugly", "blurry"])
    assert embeds.shape == (2, 77, 32) and pooled.shape == (2, 32)

    ours = refiner.encode_prompt(["a cat wizard"], negative_prompt=["ugly"])
    plain, plain_pooled = compel(["a cat wizard"])
    torch.testing.assert_close(plain, ours[0])
    torch.testing.assert_close(plain_pooled, ours[2])

    images = refiner(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=negative,
        negative_pooled_prompt_embeds=negative_pooled,
        image=[sample(1), sample(2)],
        strength=0.5,
        num_inference_steps=4,
        aesthetic_score=6.0,
        negative_aesthetic_score=2.5,
        generator=generators(1, 2),
        output_type="np",
    ).images
    assert images.shape == (2, 32, 32, 3)
