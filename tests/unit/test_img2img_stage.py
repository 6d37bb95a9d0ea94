"""The img2img stage and the chunk runner on the tiny model, CPU, fp32: a batched stage call gives
each item what diffusers gives for that item alone with the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from jobs.embedded import EmbeddedRedis
from schemas import keys
from schemas.errors import StageError
from schemas.job import ResolvedParams
from schemas.messages import Chunk, ChunkItem
from schemas.registry import ModelEntry
from schemas.settings import Settings
from tests.helpers import write_image
from workers.chunk import ChunkContext, process_chunk
from workers.models import load_pipeline
from workers.stages.img2img import Img2ImgBatch, check_inputs, run_img2img

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tiny_sd_dir: Path) -> object:
    return load_pipeline(ModelEntry(source=str(tiny_sd_dir), dtype="float32"))


def sample(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8"))


def test_batched_stage_equals_diffusers_called_per_item(pipeline: object, tiny_sd_dir: Path) -> None:
    batch = Img2ImgBatch(
        images=[sample(1), sample(2), sample(3)],
        prompts=["a cat wizard", "astronaut in a jungle", ""],
        negative_prompts=["ugly", None, "blurry, low quality"],
        seeds=[7, 123, 2**40],
        strength=0.8,
        guidance_scale=7.5,
        steps=10,
    )
    ours = run_img2img(pipeline, batch)
    assert ours.shape == (3, 32, 32, 3)

    direct = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd_dir, torch_dtype=torch.float32)
    direct.set_progress_bar_config(disable=True)
    for index in range(3):
        alone = direct(
            prompt=batch.prompts[index],
            image=batch.images[index],
            negative_prompt=batch.negative_prompts[index],
            strength=0.8,
            guidance_scale=7.5,
            num_inference_steps=10,
            generator=torch.Generator().manual_seed(batch.seeds[index]),
            output_type="np",
        ).images[0]
        # Batched convolutions sum in another order than single ones: equal up to float rounding.
        np.testing.assert_allclose(ours[index], alone, atol=1e-5, rtol=0)
    # Different seeds and prompts really give different images, so the comparison above means something.
    assert np.abs(ours[0] - ours[1]).max() > 0.05


def test_check_inputs_fails_early() -> None:
    base = dict(prompts=["a"], negative_prompts=[None], seeds=[1], strength=0.5, guidance_scale=7.5, steps=10)
    with pytest.raises(StageError, match="differ in length"):
        check_inputs(Img2ImgBatch(images=[sample(1), sample(2)], **base))  # type: ignore[arg-type]
    with pytest.raises(StageError, match="no denoising step"):
        check_inputs(Img2ImgBatch(images=[sample(1)], **(base | {"steps": 1})))  # type: ignore[arg-type]
    with pytest.raises(StageError, match="share a size"):
        check_inputs(
            Img2ImgBatch(
                images=[sample(1), Image.new("RGB", (64, 32))],
                prompts=["a", "b"],
                negative_prompts=[None, None],
                seeds=[1, 2],
                strength=0.5,
                guidance_scale=7.5,
                steps=10,
            )
        )


def test_chunk_fails_bad_items_alone_and_skips_finished_ones_on_redelivery(
    pipeline: object, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    ids = ["good1", "missing", "corrupt", "good2"]
    client.hset(keys.job_meta("job"), mapping={"name": "job", "output": str(tmp_path / "out"), "total": 4})
    client.hset(keys.job_counts("job"), mapping={"pending": 4, "running": 0, "succeeded": 0, "failed": 0})
    client.hset(keys.job_items("job"), mapping=dict.fromkeys(ids, "pending"))
    client.rpush(keys.job_order("job"), *ids)
    write_image(tmp_path / "in" / "good1.png")
    write_image(tmp_path / "in" / "good2.png", color=(10, 200, 10))
    (tmp_path / "in" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    chunk = Chunk(
        job_id="job",
        chunk_id="job:s0:c0",
        output=str(tmp_path / "out"),
        stage_index=0,
        stage_type="img2img",
        model="tiny-sd",
        params=ResolvedParams(strength=0.5, guidance_scale=7.5, steps=4, size=(32, 32)),
        items=[
            ChunkItem(id=i, image=str(tmp_path / "in" / f"{i}.png"), prompt="p", negative_prompt=None, seed=n)
            for n, i in enumerate(ids)
        ],
    )
    ctx = ChunkContext(pipeline=pipeline, model_name="tiny-sd", settings=Settings(), redis=client)
    process_chunk(chunk, ctx)

    results = {
        r["id"]: r
        for r in map(json.loads, (tmp_path / "out" / "job" / "results.jsonl").read_text().splitlines())
    }
    assert list(results) == ids
    assert results["good1"]["status"] == results["good2"]["status"] == "succeeded"
    assert results["missing"]["error"]["type"] == "InputImageError"
    assert "No such file" in results["missing"]["error"]["message"]
    assert results["corrupt"]["error"]["type"] == "InputImageError"
    output = Path(results["good1"]["outputs"]["s0-img2img"])
    assert Image.open(output).size == (32, 32)

    written = output.stat().st_mtime_ns
    process_chunk(chunk, ctx)  # the broker delivers the same chunk again
    assert output.stat().st_mtime_ns == written
    assert client.hgetall(keys.job_counts("job")) == {
        "pending": "0",
        "running": "0",
        "succeeded": "2",
        "failed": "2",
    }
