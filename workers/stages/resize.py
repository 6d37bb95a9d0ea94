"""resize: fit each input to the stage's size (center crop to the aspect ratio, then resize) on the
CPU. The re-encoding (png, jpeg or webp) happens where outputs are written."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from schemas.errors import StageError
from schemas.job import ResolvedParams
from schemas.messages import StagePlan
from workers.models import LoadedModel
from workers.stages.common import StageBatch, StageOutput, check_batch


def run_resize(
    model: LoadedModel,
    plan: StagePlan,
    params: ResolvedParams,
    batch: StageBatch,
    *,
    want_images: bool,
    want_latents: bool,
) -> StageOutput:
    check_batch(batch, needs_input=True)
    if batch.images is None or want_latents:
        raise StageError("resize works on images only")
    fitted = [
        image
        if image.size == params.size
        else ImageOps.fit(image, params.size, method=Image.Resampling.LANCZOS)
        for image in batch.images
    ]
    # Exact: to_pil() maps these floats back to the same 8-bit values.
    return StageOutput(images=np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in fitted]))
