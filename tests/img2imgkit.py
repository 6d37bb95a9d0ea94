"""Two items through an img2img stage, ours against diffusers called directly: the inputs, and each
side's run of them (fp32 tiny models; a batched call sums in another order than a single one, so the
two are equal up to ATOL)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from kits.helpers import ROUNDING_ATOL
from schemas.job import ResolvedParams
from schemas.messages import StagePlan
from workers.models import LoadedModel
from workers.stages.common import StageBatch, StageOutput
from workers.stages.img2img import run_img2img

PARAMS = ResolvedParams(strength=0.75, guidance_scale=7.5, steps=4, size=(32, 32))
PROMPTS = ["a cat wizard", "astronaut in a jungle"]
NEGATIVES: list[str | None] = [None, "ugly"]
SEEDS = [7, 123]
ATOL = ROUNDING_ATOL


def sample(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8"))


IMAGES = [sample(1), sample(2)]


def run_ours(loaded: LoadedModel, plan: StagePlan) -> StageOutput:
    batch = StageBatch(prompts=PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, images=IMAGES)
    return run_img2img(loaded, plan, PARAMS, batch)


def run_direct(pipeline: Any) -> np.ndarray:
    """The items one at a time through a diffusers pipeline, each with its own seeded generator."""
    pipeline.set_progress_bar_config(disable=True)
    rows = []
    for index in range(len(PROMPTS)):
        result = pipeline(
            prompt=PROMPTS[index],
            negative_prompt=NEGATIVES[index],
            image=IMAGES[index],
            strength=PARAMS.strength,
            guidance_scale=PARAMS.guidance_scale,
            num_inference_steps=PARAMS.steps,
            generator=torch.Generator().manual_seed(SEEDS[index]),
            output_type="np",
        )
        rows.append(result.images[0])
    stacked: np.ndarray = np.stack(rows)
    return stacked
