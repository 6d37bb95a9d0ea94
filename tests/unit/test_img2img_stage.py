"""The img2img stage and the chunk runner on the tiny SD model, CPU, fp32: a batched stage call gives
each item what diffusers gives for that item alone with the same seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from jobs.embedded import EmbeddedRedis
from kits.helpers import ROUNDING_ATOL, local_model, stage_plan, write_image
from schemas.errors import StageError
from schemas.job import Defaults, Item, ResolvedParams
from tests.chunkkit import harness
from workers.models import LoadedModel
from workers.stages.common import StageBatch
from workers.stages.img2img import check_inputs, run_img2img

pytestmark = pytest.mark.slow

PARAMS = ResolvedParams(strength=0.8, guidance_scale=7.5, steps=10, size=(32, 32))


@pytest.fixture(scope="module")
def tiny_sd(tiny_sd_dir: Path) -> LoadedModel:
    return LoadedModel("tiny-sd", local_model("tiny-sd", tiny_sd_dir).entry)


def sample(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8"))


def test_batched_stage_equals_diffusers_called_per_item(tiny_sd: LoadedModel, tiny_sd_dir: Path) -> None:
    batch = StageBatch(
        images=[sample(1), sample(2), sample(3)],
        prompts=["a cat wizard", "astronaut in a jungle", ""],
        negative_prompts=["ugly", None, "blurry, low quality"],
        seeds=[7, 123, 2**40],
    )
    plan = stage_plan({"type": "img2img"}, local_model("tiny-sd", tiny_sd_dir))
    ours = run_img2img(tiny_sd, plan, PARAMS, batch).images
    assert ours is not None and ours.shape == (3, 32, 32, 3)

    direct = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd_dir, torch_dtype=torch.float32)
    direct.set_progress_bar_config(disable=True)
    for index in range(3):
        alone = direct(
            prompt=batch.prompts[index],
            image=batch.images[index],  # type: ignore[index]
            negative_prompt=batch.negative_prompts[index],
            strength=0.8,
            guidance_scale=7.5,
            num_inference_steps=10,
            generator=torch.Generator().manual_seed(batch.seeds[index]),
            output_type="np",
        ).images[0]
        # Batched convolutions sum in another order than single ones: equal up to float rounding.
        np.testing.assert_allclose(ours[index], alone, atol=ROUNDING_ATOL, rtol=0)
    # Different seeds and prompts really give different images, so the comparison above means something.
    assert np.abs(ours[0] - ours[1]).max() > 0.05


def test_latents_decode_to_the_pipelines_own_images(tiny_sd: LoadedModel, tiny_sd_dir: Path) -> None:
    batch = StageBatch(
        images=[sample(4), sample(5)], prompts=["a", "b"], negative_prompts=[None, None], seeds=[1, 2]
    )
    plan = stage_plan({"type": "img2img"}, local_model("tiny-sd", tiny_sd_dir))
    both = run_img2img(tiny_sd, plan, PARAMS, batch, frozenset({"image", "latent"}))
    images_only = run_img2img(tiny_sd, plan, PARAMS, batch)
    assert both.latents is not None and both.latents.shape == (2, 4, 16, 16)
    assert both.images is not None and images_only.images is not None
    np.testing.assert_allclose(both.images, images_only.images, atol=1e-6, rtol=0)


def test_check_inputs_fails_early(tiny_sd_dir: Path) -> None:
    plan = stage_plan({"type": "img2img"}, local_model("tiny-sd", tiny_sd_dir))
    one = StageBatch(images=[sample(1)], prompts=["a"], negative_prompts=[None], seeds=[1])
    with pytest.raises(StageError, match="differ in length"):
        check_inputs(
            plan,
            PARAMS,
            StageBatch(images=[sample(1), sample(2)], prompts=["a"], negative_prompts=[None], seeds=[1, 2]),
        )
    with pytest.raises(StageError, match="no denoising step"):
        check_inputs(plan, PARAMS.model_copy(update={"steps": 1, "strength": 0.5}), one)
    with pytest.raises(StageError, match="share a size"):
        two_sizes = [sample(1), Image.new("RGB", (64, 32))]
        check_inputs(
            plan,
            PARAMS,
            StageBatch(images=two_sizes, prompts=["a", "b"], negative_prompts=[None, None], seeds=[1, 2]),
        )
    with pytest.raises(StageError, match="needs an input"):
        check_inputs(plan, PARAMS, StageBatch(prompts=["a"], negative_prompts=[None], seeds=[1]))


def test_chunk_fails_bad_items_alone_and_skips_finished_ones_on_redelivery(
    tiny_sd: LoadedModel, tiny_sd_dir: Path, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    ids = ["good1", "missing", "corrupt", "good2"]
    write_image(tmp_path / "in" / "good1.png")
    write_image(tmp_path / "in" / "good2.png", color=(10, 200, 10))
    (tmp_path / "in" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows = [
        Item(id=item_id, image=str(tmp_path / "in" / f"{item_id}.png"), prompt="p", seed=seed)
        for seed, item_id in enumerate(ids)
    ]
    stage = {"type": "img2img", "strength": 0.5, "guidance_scale": 7.5, "steps": 4}
    job = harness(
        client,
        rows,
        tmp_path / "out",
        recipe=[stage_plan(stage, local_model("tiny-sd", tiny_sd_dir))],
        model=tiny_sd,
        defaults=Defaults(size=(32, 32)),
    )
    job.run_all()

    results = job.results()
    assert list(results) == ids and not job.sent
    assert results["good1"].status == results["good2"].status == "succeeded"
    missing, corrupt = results["missing"].error, results["corrupt"].error
    assert missing is not None and missing.type == "InputImageError" and "No such file" in missing.message
    assert corrupt is not None and corrupt.type == "InputImageError"
    assert results["corrupt"].failed_stage == "s0-img2img"
    output = Path(results["good1"].outputs["s0-img2img"])
    assert Image.open(output).size == (32, 32)
    assert (job.job_dir / "report.html").read_text().count('<section class="item') == 4

    written = output.stat().st_mtime_ns
    job.run(job.chunks[0])  # the broker delivers the same chunk again
    assert output.stat().st_mtime_ns == written
    status = job.store.status("job")
    assert (status.pending, status.running, status.succeeded, status.failed) == (0, 0, 2, 2)
