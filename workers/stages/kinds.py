"""The stage kinds, by the `type` a job's stage names: what each one is (Stage), and the one table the
engine runs a stage from, and the warm-up (workers/warmup.py) its dummy batches."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Protocol

from schemas.job import IMAGES, Outputs, ResolvedParams
from schemas.messages import StagePlan
from workers.models import LoadedModel
from workers.stages.common import StageBatch, StageOutput
from workers.stages.img2img import run_img2img
from workers.stages.resize import run_resize
from workers.stages.text2img import run_text2img
from workers.stages.upscale import run_upscale


class Stage(Protocol):
    """One stage kind: a batched call of the resident model on one
    batch of decoded inputs, all sharing `params`. It refuses what it cannot run with a StageError, and
    returns the images and latents asked for, a row per item in the batch's order."""

    def __call__(
        self,
        model: LoadedModel,
        plan: StagePlan,
        params: ResolvedParams,
        batch: StageBatch,
        outputs: Outputs = IMAGES,
    ) -> StageOutput: ...


STAGES: Mapping[str, Stage] = MappingProxyType(
    {"img2img": run_img2img, "text2img": run_text2img, "upscale": run_upscale, "resize": run_resize}
)
