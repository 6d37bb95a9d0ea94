"""Loading a registry entry into a resident diffusers pipeline."""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import AutoPipelineForImage2Image

from schemas.registry import ModelEntry

log = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(entry: ModelEntry) -> Any:
    """from_pretrained on a hub id or a local folder; the checkpoint's model_index.json picks the class."""
    device = resolve_device(entry.device)
    dtype = getattr(torch, entry.dtype)
    if device == "cpu" and dtype != torch.float32:
        # Half precision on the CPU is slow or unsupported for many kernels; fp32 gives the same images.
        log.warning("model %s asks for %s; using float32 on the CPU", entry.source, entry.dtype)
        dtype = torch.float32
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if entry.variant:
        kwargs["variant"] = entry.variant
    pipeline = AutoPipelineForImage2Image.from_pretrained(entry.source, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    # diffusers uses PyTorch's scaled-dot-product attention by default on torch 2: nothing to enable.
    return pipeline.to(device)
