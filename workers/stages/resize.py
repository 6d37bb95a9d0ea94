"""resize: bring each input to the stage's size on the CPU, as its resize policy says (crop, fit or
pad; see schemas.job.ResizePolicy). The re-encoding (png, jpeg or webp) happens where outputs are
written."""

from __future__ import annotations

import numpy as np

from schemas.errors import StageError
from schemas.job import IMAGES, Outputs, ResolvedParams
from schemas.messages import StagePlan
from workers.imageio import fit_image
from workers.models import LoadedModel
from workers.stages.common import StageBatch, StageOutput, check_batch


def run_resize(
    model: LoadedModel, plan: StagePlan, params: ResolvedParams, batch: StageBatch, outputs: Outputs = IMAGES
) -> StageOutput:
    check_batch(batch, needs_input=True)
    if batch.images is None or "latent" in outputs:
        raise StageError("resize works on images only")
    fitted = [fit_image(image, params.size, params.resize) for image in batch.images]
    # 8-bit as decoded: to_pil() takes them as they are, with no round trip through floats.
    return StageOutput(images=np.stack([np.asarray(image) for image in fitted]))
