"""Model registry entries: what a model name in a stage resolves to.

A `models.yaml` maps names to entries; the built-ins below name the checkpoints of the diffusers
image-to-image guide so `model: sd15` works wherever the hub is reachable.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.samplers import SamplerName, ScheduleName, choose

MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")  # \Z: $ allows a final newline
QUEUE_PREFIX = "imgjobs."
X2_LATENT_UPSCALER = "StableDiffusionLatentUpscalePipeline"
X4_UPSCALER = "StableDiffusionUpscalePipeline"
DEFAULT_MAX_BATCH = 8
DEFAULT_CHUNK_SIZE = 64
UPSCALER_PIPELINES = (X2_LATENT_UPSCALER, X4_UPSCALER)
S3_SCHEME = "s3://"
# A checkpoint in one file, as model-sharing sites publish them; diffusers' from_single_file loads it.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
WEIGHT_FILE_SUFFIXES = (*SINGLE_FILE_SUFFIXES, ".bin", ".pt", ".pth")
LORA_WEIGHT_LIMIT = 10.0
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes


def is_s3(source: str) -> bool:
    return source.startswith(S3_SCHEME)


def is_single_file(source: str) -> bool:
    return source.lower().endswith(SINGLE_FILE_SUFFIXES)


class LoraRef(BaseModel):
    """One LoRA adapter and the scale it runs at."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        min_length=1,
        description="a LoRA weights file or a folder holding one (relative to models.yaml in the registry), "
        "a hub id, or s3://bucket/key.safetensors (or s3://bucket/prefix/)",
    )
    weight: float = Field(
        1.0,
        ge=-LORA_WEIGHT_LIMIT,
        le=LORA_WEIGHT_LIMIT,
        description="the adapter's scale (set_adapters' adapter_weights); 0 turns it off",
    )
    weight_name: str | None = Field(
        None,
        description="the weights file to load where the source (a folder or a hub repository) holds "
        "several, e.g. Hyper-SD15-8steps-lora.safetensors",
    )

    @property
    def adapter_name(self) -> str:
        """The name it is loaded under: one per source (and file in it), so an adapter is loaded once
        whatever weights the stages give it."""
        named = self.source if self.weight_name is None else f"{self.source}\n{self.weight_name}"
        return "lora_" + hashlib.sha256(named.encode()).hexdigest()[:16]


def merged_loras(model: tuple[LoraRef, ...], stage: tuple[LoraRef, ...]) -> tuple[LoraRef, ...]:
    """A stage's adapters: the model's, then the stage's own; a stage's adapter of the same source as
    one of the model's sets that one's weight instead of adding it twice."""
    own = {lora.source: lora for lora in stage}
    kept = tuple(own.pop(lora.source, lora) for lora in model)
    return (*kept, *own.values())


def lora_weights_file(path: Path, weight_name: str | None = None) -> Path:
    """The weights file of a local LoRA source: the file itself, or in a folder the file named
    `weight_name`, else the file diffusers' save_lora_weights writes, else the folder's only
    .safetensors (or .bin) file. ValueError says why there is none."""
    if not path.is_dir():
        if not path.is_file():
            raise ValueError("no such file or folder")
        if weight_name is not None and weight_name != path.name:
            raise ValueError(f"weight_name {weight_name!r} is for a folder; this is the file {path.name}")
        return path
    if weight_name is not None:
        named = path / weight_name
        if Path(weight_name).name != weight_name or not named.is_file():
            raise ValueError(f"no file {weight_name!r} in the folder")
        return named
    if (path / LORA_WEIGHT_NAME).is_file():
        return path / LORA_WEIGHT_NAME
    for suffix in (".safetensors", ".bin"):
        found = sorted(child for child in path.glob(f"*{suffix}") if child.is_file())
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(child.name for child in found)
            raise ValueError(f"several {suffix} files ({names}); name the one to load")
    raise ValueError(f"no LoRA weights in the folder ({LORA_WEIGHT_NAME} or one .safetensors file)")


def takes_no_lora(pipeline: str | None) -> bool:
    """Pipelines without diffusers' LoRA loader: the x2 latent upscaler, Kandinsky, the CPU stages."""
    return pipeline in (X2_LATENT_UPSCALER, RESIZE_PIPELINE) or (pipeline or "").startswith("Kandinsky")


def s3_location(uri: str) -> tuple[str, str]:
    """(bucket, key) of an s3:// source: one object when its name has a weights suffix (a single-file
    checkpoint, a LoRA file), otherwise a prefix, which always ends in '/' so that `models/sd` never
    takes in `models/sd-style/`. ValueError if it names no bucket and key."""
    bucket, _, key = uri.removeprefix(S3_SCHEME).partition("/")
    if not bucket or not key.strip("/"):
        raise ValueError("an s3:// source needs a bucket and a key or prefix")
    if key.lower().endswith(WEIGHT_FILE_SUFFIXES):
        return bucket, key
    return bucket, key if key.endswith("/") else key + "/"


def duplicate_source(loras: tuple[LoraRef, ...]) -> str | None:
    seen: set[str] = set()
    for lora in loras:
        if lora.source in seen:
            return lora.source
        seen.add(lora.source)
    return None


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        min_length=1,
        description="hub id, local diffusers folder, single-file checkpoint (.safetensors or .ckpt) or "
        "s3://bucket/prefix/ (downloaded once into IMGJOBS_MODEL_CACHE)",
    )
    config: str | None = Field(
        None,
        description="single-file sources: the diffusers folder (or hub id, or s3:// prefix) whose configs, "
        "tokenizer and scheduler the checkpoint loads with; a local one needs no hub",
    )
    vae: str | None = Field(
        None,
        description="an AutoencoderKL (diffusers folder, hub id or s3:// prefix) that replaces the "
        "checkpoint's VAE; the latent family follows it",
    )
    safety_checker: bool = Field(
        True, description="false: load the checkpoint without its safety checker (nothing is flagged)"
    )
    loras: tuple[LoraRef, ...] = Field(
        (), description="LoRA adapters applied to every stage on this model; a stage may add its own"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="auto: bfloat16 on a GPU that has it (compute capability 8.0 and later), float16 on "
        "older GPUs, float32 on the CPU; half precision asked for on the CPU loads as float32",
    )
    variant: str | None = Field(None, description="weights variant on the hub, e.g. fp16")
    device: str = Field("auto", description="'auto' picks cuda when available, else cpu")
    vae_family: str | None = Field(None, description="models with equal families share a latent space")
    pipeline: str | None = Field(
        None, description="the checkpoint's pipeline class; read from model_index.json for local folders"
    )
    scheduler: str | None = Field(
        None, description="the checkpoint's scheduler class; read from model_index.json for local folders"
    )
    sampler: SamplerName | None = Field(
        None,
        description="the sampler every stage on this model runs unless the stage names its own or a "
        "preset (README, Samplers); default: the checkpoint's own scheduler",
    )
    schedule: ScheduleName | None = Field(
        None, description="the sampler's schedule: karras, exponential or trailing (sgm_uniform)"
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
    # Throughput on a GPU. All off by default, so CPU runs and tests are unaffected. The GPU
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
    warmup_guidance: tuple[float, ...] | None = Field(
        None,
        min_length=1,
        description="the guidance scales of the warm-up batches, one batch each; default: the stage's "
        "built-in (7.5; the x4 upscaler's 9). A scale of 1 or less runs without classifier-free guidance, "
        "which halves the denoiser's batch: another shape, compiled inside the first chunk that uses it "
        "unless warmed up here",
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
        if any(not 0 <= scale <= 100 for scale in self.warmup_guidance or ()):
            raise ValueError("warmup_guidance: each scale must be between 0 and 100")
        sides = self.warmup_size or ()
        if any(side % 8 or not 8 <= side <= 4096 for side in sides):
            raise ValueError("warmup_size: width and height must be multiples of 8 between 8 and 4096")
        if self.config is not None and not is_single_file(self.source):
            raise ValueError("config is for single-file sources (.safetensors or .ckpt)")
        if self.config is None and is_single_file(self.source):
            # Without it diffusers guesses the architecture and fetches its configs from the hub.
            raise ValueError(
                "a single-file source needs config: the diffusers folder or hub id of its pipeline"
            )
        if self.vae is not None and is_single_file(self.vae):
            raise ValueError("vae: a diffusers AutoencoderKL folder, hub id or s3:// prefix, not one file")
        if self.loras and self.fuse_qkv:
            # The fused projection replaces the q/k/v layers that the adapters are attached to.
            raise ValueError("fuse_qkv bypasses the q/k/v layers that LoRA adapters patch; leave one out")
        repeated = duplicate_source(self.loras)
        if repeated is not None:
            raise ValueError(f"loras: {repeated} is listed twice")
        if self.sampler is not None:
            choose(self.sampler, self.schedule)
        elif self.schedule is not None:
            raise ValueError("schedule: name the sampler it is for (sampler: dpmpp_2m, ...)")
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
# The class of scoring models (a stage's `score.model`): transformers' CLIPModel, text and image towers.
CLIP_MODEL = "CLIPModel"

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
    # The SD 1.5 checkpoints' classes, as their model_index.json says: a few-step preset picks its
    # adapter by the pipeline class, and --dry-run counts the scheduler's UNet evaluations.
    "sd15": ModelEntry(
        source="stable-diffusion-v1-5/stable-diffusion-v1-5",
        variant="fp16",
        vae_family="sd",
        pipeline="StableDiffusionPipeline",
        scheduler="PNDMScheduler",
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
        pipeline="StableDiffusionPipeline",
        description="style: 'charliebo artstyle'",
    ),
    "pixel-art-style": ModelEntry(
        source="kohbanye/pixel-art-style",
        vae_family="sd",
        pipeline="StableDiffusionPipeline",
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
    "clip-vit-large-patch14": ModelEntry(
        source="openai/clip-vit-large-patch14",
        pipeline=CLIP_MODEL,
        description="CLIP ViT-L/14 for a stage's score: (the CLIP score's usual model)",
    ),
}
