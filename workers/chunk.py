"""Running one chunk: fetch and decode inputs, one batched stage call, write outputs, record results.

A bad item fails alone: its error is recorded and the others go on. Errors that may pass
(StorageError) propagate so the task can retry the chunk; items already finished are skipped then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
from PIL import Image

from schemas.errors import ImgjobsError, ItemError, StageError
from schemas.messages import Chunk, ChunkItem, ErrorInfo, ItemResult
from schemas.settings import Settings
from workers.imageio import encode_png, load_input
from workers.progress import JobProgress
from workers.stages.img2img import Img2ImgBatch, run_img2img, to_pil
from workers.storage import Storage, open_storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkContext:
    """What a worker process holds for the life of its model."""

    pipeline: Any
    model_name: str
    settings: Settings
    redis: redis.Redis
    open_storage: Callable[[str, str], Storage] = open_storage


def output_key(item_id: str, stage_index: int, stage_type: str) -> str:
    return f"{item_id}/s{stage_index}-{stage_type}.png"


def _result(
    chunk: Chunk,
    item: ChunkItem,
    timings: dict[str, float],
    outputs: dict[str, str] | None = None,
    error: ImgjobsError | None = None,
) -> ItemResult:
    return ItemResult(
        id=item.id,
        status="failed" if error else "succeeded",
        outputs=outputs or {},
        seed=item.seed,
        model=chunk.model,
        prompt=item.prompt,
        negative_prompt=item.negative_prompt,
        params=chunk.params,
        timings={k: round(v, 4) for k, v in timings.items()},
        error=ErrorInfo(type=type(error).__name__, message=str(error)) if error else None,
    )


def fail_items(chunk: Chunk, ctx: ChunkContext, error: ImgjobsError) -> None:
    """Record every unfinished item of the chunk as failed with error (retries are exhausted)."""
    progress = JobProgress(ctx.redis, chunk.job_id)
    finished_job = False
    for item in chunk.items:
        finished_job |= progress.finish(_result(chunk, item, {}, error=error))
    if finished_job:
        progress.write_results(ctx.open_storage(chunk.output, chunk.job_id))


def process_chunk(chunk: Chunk, ctx: ChunkContext) -> None:
    progress = JobProgress(ctx.redis, chunk.job_id)
    todo = set(progress.start(item.id for item in chunk.items))
    items = [item for item in chunk.items if item.id in todo]
    if len(items) < len(chunk.items):
        log.info(
            "chunk %s: %d item(s) already finished, skipped", chunk.chunk_id, len(chunk.items) - len(items)
        )
    if not items:
        return
    storage = ctx.open_storage(chunk.output, chunk.job_id)
    finished_job = False

    def record(result: ItemResult) -> None:
        # Recorded one by one, so a retry after a storage error redoes only what is unrecorded.
        nonlocal finished_job
        finished_job |= progress.finish(result)

    ready: list[tuple[ChunkItem, Image.Image, float]] = []
    for item in items:
        started = time.perf_counter()
        try:
            image = load_input(item.image, chunk.params.size, ctx.settings)
        except ItemError as exc:
            record(_result(chunk, item, {"fetch_s": time.perf_counter() - started}, error=exc))
            continue
        ready.append((item, image, time.perf_counter() - started))

    if ready:
        batch = Img2ImgBatch(
            images=[image for _, image, _ in ready],
            prompts=[item.prompt for item, _, _ in ready],
            negative_prompts=[item.negative_prompt for item, _, _ in ready],
            seeds=[item.seed for item, _, _ in ready],
            strength=chunk.params.strength,
            guidance_scale=chunk.params.guidance_scale,
            steps=chunk.params.steps,
        )
        started = time.perf_counter()
        outputs: np.ndarray | None = None
        stage_error: StageError | None = None
        try:
            outputs = run_img2img(ctx.pipeline, batch)
        except StageError as exc:
            stage_error = exc
        except (ValueError, TypeError, RuntimeError) as exc:
            # The pipeline refused these inputs; the message is diffusers' own.
            stage_error = StageError(f"{type(exc).__name__}: {exc}")
        infer_s = (time.perf_counter() - started) / len(ready)
        for index, (item, _image, fetch_s) in enumerate(ready):
            timings = {"fetch_s": fetch_s, "infer_s": infer_s}
            if outputs is None:
                record(_result(chunk, item, timings, error=stage_error))
                continue
            started = time.perf_counter()
            key = output_key(item.id, chunk.stage_index, chunk.stage_type)
            uri = storage.put(key, encode_png(to_pil(outputs[index])), "image/png")
            timings["write_s"] = time.perf_counter() - started
            record(_result(chunk, item, timings, outputs={f"s{chunk.stage_index}-{chunk.stage_type}": uri}))

    if finished_job:
        uri = progress.write_results(storage)
        log.info("job %s finished; results at %s", chunk.job_id, uri)
