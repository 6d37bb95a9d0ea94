"""upscale: the x2 latent upscaler (StableDiffusionLatentUpscalePipeline, takes images or SD latents)
or the x4 upscaler (StableDiffusionUpscalePipeline, takes a low-resolution image and a noise_level).

The x4 UNet concatenates the low-resolution image's channels to its latents, so it must be given an
image; the job planner never hands it latents, and this stage refuses them. Both take their images as
PIL and preprocess them themselves (workers.stages.inputs encodes img2img inputs only): the x2 encodes
the batch at once already, and the x4 encodes nothing. Their outputs are copied back without blocking
(workers.stages.common.call_pipeline)."""

from __future__ import annotations

from typing import Any

from schemas.errors import StageError
from schemas.job import IMAGES, Outputs, ResolvedParams
from schemas.messages import StagePlan
from schemas.registry import X4_UPSCALER
from workers.models import LoadedModel
from workers.prompts import prompt_arguments
from workers.stages.common import StageBatch, StageOutput, batch_input, call_pipeline, check_batch, generators


def run_upscale(
    model: LoadedModel, plan: StagePlan, params: ResolvedParams, batch: StageBatch, outputs: Outputs = IMAGES
) -> StageOutput:
    check_batch(batch, needs_input=True)
    pipeline = model.upscaler()
    model.use_adapters(plan.loras)
    kwargs: dict[str, Any] = {
        "image": batch_input(batch),
        "guidance_scale": params.guidance_scale,
        "num_inference_steps": params.steps,
        "generator": generators(batch.seeds),
        **prompt_arguments(pipeline, batch.prompts, batch.negative_prompts, plan.prompt_syntax),
    }
    if model.class_name == X4_UPSCALER:
        if batch.latents is not None:
            raise StageError(
                "the x4 upscaler needs an image: its UNet concatenates image channels to its latents"
            )
        kwargs["noise_level"] = params.noise_level
    return call_pipeline(pipeline, kwargs, outputs)
