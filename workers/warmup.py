"""A worker's model, loaded ready to work: the checkpoint (workers/models.py), then, where its entry
asks (`warmup`), dummy batches through the stage it serves, so that compilation happens before the
worker takes work. Compilations of the load and warm-up are reported as such (workers/compiles.py);
later ones come with the chunk that ran them."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path

from PIL import Image

from schemas.job import (
    BUILTIN_GUIDANCE_SCALE,
    BUILTIN_NOISE_LEVEL,
    BUILTIN_UPSCALE_GUIDANCE_SCALE,
    ResolvedParams,
)
from schemas.messages import StagePlan
from schemas.registry import ModelEntry, ResolvedModel
from workers.compiles import watch
from workers.models import LoadedModel
from workers.stages.common import StageBatch, run_static
from workers.stages.kinds import STAGES, Stage

log = logging.getLogger(__name__)

WARMUP_PROMPT = "warm-up"


def load_model(
    name: str, entry: ModelEntry, model_cache: Path | None = None, stages: Mapping[str, Stage] = STAGES
) -> LoadedModel:
    """The model loaded, and warmed up where its entry says so (its `warmup_s` then set)."""
    compiles = watch() if entry.compile or entry.compile_vae else None
    if compiles is not None:
        compiles.skip()
    model = LoadedModel(name, entry, model_cache)
    if entry.warmup and model.pipeline is not None:
        model.warmup_s = warm_up(model, stages)
    if compiles is not None:
        compiles.report(name, None)
    return model


def warm_up(model: LoadedModel, stages: Mapping[str, Stage] = STAGES) -> float:
    """Dummy batches through the stage this model serves (upscale for an upscaler, else img2img), at
    static_batch (else 1) items of warmup_size (else native_size), one at each of warmup_guidance
    (else the built-in guidance): chunks of those shapes then run compiled code. Returns the seconds."""
    entry = model.entry
    size = entry.warmup_size or model.native_size()
    count = entry.static_batch or 1
    kind = "upscale" if model.is_upscaler else "img2img"
    plan = StagePlan.model_validate(
        {
            "index": 0,
            "name": f"s0-{kind}",
            "spec": {"type": kind, "model": model.name},
            "model": ResolvedModel(name=model.name, entry=entry),
            "handover": "none",
            "save": ("image",),
        }
    )
    batch = StageBatch(
        prompts=[WARMUP_PROMPT] * count,
        negative_prompts=[WARMUP_PROMPT] * count,
        seeds=list(range(count)),
        images=[Image.new("RGB", size, (127, 127, 127)) for _ in range(count)],
    )
    builtin = BUILTIN_UPSCALE_GUIDANCE_SCALE if model.is_upscaler else BUILTIN_GUIDANCE_SCALE
    started = time.perf_counter()
    for guidance in entry.warmup_guidance or (builtin,):
        if model.is_upscaler:
            params = ResolvedParams(
                size=size, guidance_scale=guidance, steps=2, noise_level=BUILTIN_NOISE_LEVEL
            )
        else:
            params = ResolvedParams(size=size, guidance_scale=guidance, steps=4, strength=0.5)
        call = partial(stages[kind], model, plan, params)
        run_static(call, batch, entry.static_batch)
    seconds = time.perf_counter() - started
    log.info("model %s warmed up in %.1fs: batch %d at %dx%d", model.name, seconds, count, *size)
    return seconds
