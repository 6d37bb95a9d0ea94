"""text2img: the first stage of text -> image -> image chains, from the same checkpoint an img2img
stage would use (AutoPipelineForText2Image.from_pipe shares its components). No input to prepare;
its outputs are copied back without blocking, except Kandinsky 2.2's (workers.stages.common)."""

from __future__ import annotations

from typing import Any

from schemas.errors import StageError
from schemas.job import IMAGES, Outputs, ResolvedParams
from schemas.messages import StagePlan
from workers.models import LoadedModel
from workers.prompts import prompt_arguments
from workers.stages.common import StageBatch, StageOutput, call_pipeline, check_batch, generators
from workers.stages.kandinsky import image_embeddings, is_kandinsky


def run_text2img(
    model: LoadedModel, plan: StagePlan, params: ResolvedParams, batch: StageBatch, outputs: Outputs = IMAGES
) -> StageOutput:
    check_batch(batch, needs_input=False)
    if batch.images is not None or batch.latents is not None:
        raise StageError("text2img takes no input image")
    pipeline = model.text2img()
    model.use_adapters(plan.loras)
    sampling = model.use_sampler(pipeline, params, plan.spec)
    width, height = params.size
    seeded = generators(batch.seeds)
    kwargs: dict[str, Any] = {
        "width": width,
        "height": height,
        "guidance_scale": params.guidance_scale,
        "num_inference_steps": params.steps,
        "generator": seeded,
    }
    if is_kandinsky(pipeline):
        if plan.prompt_syntax != "plain":
            raise StageError("prompt_syntax: compel works with SD 1.x and SDXL, not Kandinsky 2.2")
        kwargs |= image_embeddings(pipeline, batch, seeded)
        return call_pipeline(pipeline.decoder_pipe, kwargs, outputs)
    kwargs |= prompt_arguments(pipeline, batch.prompts, batch.negative_prompts, plan.prompt_syntax)
    kwargs |= sampling
    return call_pipeline(pipeline, kwargs, outputs)
