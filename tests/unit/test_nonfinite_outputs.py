"""An output that overflowed (NaN or infinity, as float16 on a GPU can give) fails its item with
NonFiniteOutputError instead of becoming a black PNG recorded as succeeded; the other items of its
call are written as usual, and the report counts the failure by its reason. The NaN is injected on
the CPU into the tiny SD model's VAE decoder (images) or UNet (latents), for one row of the batch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch

from jobs.embedded import EmbeddedRedis
from kits.helpers import local_model, stage_plan, write_image
from schemas.job import Defaults, Item
from tests.chunkkit import harness
from workers.models import LoadedModel
from workers.report import summarize
from workers.stages.common import StageOutput, nonfinite_part

IDS = "abc"
STAGE = {"type": "img2img", "strength": 0.5, "steps": 2, "guidance_scale": 7.5}


@contextmanager
def nan_in_row(module: torch.nn.Module, row: int, value: float = float("nan")) -> Iterator[None]:
    """`module`'s output gets `value` in one element of `row` (of the rows the batch holds; a CFG pair
    doubles the UNet's rows, uncond first: the conditional half is what reaches the output)."""

    def poison(_module: Any, _args: Any, output: Any) -> Any:
        tensor = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        rows = tensor.shape[0]
        target = row + rows // 2 if rows == 2 * len(IDS) else row
        tensor[target, 0, 0, 0] = value
        return output

    handle = module.register_forward_hook(poison)
    try:
        yield
    finally:
        handle.remove()


def items(tmp_path: Path) -> list[Item]:
    return [
        Item(id=item_id, image=str(write_image(tmp_path / "in" / f"{item_id}.png", (32, 32))), seed=index)
        for index, item_id in enumerate(IDS)
    ]


def test_which_part_is_not_finite() -> None:
    images: np.ndarray = np.zeros((2, 4, 4, 3), dtype=np.float32)
    latents = torch.zeros(2, 4, 2, 2)
    images[1, 3, 3, 2] = np.inf
    latents[0, 1, 1, 1] = float("nan")
    assert nonfinite_part(StageOutput(images=images), 0) is None
    assert nonfinite_part(StageOutput(images=images), 1) == "image"
    assert nonfinite_part(StageOutput(images=images, latents=latents), 0) == "latents"
    assert nonfinite_part(StageOutput(images=np.zeros((1, 2, 2, 3), dtype=np.uint8)), 0) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nan_decode_fails_its_item_and_the_report_counts_it(
    value: float, tiny_sd_dir: Path, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    model_ref = local_model("tiny-sd", tiny_sd_dir)
    loaded = LoadedModel("tiny-sd", model_ref.entry)
    job = harness(
        client,
        items(tmp_path),
        tmp_path / "out",
        recipe=[stage_plan(STAGE, model_ref)],
        model=loaded,
        defaults=Defaults(size=(32, 32)),
    )
    # An infinity inside the decoder spreads to NaN through the group norms after it, as an fp16
    # overflow does (a local infinity in the output itself would be clamped to 1 by diffusers).
    with nan_in_row(loaded.pipeline.vae.decoder.mid_block, 1, value):
        job.run_all()
    results = job.results()
    assert [results[item_id].status for item_id in IDS] == ["succeeded", "failed", "succeeded"]
    error = results["b"].error
    assert error is not None and error.type == "NonFiniteOutputError"
    assert "image came out NaN or infinite in float32" in error.message
    assert not results["b"].outputs and not (job.job_dir / "b").exists(), "nothing written for it"
    for item_id in "ac":
        assert (job.job_dir / item_id / "s0-img2img.png").is_file()
    assert job.store.status("job").failed == 1

    lines = (job.job_dir / "results.jsonl").read_text().splitlines()
    assert summarize(lines).reasons == {"NonFiniteOutputError": 1}
    report = (job.job_dir / "report.html").read_text()
    assert "NonFiniteOutputError" in report


def test_nan_latents_handed_to_the_next_stage_fail_the_item_there_and_then(
    tiny_sd_dir: Path, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """A stage that hands latents on writes nothing non-finite for the next stage to read."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    model_ref = local_model("tiny-sd", tiny_sd_dir)
    loaded = LoadedModel("tiny-sd", model_ref.entry)
    recipe = [
        stage_plan(STAGE, model_ref, index=0, handover="latent", save=()),
        stage_plan(STAGE, model_ref, index=1),
    ]
    job = harness(
        client,
        items(tmp_path),
        tmp_path / "out",
        recipe=recipe,
        model=loaded,
        defaults=Defaults(size=(32, 32)),
    )
    with nan_in_row(loaded.pipeline.unet, 2):
        job.run(job.chunks[0])
    job.run_all()
    results = job.results()
    assert [results[item_id].status for item_id in IDS] == ["succeeded", "succeeded", "failed"]
    error = results["c"].error
    assert error is not None and error.type == "NonFiniteOutputError" and "latents" in error.message
    assert results["c"].failed_stage == "s0-img2img"
    assert len(results["a"].stages) == 2
