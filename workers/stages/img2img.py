"""img2img: SD 1.x, the SDXL refiner, Kandinsky 2.2 (prior and decoder in one combined pipeline) and
ControlNet img2img, chosen by the checkpoint's own pipeline class; one batched call per batch of a
chunk. The input images reach the pipeline already encoded, as one batch (workers.stages.inputs),
where the pipeline fits."""

from __future__ import annotations

from typing import Any

from schemas.errors import StageError
from schemas.job import IMAGES, Img2ImgStage, Outputs, ResolvedParams
from schemas.messages import StagePlan
from workers.models import LoadedModel
from workers.prompts import prompt_arguments
from workers.stages.common import StageBatch, StageOutput, batch_input, call_pipeline, check_batch, generators
from workers.stages.inputs import control_input, init_latents
from workers.stages.kandinsky import image_embeddings, is_kandinsky


def check_inputs(plan: StagePlan, params: ResolvedParams, batch: StageBatch) -> Img2ImgStage:
    check_batch(batch, needs_input=True)
    spec = plan.spec
    if not isinstance(spec, Img2ImgStage):
        raise StageError(f"img2img got a {spec.type} stage")
    if params.strength is None or params.steps is None or int(params.steps * params.strength) < 1:
        raise StageError(
            f"img2img: steps x strength gives no denoising step ({params.steps} x {params.strength})"
        )
    if plan.controlnet is not None and (
        batch.control_images is None or len(batch.control_images) != len(batch)
    ):
        raise StageError("img2img with a controlnet needs one control image per item")
    return spec


def run_img2img(
    model: LoadedModel, plan: StagePlan, params: ResolvedParams, batch: StageBatch, outputs: Outputs = IMAGES
) -> StageOutput:
    spec = check_inputs(plan, params, batch)
    pipeline = model.img2img(plan.controlnet)
    model.use_adapters(plan.loras)
    sampling = model.use_sampler(pipeline, params, plan.spec)
    seeded = generators(batch.seeds)
    kwargs: dict[str, Any] = {
        "image": batch_input(batch),
        "strength": params.strength,
        "guidance_scale": params.guidance_scale,
        "num_inference_steps": params.steps,
        "generator": seeded,
    }
    if is_kandinsky(pipeline):
        if batch.images is None:
            raise StageError("Kandinsky 2.2 img2img takes images, not latents")
        if spec.prompt_syntax != "plain":
            raise StageError("prompt_syntax: compel works with SD 1.x and SDXL, not Kandinsky 2.2")
        # The decoder resizes its input to height x width, 512 unless told; keep the input's size.
        kwargs["width"], kwargs["height"] = batch.images[0].size
        kwargs |= image_embeddings(pipeline, batch, seeded)
        return call_pipeline(pipeline.decoder_pipe, kwargs, outputs)
    kwargs |= prompt_arguments(pipeline, batch.prompts, batch.negative_prompts, spec.prompt_syntax)
    kwargs |= sampling
    if plan.controlnet is not None:
        kwargs["control_image"] = control_input(pipeline, batch)
        kwargs["controlnet_conditioning_scale"] = spec.controlnet_conditioning_scale
    if spec.aesthetic_score is not None or spec.negative_aesthetic_score is not None:
        if not getattr(pipeline.config, "requires_aesthetics_score", False):
            raise StageError(
                f"aesthetic scores need the SDXL refiner; {model.name} is {type(pipeline).__name__}"
            )
        if spec.aesthetic_score is not None:
            kwargs["aesthetic_score"] = spec.aesthetic_score
        if spec.negative_aesthetic_score is not None:
            kwargs["negative_aesthetic_score"] = spec.negative_aesthetic_score
    # Last before the call: encoding draws each item's latent sample from its generator, the first use
    # the pipeline would make of it.
    encoded = init_latents(pipeline, batch, seeded)
    if encoded is not None:
        kwargs["image"] = encoded
    return call_pipeline(pipeline, kwargs, outputs)
