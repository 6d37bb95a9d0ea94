"""img2img: a batch of (image, prompt, negative prompt, seed) through one diffusers pipeline call.

Each item gets its own CPU `torch.Generator`, seeded from the item's seed. diffusers draws each
item's VAE sample and noise from its own generator, so an item's result does not depend on the
other items of its batch, and CPU generators give the same numbers on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from schemas.errors import StageError


@dataclass(frozen=True)
class Img2ImgBatch:
    images: list[Image.Image]
    prompts: list[str]
    negative_prompts: list[str | None]
    seeds: list[int]
    strength: float
    guidance_scale: float
    steps: int


def check_inputs(batch: Img2ImgBatch) -> None:
    count = len(batch.images)
    if count == 0:
        raise StageError("img2img: empty batch")
    if not len(batch.prompts) == len(batch.negative_prompts) == len(batch.seeds) == count:
        raise StageError("img2img: images, prompts, negative prompts and seeds differ in length")
    if len({image.size for image in batch.images}) != 1:
        raise StageError("img2img: images in one batch must share a size")
    if not 0.0 < batch.strength <= 1.0:
        raise StageError(f"img2img: strength must be in (0, 1], got {batch.strength}")
    if int(batch.steps * batch.strength) < 1:
        raise StageError(
            f"img2img: steps x strength gives no denoising step ({batch.steps} x {batch.strength})"
        )


def run_img2img(pipeline: Any, batch: Img2ImgBatch) -> np.ndarray:
    """Float images in [0, 1], shape (batch, height, width, 3)."""
    check_inputs(batch)
    # diffusers treats a missing negative prompt as the empty string; a list must be all strings.
    negatives = [negative or "" for negative in batch.negative_prompts]
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in batch.seeds]
    with torch.inference_mode():
        output = pipeline(
            prompt=batch.prompts,
            image=batch.images,
            negative_prompt=negatives,
            strength=batch.strength,
            guidance_scale=batch.guidance_scale,
            num_inference_steps=batch.steps,
            generator=generators,
            output_type="np",
        )
    images: np.ndarray = output.images
    return images


def to_pil(image: np.ndarray) -> Image.Image:
    """The same rounding diffusers applies for output_type="pil"."""
    return Image.fromarray((image * 255).round().astype("uint8"))
