"""A worker's resident model: one checkpoint loaded once, and the pipelines derived from it.

Derived pipelines (text2img from an img2img checkpoint, ControlNet img2img with an attached
ControlNetModel) come from `from_pipe`, which shares the loaded components instead of loading
them again; attachments (a ControlNet, a depth estimator) are loaded on first use and kept.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForText2Image,
    ControlNetModel,
    DiffusionPipeline,
)
from diffusers.models.attention_processor import AttnProcessor

from schemas.errors import StageError
from schemas.registry import RESIZE_PIPELINE, UPSCALER_PIPELINES, ModelEntry, ResolvedModel

log = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(entry: ModelEntry, device: str) -> torch.dtype:
    dtype = getattr(torch, entry.dtype)
    if device == "cpu" and dtype != torch.float32:
        # Half precision on the CPU is slow or unsupported for many kernels; fp32 gives the same images.
        log.warning("model %s asks for %s; using float32 on the CPU", entry.source, entry.dtype)
        return torch.float32
    return dtype


def pipeline_class_of(entry: ModelEntry) -> str:
    """The class in the checkpoint's model_index.json (a hub id's is fetched, a folder's read)."""
    if entry.pipeline:
        return entry.pipeline
    config = DiffusionPipeline.load_config(entry.source)
    return str(config["_class_name"])


def load_pipeline(entry: ModelEntry) -> Any:
    """from_pretrained on a hub id or a local folder. Image-to-image checkpoints load through
    AutoPipelineForImage2Image, which maps text2img checkpoints (SD 1.5) to their img2img class;
    the upscalers, which it does not know, load as their own class."""
    device = resolve_device(entry.device)
    kwargs: dict[str, Any] = {"torch_dtype": resolve_dtype(entry, device)}
    if entry.variant:
        kwargs["variant"] = entry.variant
    loader = (
        DiffusionPipeline if pipeline_class_of(entry) in UPSCALER_PIPELINES else AutoPipelineForImage2Image
    )
    pipeline = loader.from_pretrained(entry.source, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return apply_speedups(pipeline, entry, device)


def apply_speedups(pipeline: Any, entry: ModelEntry, device: str) -> Any:
    """The registry's per-model options from the guide: attention, compile, offload, VAE slicing/tiling."""
    denoiser = getattr(pipeline, "unet", None)
    if entry.attention == "classic" and denoiser is not None:
        denoiser.set_attn_processor(AttnProcessor())
    vae = getattr(pipeline, "vae", None)
    if entry.vae_slicing and vae is not None:
        vae.enable_slicing()
    if entry.vae_tiling and vae is not None:
        vae.enable_tiling()
    if entry.cpu_offload and device.startswith("cuda"):
        # Moves each component to the GPU only while it runs; the pipeline itself must not be moved.
        pipeline.enable_model_cpu_offload(device=device)
    else:
        if entry.cpu_offload:
            log.warning("model %s: cpu_offload has no effect without a GPU", entry.source)
        pipeline.to(device)
    if entry.compile and denoiser is not None:
        pipeline.unet = torch.compile(denoiser)
    return pipeline


class LoadedModel:
    def __init__(self, name: str, entry: ModelEntry) -> None:
        self.name = name
        self.entry = entry
        self.device = resolve_device(entry.device)
        self.dtype = resolve_dtype(entry, self.device)
        # CPU stages (resize) have no pipeline to load.
        self.pipeline: Any = None if entry.pipeline == RESIZE_PIPELINE else load_pipeline(entry)
        self._derived: dict[str, Any] = {}

    @property
    def class_name(self) -> str:
        return type(self.pipeline).__name__

    @property
    def is_upscaler(self) -> bool:
        return self.class_name in UPSCALER_PIPELINES

    def _cached(self, key: str, build: Any) -> Any:
        if key not in self._derived:
            derived = build()
            derived.set_progress_bar_config(disable=True)
            self._derived[key] = derived
        return self._derived[key]

    def img2img(self, controlnet: ResolvedModel | None = None) -> Any:
        if self.is_upscaler:
            raise StageError(f"{self.name} is an upscaler ({self.class_name}); use it in an upscale stage")
        if controlnet is None:
            return self.pipeline
        return self._cached(
            f"controlnet:{controlnet.name}",
            lambda: AutoPipelineForImage2Image.from_pipe(
                self.pipeline, controlnet=self._controlnet(controlnet)
            ),
        )

    def text2img(self) -> Any:
        if self.is_upscaler:
            raise StageError(f"{self.name} is an upscaler ({self.class_name}); it cannot generate from text")
        return self._cached("text2img", lambda: AutoPipelineForText2Image.from_pipe(self.pipeline))

    def upscaler(self) -> Any:
        if not self.is_upscaler:
            raise StageError(
                f"{self.name} is {self.class_name}, not an upscaler ({', '.join(UPSCALER_PIPELINES)})"
            )
        return self.pipeline

    def _controlnet(self, model: ResolvedModel) -> Any:
        kwargs: dict[str, Any] = {"torch_dtype": self.dtype}
        if model.entry.variant:
            kwargs["variant"] = model.entry.variant
        log.info("loading controlnet %s for %s", model.name, self.name)
        return ControlNetModel.from_pretrained(model.entry.source, **kwargs).to(self.device)

    def depth_estimator(self, model: ResolvedModel) -> Any:
        key = f"depth:{model.name}"
        if key not in self._derived:
            from transformers import pipeline as transformers_pipeline

            log.info("loading depth estimator %s for %s", model.name, self.name)
            self._derived[key] = transformers_pipeline(
                "depth-estimation", model=model.entry.source, device=self.device, dtype=torch.float32
            )
        return self._derived[key]
