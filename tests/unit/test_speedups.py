"""The guide's speed-ups as per-model registry options: each keeps the images diffusers gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kits.helpers import ROUNDING_ATOL, local_model, stage_plan
from schemas.job import ResolvedParams
from workers.models import LoadedModel
from workers.stages.common import StageBatch
from workers.stages.img2img import run_img2img

pytestmark = pytest.mark.slow

PARAMS = ResolvedParams(strength=0.8, guidance_scale=7.5, steps=4, size=(32, 32))


def outputs(tiny_sd_dir: Path, **options: object) -> np.ndarray:
    resolved = local_model("tiny-sd", tiny_sd_dir, **options)
    model = LoadedModel("tiny-sd", resolved.entry)
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")) for _ in range(2)]
    batch = StageBatch(prompts=["a", "b"], negative_prompts=[None, "x"], seeds=[1, 2], images=images)
    result = run_img2img(model, stage_plan({"type": "img2img"}, resolved), PARAMS, batch).images
    assert result is not None
    return result


def test_memory_options_and_classic_attention_keep_the_images(tiny_sd_dir: Path) -> None:
    reference = outputs(tiny_sd_dir)
    changed = outputs(tiny_sd_dir, vae_slicing=True, vae_tiling=True, attention="classic", cpu_offload=True)
    # vae_slicing decodes one image at a time: another batch shape, equal up to float rounding.
    np.testing.assert_allclose(changed, reference, atol=ROUNDING_ATOL, rtol=0)


def test_compiled_unet_keeps_the_images(tiny_sd_dir: Path) -> None:
    reference = outputs(tiny_sd_dir)
    # Inductor fuses kernels, so sums run in another order: equal up to float rounding.
    np.testing.assert_allclose(outputs(tiny_sd_dir, compile=True), reference, atol=1e-4, rtol=0)


def test_options_are_applied(tiny_sd_dir: Path) -> None:
    entry = local_model("tiny-sd", tiny_sd_dir, vae_slicing=True, vae_tiling=True, compile=True).entry
    pipeline = LoadedModel("tiny-sd", entry).pipeline
    assert pipeline.vae.use_slicing and pipeline.vae.use_tiling
    assert type(pipeline.unet).__name__ == "OptimizedModule"
