"""Model registry entries: what a model name in a stage resolves to.

A `models.yaml` maps names to entries; the built-ins below name the checkpoints of the diffusers
image-to-image guide so `model: sd15` works wherever the hub is reachable.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")  # \Z: $ allows a final newline
QUEUE_PREFIX = "imgjobs."
X2_LATENT_UPSCALER = "StableDiffusionLatentUpscalePipeline"
X4_UPSCALER = "StableDiffusionUpscalePipeline"
DEFAULT_MAX_BATCH = 8
DEFAULT_CHUNK_SIZE = 64
UPSCALER_PIPELINES = (X2_LATENT_UPSCALER, X4_UPSCALER)


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1, description="hub id or local diffusers folder")
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    variant: str | None = Field(None, description="weights variant on the hub, e.g. fp16")
    device: str = Field("auto", description="'auto' picks cuda when available, else cpu")
    vae_family: str | None = Field(None, description="models with equal families share a latent space")
    pipeline: str | None = Field(
        None, description="the checkpoint's pipeline class; read from model_index.json for local folders"
    )
    description: str = ""
    # The guide's speed-ups, per model.
    attention: Literal["sdpa", "classic"] = Field(
        "sdpa", description="sdpa: PyTorch's scaled-dot-product attention (diffusers' default on torch 2)"
    )
    compile: bool = Field(
        False, description="torch.compile the denoiser at load (slow first call, faster after)"
    )
    cpu_offload: bool = Field(
        False, description="enable_model_cpu_offload: for GPUs too small to hold the model"
    )
    vae_slicing: bool = Field(False, description="decode a batch one image at a time: less memory")
    vae_tiling: bool = Field(False, description="decode large images in tiles: less memory")
    # Throughput on a GPU (issue 6). All off by default, so CPU runs and tests are unaffected. The GPU
    # recipe: dtype bfloat16, channels_last, fuse_qkv, compile, compile_vae, static_batch (16 for SD 1.5
    # at 512 on an H100/H200) and warmup. Compiled code is cached on disk (IMGJOBS_COMPILE_CACHE_DIR).
    channels_last: bool = Field(
        False, description="channels-last memory format for the denoiser and the VAE (faster convolutions)"
    )
    fuse_qkv: bool = Field(
        False, description="fuse the attention q/k/v projections into one matmul (needs attention: sdpa)"
    )
    compile_vae: bool = Field(False, description="torch.compile the VAE's encoder and decoder at load")
    chunk_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description=f"items per Celery task for stages on this model (default {DEFAULT_CHUNK_SIZE}); "
        "a job takes the smallest among its stages' models; IMGJOBS_CHUNK_SIZE, when set, overrides it",
    )
    max_batch: int | None = Field(
        None,
        ge=1,
        le=256,
        description=f"most items in one pipeline call (default {DEFAULT_MAX_BATCH}); a chunk of more "
        "items runs as several calls, overlapped with fetching the next call's inputs and writing the "
        "last call's outputs",
    )
    static_batch: int | None = Field(
        None,
        ge=1,
        le=256,
        description="run every pipeline call at exactly this batch size (it then takes the place of "
        "max_batch): a partial batch is padded (the padded rows are dropped), so compiled code sees "
        "one shape",
    )
    warmup: bool = Field(
        False, description="run one dummy batch at load, so compilation happens before the worker takes work"
    )
    warmup_size: tuple[int, int] | None = Field(
        None,
        description="(width, height) of the warm-up inputs; default: the model's native size "
        "(the denoiser's sample size times the VAE's scale factor; the x4 upscaler's input size)",
    )
    on_nsfw: Literal["keep", "fail"] = Field(
        "keep",
        description="an item the safety checker flags: keep its (black) output, flagged in results "
        "and report, or fail it with NsfwFlaggedError",
    )

    @model_validator(mode="after")
    def _check_speedups(self) -> ModelEntry:
        if self.fuse_qkv and self.attention == "classic":
            raise ValueError("fuse_qkv uses SDPA's fused attention; it cannot go with attention: classic")
        if self.static_batch and self.max_batch is not None and self.max_batch != self.static_batch:
            raise ValueError("static_batch sets the batch size; leave max_batch out or make them equal")
        sides = self.warmup_size or ()
        if any(side % 8 or not 8 <= side <= 4096 for side in sides):
            raise ValueError("warmup_size: width and height must be multiples of 8 between 8 and 4096")
        return self

    @property
    def batch_size(self) -> int:
        """Items per pipeline call."""
        return self.static_batch or self.max_batch or DEFAULT_MAX_BATCH

    @property
    def items_per_chunk(self) -> int:
        return self.chunk_size or DEFAULT_CHUNK_SIZE


class RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: dict[str, ModelEntry] = Field(default_factory=dict)


class ResolvedModel(BaseModel):
    """A registry name or a folder, resolved: what a worker needs to load it and where its queue is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    entry: ModelEntry

    @property
    def queue(self) -> str:
        return queue_for(self.name)


def queue_for(model_name: str) -> str:
    if MODEL_NAME_PATTERN.match(model_name):
        return QUEUE_PREFIX + model_name
    # A stage may name a folder directly; its queue name must still be a short, safe string.
    digest = hashlib.sha256(model_name.encode()).hexdigest()[:12]
    tail = re.sub(r"[^A-Za-z0-9._-]", "-", model_name.rstrip("/").rsplit("/", 1)[-1])[:40] or "model"
    return f"{QUEUE_PREFIX}{tail}-{digest}"


RESIZE_PIPELINE = "resize"

BUILTIN_MODELS: dict[str, ModelEntry] = {
    "cpu": ModelEntry(
        source="imgjobs:cpu",
        pipeline=RESIZE_PIPELINE,
        dtype="float32",
        # A resize of a small image costs well under a millisecond, so each chunk carries Celery's
        # per-task costs (a few milliseconds) for many items: 1024 is about a second's work. A call's
        # inputs and outputs are all in memory at once, so calls stay at 64 items (0.8 GB at 2048²);
        # its own cost, one Redis round trip, is small at 64 already (256 measured no faster).
        max_batch=64,
        chunk_size=1024,
        description="CPU stages (resize); no model",
    ),
    "sd15": ModelEntry(
        source="stable-diffusion-v1-5/stable-diffusion-v1-5",
        variant="fp16",
        vae_family="sd",
        description="Stable Diffusion 1.5 img2img",
    ),
    "sdxl-refiner": ModelEntry(
        source="stabilityai/stable-diffusion-xl-refiner-1.0",
        variant="fp16",
        vae_family="sdxl",
        description="SDXL refiner img2img",
    ),
    "kandinsky22": ModelEntry(
        source="kandinsky-community/kandinsky-2-2-decoder",
        description="Kandinsky 2.2 img2img",
    ),
    "comic-diffusion": ModelEntry(
        source="ogkalu/Comic-Diffusion",
        vae_family="sd",
        description="style: 'charliebo artstyle'",
    ),
    "pixel-art-style": ModelEntry(
        source="kohbanye/pixel-art-style",
        vae_family="sd",
        description="style: 'pixelartstyle'",
    ),
    "sd-x2-latent-upscaler": ModelEntry(
        source="stabilityai/sd-x2-latent-upscaler",
        vae_family="sd",
        description="x2 latent upscaler",
    ),
    "controlnet-depth": ModelEntry(
        source="lllyasviel/control_v11f1p_sd15_depth",
        description="ControlNet (depth) for SD 1.5",
    ),
    "depth-anything": ModelEntry(
        source="depth-anything/Depth-Anything-V2-Small-hf",
        dtype="float32",
        description="depth estimation for control: depth",
    ),
    "sd-x4-upscaler": ModelEntry(
        source="stabilityai/stable-diffusion-x4-upscaler",
        description="x4 upscaler",
    ),
}
