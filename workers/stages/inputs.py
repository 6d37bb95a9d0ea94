"""What an img2img stage hands the pipeline as its image: on the device, as diffusers would have made it.

diffusers turns PIL images into tensors on the thread that calls the pipeline (about 10-15 ms an image
at 512x512), and, given a list of generators, encodes them with the VAE one item at a time: a batch of
16 is 16 small encodes, each followed by a copy of its noise from the CPU that waits for the GPU. Here
the I/O threads make each image's uint8 tensor (workers.imageio.image_tensor), the device turns levels
into the pipeline's floats by a table lookup, and the VAE encodes the whole batch at once; each row's
latent sample is still drawn from its own generator (DiagonalGaussianDistribution.sample takes the list),
so every generator is left in the state the pipeline's per-item encode would leave it in, and the noise
the pipeline draws next is the same. The pipeline receives the latents, which it takes as they are
(prepare_latents: 4 channels are already latents), so it does not encode again.

Batched convolutions do not sum in the same order as single ones, so the latents, and the images, equal
the per-item ones up to float rounding (README, "Equal to diffusers"), not bit for bit. The lookup
itself is exact: its table is made by diffusers' own functions.

Where a pipeline does not fit, the stage passes it the PIL images: Kandinsky 2.2 (its decoder
encodes with its movq as one batch already, with no generator), the upscalers (the x4 UNet concatenates
image channels; the x2 encodes the batch at once already), an input the pipeline would resize or
convert, or an unknown pipeline class.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from PIL import Image

from workers.imageio import image_tensor
from workers.stages.common import StageBatch

# Pipelines whose prepare_latents encodes an image as Stable Diffusion's does: the image in the prompt
# embeddings' dtype, scaling_factor times a sample of the VAE's latent distribution.
SD_ENCODING = frozenset({"StableDiffusionImg2ImgPipeline", "StableDiffusionControlNetImg2ImgPipeline"})
# ... and as SDXL's does: the VAE in float32 where its config says force_upcast, the latents normalised by
# its latents_mean and latents_std where it has them.
SDXL_ENCODING = frozenset({"StableDiffusionXLImg2ImgPipeline"})
LATENT_CHANNELS = 4  # what prepare_latents takes as latents rather than as an image


@functools.cache
def _levels(normalize: bool) -> torch.Tensor:
    """The float32 value VaeImageProcessor.preprocess gives each 8-bit level (pil_to_numpy, numpy_to_pt,
    then normalize to [-1, 1] where asked), computed by those same functions."""
    # diffusers is imported where it is used: the workers of the cpu model (resize, jobs' ends) import
    # the stages but never a pipeline, and importing it costs seconds at each worker's start.
    from diffusers.image_processor import VaeImageProcessor

    ramp = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2))
    levels: torch.Tensor = VaeImageProcessor.numpy_to_pt(VaeImageProcessor.pil_to_numpy(ramp))[0, 0, 0]
    return VaeImageProcessor.normalize(levels) if normalize else levels  # type: ignore[return-value]


@functools.cache
def _levels_on(device: torch.device, dtype: torch.dtype, normalize: bool) -> torch.Tensor:
    return _levels(normalize).to(device=device, dtype=dtype)


def device_images(
    pixels: list[torch.Tensor], device: torch.device, dtype: torch.dtype, *, normalize: bool
) -> torch.Tensor:
    """The uint8 (3, height, width) images as one (batch, 3, height, width) tensor of `dtype` on `device`,
    with the values the pipeline's preprocessing gives (cast to dtype, as prepare_latents casts them).
    Pinned images are copied without blocking; the lookup runs on the device."""
    batch = torch.empty((len(pixels), *pixels[0].shape), dtype=torch.uint8, device=device)
    for row, image in enumerate(pixels):
        batch[row].copy_(image, non_blocking=True)
    # 32-bit indices: half the memory of the 64-bit ones plain indexing makes, and faster on the CPU.
    indices = batch.flatten().int()
    return _levels_on(device, dtype, normalize).index_select(0, indices).view(batch.shape)


def _fits(processor: Any, images: list[Image.Image], *, normalize: bool) -> bool:
    """Whether preprocess would do nothing to these images but convert and (where asked) normalize them:
    RGB, sides that are multiples of its scale factor (else it resizes), no binarizing or greyscale."""
    config = processor.config
    factor = config.vae_scale_factor
    return (
        bool(config.do_normalize) == normalize
        and not config.do_binarize
        and not config.do_convert_grayscale
        and all(image.mode == "RGB" for image in images)
        and all(image.width % factor == 0 and image.height % factor == 0 for image in images)
    )


def _pixels(images: list[Image.Image], pixels: list[torch.Tensor] | None) -> list[torch.Tensor]:
    return pixels if pixels is not None else [image_tensor(image) for image in images]


def _prompt_dtype(pipeline: Any, encoders: tuple[str, ...]) -> torch.dtype:
    """The dtype encode_prompt gives the prompt embeddings, which prepare_latents casts the image to."""
    for name in encoders:
        encoder = getattr(pipeline, name, None)
        if encoder is not None:
            return encoder.dtype  # type: ignore[no-any-return]
    return pipeline.unet.dtype  # type: ignore[no-any-return]


def init_latents(pipeline: Any, batch: StageBatch, generators: list[torch.Generator]) -> torch.Tensor | None:
    """The latents the pipeline's prepare_latents would make of batch.images, before it adds noise,
    encoded as one batch, each row's sample drawn from its generator; None where the pipeline must
    take the images itself (see the module's docstring)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    name = type(pipeline).__name__
    if name not in SD_ENCODING | SDXL_ENCODING or batch.images is None or batch.latents is not None:
        return None
    vae = pipeline.vae
    if vae.config.latent_channels != LATENT_CHANNELS or not _fits(
        pipeline.image_processor, batch.images, normalize=True
    ):
        return None
    device = pipeline._execution_device
    sdxl = name in SDXL_ENCODING
    dtype = _prompt_dtype(pipeline, ("text_encoder_2",) if sdxl else ("text_encoder",))
    with torch.inference_mode():
        image = device_images(_pixels(batch.images, batch.pixels), device, dtype, normalize=True)
        if not sdxl:
            return vae.config.scaling_factor * retrieve_latents(vae.encode(image), generator=generators)  # type: ignore[no-any-return]
        # StableDiffusionXLImg2ImgPipeline.prepare_latents, step by step.
        config = vae.config
        if config.force_upcast:
            image = image.float()
            vae.to(dtype=torch.float32)
        try:
            latents = retrieve_latents(vae.encode(image), generator=generators)
        finally:
            if config.force_upcast:
                vae.to(dtype)
        latents = latents.to(dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            latents_mean = torch.tensor(mean).view(1, 4, 1, 1).to(device=device, dtype=dtype)
            latents_std = torch.tensor(std).view(1, 4, 1, 1).to(device=device, dtype=dtype)
            return (latents - latents_mean) * config.scaling_factor / latents_std  # type: ignore[no-any-return]
        return config.scaling_factor * latents  # type: ignore[no-any-return]


def control_input(pipeline: Any, batch: StageBatch) -> torch.Tensor | list[Image.Image]:
    """The control images as the ControlNet pipeline's control_image: one float32 tensor in [0, 1] on its
    device, which its preprocessing takes as it is (the values its PIL path would give), or, where that
    would change them, the PIL images."""
    images = batch.control_images
    assert images is not None
    processor = getattr(pipeline, "control_image_processor", None)
    if processor is None or not _fits(processor, images, normalize=False):
        return images
    with torch.inference_mode():
        pixels = _pixels(images, batch.control_pixels)
        return device_images(pixels, pipeline._execution_device, torch.float32, normalize=False)


def encodes_in_batch(class_name: str) -> bool:
    """Whether img2img stages on a checkpoint of this pipeline class hand their images to the device as
    tensors and encode them here (ControlNet pipelines derive from Stable Diffusion's)."""
    return class_name in SD_ENCODING | SDXL_ENCODING
