"""Loading real-world checkpoints on the tiny SD model (CPU, fp32): a single-file checkpoint written
from the tiny diffusers weights gives what those weights give through from_pretrained, and what
diffusers' from_single_file gives; a custom VAE gives what diffusers gives with that VAE passed in;
`safety_checker: false` leaves the checker out, where the checkpoint's own flags every image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline

from kits.helpers import local_model, stage_plan
from schemas.registry import ResolvedModel
from tests.img2imgkit import ATOL, run_direct, run_ours
from workers.models import LoadedModel
from workers.stages.common import StageOutput
from workers.tiny_models import write_tiny_sd_with_safety_checker, write_tiny_single_file, write_tiny_vae

pytestmark = pytest.mark.slow


def run(model: ResolvedModel) -> StageOutput:
    return run_ours(LoadedModel(model.name, model.entry), stage_plan({"type": "img2img"}, model))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_single_file_checkpoint_gives_what_its_diffusers_folder_gives(
    tiny_sd_dir: Path, tmp_path: Path, suffix: str
) -> None:
    checkpoint = write_tiny_single_file(tiny_sd_dir, tmp_path / f"tiny-sd{suffix}")
    single = run(local_model("single", checkpoint, config=str(tiny_sd_dir))).images
    folder = run(local_model("folder", tiny_sd_dir)).images
    assert single is not None and folder is not None
    np.testing.assert_array_equal(single, folder)  # the same weights, so the same numbers
    reference = StableDiffusionImg2ImgPipeline.from_single_file(
        str(checkpoint), config=str(tiny_sd_dir), torch_dtype=torch.float32
    )
    np.testing.assert_allclose(single, run_direct(reference), atol=ATOL, rtol=0)


def test_a_custom_vae_gives_what_diffusers_gives_with_that_vae(tiny_sd_dir: Path, tmp_path: Path) -> None:
    vae_folder = write_tiny_vae(tmp_path / "tiny-vae")
    ours = run(local_model("own-vae", tiny_sd_dir, vae=str(vae_folder))).images
    plain = run(local_model("plain", tiny_sd_dir)).images
    assert ours is not None and plain is not None
    assert np.abs(ours - plain).max() > 1e-2, "the VAE must change the images for this to mean much"
    vae = AutoencoderKL.from_pretrained(vae_folder, torch_dtype=torch.float32)
    reference = StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_sd_dir, vae=vae, torch_dtype=torch.float32
    )
    np.testing.assert_allclose(ours, run_direct(reference), atol=ATOL, rtol=0)
    # A pipeline folder names its VAE by its vae/ subfolder.
    from_folder = run(local_model("folder-vae", tiny_sd_dir, vae=str(tiny_sd_dir))).images
    np.testing.assert_array_equal(from_folder, plain)


def test_safety_checker_false_leaves_out_a_checker_that_flags_everything(tmp_path: Path) -> None:
    folder = write_tiny_sd_with_safety_checker(tmp_path / "checked")
    checked = run(local_model("checked", folder))
    assert checked.nsfw == [True, True] and checked.images is not None and checked.images.max() == 0.0
    unchecked = run(local_model("unchecked", folder, safety_checker=False))
    assert unchecked.nsfw is None and unchecked.images is not None and unchecked.images.max() > 0.1
    reference = StableDiffusionImg2ImgPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    np.testing.assert_allclose(unchecked.images, run_direct(reference), atol=ATOL, rtol=0)
    # Loading without it does not even load its weights.
    entry = local_model("unchecked", folder, safety_checker=False).entry
    assert LoadedModel("unchecked", entry).pipeline.safety_checker is None
