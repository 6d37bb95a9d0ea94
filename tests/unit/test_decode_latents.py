"""A stage that both saves its image and hands over latents asks diffusers for latents and decodes them
itself (workers.stages.common.decode_latents). The image must be the one the pipeline's own
output_type="np" gives: SDXL's float32 decode of a float16 VAE and its latents mean and std, and the
safety checker's black images. Tiny random-weight models; float16 runs on the CPU at this size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
from PIL import Image
from transformers import CLIPImageProcessor

from workers.stages.common import decode_latents
from workers.tiny_models import write_tiny_sdxl_refiner

IMAGES = [Image.new("RGB", (64, 64), (120, 30, 200)), Image.new("RGB", (64, 64), (10, 200, 90))]


def own_and_decoded(pipeline: Any, **extra: Any) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's own images, and ours from its latents, for the same inputs and seeds."""
    kwargs = {"prompt": ["a cat", "a dog"], "image": IMAGES, "num_inference_steps": 4, "strength": 0.5}

    def seeded() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed) for seed in (1, 2)]

    own = pipeline(**kwargs, **extra, generator=seeded(), output_type="np").images
    latents = pipeline(**kwargs, **extra, generator=seeded(), output_type="latent").images
    return own, decode_latents(pipeline, latents)


@pytest.mark.parametrize("latent_stats", [False, True])
def test_sdxl_float16_latents_decode_in_float32_as_the_pipeline_does(
    tmp_path: Path, latent_stats: bool
) -> None:
    pipeline = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        write_tiny_sdxl_refiner(tmp_path / "sdxl"), torch_dtype=torch.float16
    )
    pipeline.vae.register_to_config(force_upcast=True)
    if latent_stats:
        pipeline.vae.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
    own, decoded = own_and_decoded(pipeline)
    assert pipeline.vae.dtype == torch.float16  # put back after decoding
    np.testing.assert_allclose(decoded, own, atol=1e-6)


def test_sd_float16_latents_decode_in_float16_as_the_pipeline_does(tiny_sd_dir: Path) -> None:
    """SD 1.x pipelines never upcast, even with force_upcast in the VAE's config (its default)."""
    pipeline = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd_dir, torch_dtype=torch.float16)
    assert pipeline.vae.config.force_upcast
    own, decoded = own_and_decoded(pipeline)
    np.testing.assert_allclose(decoded, own, atol=1e-6)


class FlagsFirstImage:
    """A safety checker that flags the first image of each batch, blacking it out as diffusers' does."""

    def __call__(self, images: torch.Tensor, clip_input: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        flagged = [index == 0 for index in range(len(images))]
        images = images.clone()
        images[0] = torch.zeros_like(images[0])
        return images, flagged


def test_the_safety_checker_runs_on_decoded_latents_as_in_the_pipeline(tiny_sd_dir: Path) -> None:
    loaded = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd_dir)
    components = loaded.components | {
        "safety_checker": FlagsFirstImage(),
        "feature_extractor": CLIPImageProcessor(),
    }
    pipeline = StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False)
    own, decoded = own_and_decoded(pipeline)
    assert not own[0].any() and own[1].any()  # the checker did run in the pipeline
    np.testing.assert_allclose(decoded, own, atol=1e-6)
