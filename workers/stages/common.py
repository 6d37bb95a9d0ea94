"""What every stage takes and returns, and the shared way to call a pipeline for images, latents or both.

On a GPU a call returns before its last kernels have run: its outputs are copied to pinned host memory
without blocking (StageOutput.copying), so that the thread driving the GPU goes on to the next call
while the I/O threads wait for the copy and write. Whoever reads an output's arrays calls wait() first.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from schemas.errors import StageError
from schemas.job import Outputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageBatch:
    """Decoded inputs of one batched call; prompts are already templated. `pixels` and `control_pixels`,
    where given, are `images` and `control_images` as uint8 (3, height, width) tensors (pinned on a GPU
    host), made on the I/O threads that decoded them (workers.imageio.image_tensor); stages that hand the
    pipeline tensors take them from there, or convert the images themselves."""

    prompts: list[str]
    negative_prompts: list[str | None]
    seeds: list[int]
    images: list[Image.Image] | None = None
    latents: torch.Tensor | None = None
    control_images: list[Image.Image] | None = None
    pixels: list[torch.Tensor] | None = None
    control_pixels: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.seeds)


# The fields that hold one entry per row, as lists.
ROW_LISTS = ("prompts", "negative_prompts", "seeds", "images", "control_images", "pixels", "control_pixels")


@dataclass(frozen=True)
class StageOutput:
    images: np.ndarray | None = None  # (batch, height, width, 3): float in [0, 1], or uint8 from CPU stages
    latents: torch.Tensor | None = None  # (batch, channels, height, width), scaled as the pipeline uses them
    nsfw: list[bool] | None = None  # per row, where a safety checker ran: flagged (and made black)
    # Set while `images` and `latents` are still being copied from the GPU into their (pinned) host
    # memory: wait() before reading them.
    copying: torch.cuda.Event | None = None

    def wait(self) -> StageOutput:
        """This output once its copy to host memory has completed (at once where there is none)."""
        if self.copying is None:
            return self
        self.copying.synchronize()
        return replace(self, copying=None)


def check_batch(batch: StageBatch, *, needs_input: bool) -> None:
    count = len(batch)
    if count == 0:
        raise StageError("empty batch")
    if not len(batch.prompts) == len(batch.negative_prompts) == count:
        raise StageError("prompts, negative prompts and seeds differ in length")
    if needs_input and batch.images is None and batch.latents is None:
        raise StageError("this stage needs an input image or latents")
    if batch.images is not None:
        if len(batch.images) != count:
            raise StageError("images and seeds differ in length")
        if len({image.size for image in batch.images}) != 1:
            raise StageError("images in one batch must share a size")
    if batch.latents is not None and batch.latents.shape[0] != count:
        raise StageError("latents and seeds differ in length")
    for name in ("control_images", "pixels", "control_pixels"):
        rows = getattr(batch, name)
        if rows is not None and len(rows) != count:
            raise StageError(f"{name.replace('_', ' ')} and seeds differ in length")


T = TypeVar("T")


def _padded(values: list[T], extra: int) -> list[T]:
    return [*values, *[values[-1]] * extra]


def slice_batch(batch: StageBatch, start: int, stop: int) -> StageBatch:
    rows = {name: getattr(batch, name)[start:stop] for name in ROW_LISTS if getattr(batch, name) is not None}
    latents = batch.latents[start:stop] if batch.latents is not None else None
    return replace(batch, latents=latents, **rows)


def take_rows(batch: StageBatch, rows: list[int], seeds: list[int]) -> StageBatch:
    """The batch's rows `rows` (in that order), run with `seeds` instead of their own."""
    lists = {
        name: [getattr(batch, name)[row] for row in rows]
        for name in ROW_LISTS
        if name != "seeds" and getattr(batch, name) is not None
    }
    latents = batch.latents[rows] if batch.latents is not None else None
    return replace(batch, latents=latents, seeds=seeds, **lists)


def pad_batch(batch: StageBatch, size: int) -> StageBatch:
    """batch with copies of its last item appended up to `size` rows. Each row, a copy too, gets its own
    generator (see generators), so the real items draw exactly the noise they draw unpadded."""
    extra = size - len(batch)
    if extra <= 0:
        return batch
    latents = batch.latents
    if latents is not None:
        latents = torch.cat([latents, latents[-1:].expand(extra, *latents.shape[1:])])
    rows = {
        name: _padded(getattr(batch, name), extra) for name in ROW_LISTS if getattr(batch, name) is not None
    }
    return replace(batch, latents=latents, **rows)


def slice_output(output: StageOutput, count: int) -> StageOutput:
    """The first `count` rows: what the real items of a padded batch produced."""
    return replace(
        output,
        images=output.images[:count] if output.images is not None else None,
        latents=output.latents[:count] if output.latents is not None else None,
        nsfw=output.nsfw[:count] if output.nsfw is not None else None,
    )


def output_rows(output: StageOutput, rows: list[int]) -> StageOutput:
    """The rows `rows` of an output, in that order (the output itself when that is all of them)."""
    source = output.images if output.images is not None else output.latents
    count = 0 if source is None else len(source)
    if rows == list(range(count)):
        return output
    return StageOutput(
        images=output.images[rows] if output.images is not None else None,
        latents=output.latents[rows] if output.latents is not None else None,
        nsfw=[output.nsfw[row] for row in rows] if output.nsfw is not None else None,
    )


def concat_outputs(outputs: list[StageOutput]) -> StageOutput:
    if len(outputs) == 1:
        return outputs[0]
    # Joining reads the arrays: the pieces' copies must be done. Only a call run as several pieces (more
    # rows than static_batch, or halved after running out of memory) waits here, at its end.
    outputs = [output.wait() for output in outputs]
    images = [out.images for out in outputs if out.images is not None]
    latents = [out.latents for out in outputs if out.latents is not None]
    flags = [out.nsfw for out in outputs if out.nsfw is not None]
    return StageOutput(
        images=np.concatenate(images) if len(images) == len(outputs) else None,
        latents=torch.cat(latents) if len(latents) == len(outputs) else None,
        nsfw=[flag for piece in flags for flag in piece] if len(flags) == len(outputs) else None,
    )


def run_static(
    run: Callable[[StageBatch], StageOutput], batch: StageBatch, static_batch: int | None
) -> StageOutput:
    """run(batch), or, with static_batch, run on pieces of exactly static_batch rows (the last padded
    with copies of its last item), so compiled code sees one shape; the padded rows' outputs are dropped."""
    if not static_batch:
        return run(batch)
    outputs = []
    for start in range(0, len(batch), static_batch):
        piece = slice_batch(batch, start, start + static_batch)
        outputs.append(slice_output(run(pad_batch(piece, static_batch)), len(piece)))
    return concat_outputs(outputs)


@dataclass(frozen=True)
class SplitOutput:
    """What a call split on running out of memory made: the output of the rows that ran, in order,
    and the error of each row (by index in the call) that ran out of memory even alone."""

    output: StageOutput | None
    failed: dict[int, StageError]


def _free_accelerator_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_splitting(
    run: Callable[[StageBatch], StageOutput], batch: StageBatch, static_batch: int | None
) -> SplitOutput:
    """run_static, halving the batch each time it runs out of accelerator memory, down to one row;
    only a row that runs out of memory alone fails. With static_batch, each half runs padded to half
    of the size that failed (never back to static_batch, which would ask for the memory that was just
    missing): compiled code then meets one new shape per halving (static_batch / 2, / 4, ... 1), not
    one per remainder, and each new shape is a compilation inside the chunk."""
    try:
        return SplitOutput(run_static(run, batch, static_batch), {})
    except torch.OutOfMemoryError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
    # Only past the except block are the error's frames, and the tensors they hold, released.
    _free_accelerator_memory()
    if len(batch) == 1:
        if static_batch and static_batch > 1:
            return run_splitting(run, batch, None)  # padded, it was never tried alone
        return SplitOutput(None, {0: StageError(f"out of memory even in a batch of 1: {reason}")})
    half = (len(batch) + 1) // 2
    half_static = (static_batch + 1) // 2 if static_batch else None
    log.warning(
        "a batch of %d ran out of memory; running it as %d and %d", len(batch), half, len(batch) - half
    )
    pieces = [(0, run_splitting(run, slice_batch(batch, 0, half), half_static))]
    pieces.append((half, run_splitting(run, slice_batch(batch, half, len(batch)), half_static)))
    outputs = [piece.output for _, piece in pieces if piece.output is not None]
    failed = {start + row: error for start, piece in pieces for row, error in piece.failed.items()}
    return SplitOutput(concat_outputs(outputs) if outputs else None, failed)


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per item: diffusers draws each item's noise from its own generator, so an
    item's result does not depend on its batch, and CPU generators give the same numbers on any device."""
    return [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]


def batch_input(batch: StageBatch) -> Any:
    return batch.latents if batch.latents is not None else batch.images


def decode_latents(pipeline: Any, latents: torch.Tensor) -> np.ndarray:
    """What the pipeline's own output_type="np" would give for these latents (see decoded)."""
    images, flags = decoded(pipeline, latents)
    output = to_host(images, None, flags).wait()
    assert output.images is not None
    return output.images


def decoded(pipeline: Any, latents: torch.Tensor) -> tuple[torch.Tensor, list[bool] | None]:
    """What the pipeline's own output_type="pt" would give for these latents, on its device: decoded in
    float32 where the pipeline upcasts a float16 VAE that asks for it (SDXL's and the x4 upscaler's
    pipelines; SDXL's VAE overflows in float16), denormalized by the VAE's latents mean and std where it
    has them, watermarked where the pipeline watermarks, and through its safety checker where it has one
    (flagged images come back black, as from the pipeline), with the checker's flags."""
    vae = getattr(pipeline, "vae", None)
    if vae is None:
        raise StageError(f"{type(pipeline).__name__} has no VAE to decode latents with; save images instead")
    config = vae.config
    upcasts = hasattr(pipeline, "upcast_vae")  # the pipelines that check force_upcast have this
    upcast = upcasts and vae.dtype == torch.float16 and bool(getattr(config, "force_upcast", False))
    latents = latents.to(vae.device, torch.float32 if upcast else vae.dtype)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        channels = (1, -1, 1, 1)
        latents = latents * torch.tensor(std).view(channels).to(latents) / config.scaling_factor
        latents = latents + torch.tensor(mean).view(channels).to(latents)
    else:
        latents = latents / config.scaling_factor
    with torch.inference_mode():
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            images = vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        if getattr(pipeline, "watermark", None) is not None:
            images = pipeline.watermark.apply_watermark(images)
        flagged = None
        if getattr(pipeline, "safety_checker", None) is not None:
            # The x4 upscaler's checker returns a third value; the image and flags come first everywhere.
            checked = pipeline.run_safety_checker(images, vae.device, vae.dtype)  # the pipeline's dtype
            images, flagged = checked[0], checked[1]
        denormalize = None if flagged is None else [not nsfw for nsfw in flagged]
        images = pipeline.image_processor.postprocess(images, output_type="pt", do_denormalize=denormalize)
    return images, None if flagged is None else [bool(nsfw) for nsfw in flagged]


# Pipelines whose output_type="pt" images are output_type="np"'s before their copy to the host (both come
# from VaeImageProcessor.postprocess): the stage copies them itself, without blocking. Any other (Kandinsky
# 2.2's text2img decoder leaves its "pt" images in [-1, 1]) is asked for "np".
DEVICE_OUTPUT = frozenset(
    {
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionControlNetImg2ImgPipeline",
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "KandinskyV22Img2ImgPipeline",
        "StableDiffusionLatentUpscalePipeline",
        "StableDiffusionUpscalePipeline",
    }
)


def call_pipeline(pipeline: Any, kwargs: dict[str, Any], outputs: Outputs) -> StageOutput:
    with torch.inference_mode():
        if "latent" not in outputs:
            if type(pipeline).__name__ not in DEVICE_OUTPUT:
                result = pipeline(**kwargs, output_type="np")
                return StageOutput(images=result.images, nsfw=_flags(result))
            result = pipeline(**kwargs, output_type="pt")
            return to_host(result.images, None, _flags(result))
        latents = pipeline(**kwargs, output_type="latent").images
        if "image" not in outputs:
            return to_host(None, latents, None)
        images, flags = decoded(pipeline, latents)
        return to_host(images, latents, flags)


def to_host(
    images: torch.Tensor | None, latents: torch.Tensor | None, nsfw: list[bool] | None
) -> StageOutput:
    """A call's images ((batch, 3, height, width) in [0, 1]) and latents as a StageOutput in host memory,
    the images laid out as output_type="np" gives them (pt_to_numpy: channels last, float32). From a GPU
    they are copied into pinned memory without blocking, and the output's `copying` event says when they
    are there; elsewhere (the CPU) they are read at once."""
    if images is not None:
        images = images.permute(0, 2, 3, 1).float()
    on_gpu = [tensor for tensor in (images, latents) if tensor is not None and tensor.is_cuda]
    if not on_gpu:
        return StageOutput(
            images=images.cpu().numpy() if images is not None else None,
            latents=latents.cpu() if latents is not None else None,
            nsfw=nsfw,
        )
    host_images = _pinned_copy(images) if images is not None else None
    host_latents = _pinned_copy(latents) if latents is not None else None
    # blocking: a writer waiting on it sleeps instead of spinning a core the GPU's thread needs.
    copying = torch.cuda.Event(blocking=True)
    copying.record()
    return StageOutput(
        images=host_images.numpy() if host_images is not None else None,
        latents=host_latents,
        nsfw=nsfw,
        copying=copying,
    )


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """tensor copied, without blocking, into new pinned host memory: valid once the stream has run the copy.
    The caching host allocator keeps the block from being reused before then, even if it is dropped."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor.contiguous(), non_blocking=True)
    return host


def _flags(result: Any) -> list[bool] | None:
    """The safety checker's flags in a pipeline's output, where it ran (None where it has none)."""
    flags = getattr(result, "nsfw_content_detected", None)
    return None if flags is None else [bool(flag) for flag in flags]


def nonfinite_part(output: StageOutput, row: int) -> str | None:
    """What of `output`'s row holds NaN or infinity ("image", "latents"), or None where all is finite.
    Call it on the float output, before anything turns it into 8-bit pixels: to_pil (and diffusers'
    own conversion) would write NaN as 0, a black image that looks like a result."""
    images = output.images
    if images is not None and images.dtype != np.uint8 and not np.isfinite(images[row]).all():
        return "image"
    if output.latents is not None and not bool(torch.isfinite(output.latents[row]).all()):
        return "latents"
    return None


def to_pil(image: np.ndarray) -> Image.Image:
    """The same rounding diffusers applies for output_type="pil"; 8-bit images are taken as they are."""
    if image.dtype == np.uint8:
        return Image.fromarray(image)
    return Image.fromarray((image * 255).round().astype("uint8"))
