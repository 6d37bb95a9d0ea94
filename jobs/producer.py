"""Submitting a validated job: register it in Redis, plan chunks, send them to the model queues."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from jobs.broker import connect_redis, producer_app
from jobs.manifest import ValidatedJob, iter_items
from schemas import keys
from schemas.job import (
    IMAGE_URI_SCHEMES,
    ResolvedParams,
    resolve_negative_prompt,
    resolve_prompt,
    resolve_seed,
)
from schemas.messages import RUN_CHUNK_TASK, Chunk, ChunkItem
from schemas.progress import ItemState
from schemas.settings import Settings

REGISTER_BATCH = 1000


@dataclass(frozen=True)
class Submission:
    job_id: str
    total: int
    chunks: int
    already_submitted: bool


def _absolute_image(uri: str, items_dir: Path) -> str:
    if uri.startswith(IMAGE_URI_SCHEMES):
        return uri
    path = Path(uri).expanduser()
    return str(path if path.is_absolute() else (items_dir / path).resolve())


def plan_chunks(job: ValidatedJob, chunk_size: int) -> Iterator[Chunk]:
    """Chunks of up to chunk_size items that share parameters, in manifest order within a group."""
    stage = job.spec.stages[0]
    open_chunks: dict[ResolvedParams, list[ChunkItem]] = {}
    count = 0

    def emit(params: ResolvedParams, members: list[ChunkItem]) -> Chunk:
        nonlocal count
        chunk = Chunk(
            job_id=job.job_id,
            chunk_id=f"{job.job_id}:s0:c{count}",
            output=job.output,
            stage_index=0,
            stage_type=stage.type,
            model=job.models[0].name,
            params=params,
            items=members,
        )
        count += 1
        return chunk

    for item, params in iter_items(job):
        members = open_chunks.setdefault(params, [])
        members.append(
            ChunkItem(
                id=item.id,
                image=_absolute_image(item.image, job.items_path.parent),
                prompt=resolve_prompt(item, job.spec.defaults),
                negative_prompt=resolve_negative_prompt(item, stage, job.spec.defaults),
                seed=resolve_seed(item, job.spec.defaults),
            )
        )
        if len(members) >= chunk_size:
            yield emit(params, open_chunks.pop(params))
    for params, members in open_chunks.items():
        yield emit(params, members)


def _register(client: redis.Redis, job: ValidatedJob) -> bool:
    """Record the job and every item as pending; False when the job id is already known."""
    if not client.sadd(keys.JOBS, job.job_id):
        return False
    client.hset(
        keys.job_meta(job.job_id),
        mapping={
            "name": job.spec.name,
            "output": job.output,
            "total": job.total,
            "spec": job.spec.model_dump_json(),
            "submitted_at": time.time(),
        },
    )
    client.hset(keys.job_counts(job.job_id), mapping={state.value: 0 for state in ItemState})
    pipe = client.pipeline(transaction=False)
    batch = 0
    for item, _params in iter_items(job):
        pipe.hset(keys.job_items(job.job_id), item.id, ItemState.PENDING.value)
        pipe.rpush(keys.job_order(job.job_id), item.id)
        batch += 1
        if batch >= REGISTER_BATCH:
            pipe.execute()
            batch = 0
    pipe.hincrby(keys.job_counts(job.job_id), ItemState.PENDING.value, job.total)
    pipe.execute()
    return True


def submit(job: ValidatedJob, settings: Settings, broker_url: str) -> Submission:
    client = connect_redis(broker_url)
    if not _register(client, job):
        # Same spec and items give the same id; resuming a partial submission is issue 4's work.
        return Submission(job.job_id, job.total, 0, already_submitted=True)
    app = producer_app(settings, broker_url)
    chunks = 0
    with app.producer_or_acquire() as producer:
        for chunk in plan_chunks(job, settings.chunk_size):
            app.send_task(
                RUN_CHUNK_TASK,
                args=[chunk.model_dump(mode="json")],
                task_id=chunk.chunk_id,
                queue=job.models[chunk.stage_index].queue,
                producer=producer,
            )
            chunks += 1
    return Submission(job.job_id, job.total, chunks, already_submitted=False)
