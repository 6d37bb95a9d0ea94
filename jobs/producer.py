"""Submitting a validated job: register it in Redis, plan chunks, send them to the model queues."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import redis
from celery import Celery

from jobs.broker import connect_redis, producer_app
from jobs.manifest import ValidatedJob, iter_items
from schemas import keys
from schemas.job import (
    IMAGE_URI_SCHEMES,
    Item,
    ResolvedParams,
)
from schemas.messages import RUN_CHUNK_TASK, Chunk, ChunkItem, StageInput
from schemas.progress import ItemState
from schemas.settings import Settings

REGISTER_BATCH = 1000


@dataclass(frozen=True)
class Submission:
    job_id: str
    total: int
    chunks: int
    already_submitted: bool
    resumed: bool = False


def _absolute(uri: str | None, items_dir: Path) -> str | None:
    if uri is None or uri.startswith(IMAGE_URI_SCHEMES):
        return uri
    path = Path(uri).expanduser()
    return str(path if path.is_absolute() else (items_dir / path).resolve())


def first_stage_item(item: Item, items_dir: Path) -> ChunkItem:
    """The item as the first stage reads it, its local paths made absolute for workers."""
    item = item.model_copy(
        update={
            "image": _absolute(item.image, items_dir),
            "control_image": _absolute(item.control_image, items_dir),
        }
    )
    stage_input = StageInput(kind="image", uri=item.image) if item.image else StageInput(kind="none")
    return ChunkItem(item=item, input=stage_input)


def group_into_chunks(
    members: Iterable[tuple[ChunkItem, ResolvedParams]],
    chunk_size: int,
    make: Callable[[ResolvedParams, list[ChunkItem]], Chunk],
) -> Iterator[Chunk]:
    """Chunks of up to chunk_size items with equal parameters, in order within each group; full chunks
    leave as they fill, partial ones at the end."""
    open_chunks: dict[ResolvedParams, list[ChunkItem]] = {}
    for member, params in members:
        group = open_chunks.setdefault(params, [])
        group.append(member)
        if len(group) >= chunk_size:
            yield make(params, open_chunks.pop(params))
    for params, group in open_chunks.items():
        yield make(params, group)


def plan_chunks(job: ValidatedJob, chunk_size: int) -> Iterator[Chunk]:
    """The first stage's chunks."""
    counter = itertools.count()

    def make(params: ResolvedParams, members: list[ChunkItem]) -> Chunk:
        return Chunk(
            job_id=job.job_id,
            chunk_id=f"{job.job_id}:s0:c{next(counter)}",
            output=job.output,
            stage_index=0,
            recipe=list(job.recipe),
            defaults=job.spec.defaults,
            params=params,
            items=members,
            dataset=job.spec.dataset,
        )

    members = ((first_stage_item(item, job.items_path.parent), params) for item, params in iter_items(job))
    yield from group_into_chunks(members, chunk_size, make)


def _register(client: redis.Redis, job: ValidatedJob) -> Literal["new", "resume", "done"]:
    """Record the job and every item as pending. The job joins the set of jobs only once all its
    items are recorded, and is marked enqueued only once all its chunks are sent, so a submit that
    dies part-way is either redone from scratch or resumed by submitting again."""
    if client.sismember(keys.JOBS, job.job_id):
        return "done" if client.hexists(keys.job_meta(job.job_id), "enqueued_at") else "resume"
    client.delete(
        keys.job_meta(job.job_id),
        keys.job_counts(job.job_id),
        keys.job_items(job.job_id),
        keys.job_order(job.job_id),
    )
    client.hset(
        keys.job_meta(job.job_id),
        mapping={
            "name": job.spec.name,
            "output": job.output,
            "total": job.total,
            "spec": job.spec.model_dump_json(),
            "recipe": json.dumps([plan.model_dump(mode="json") for plan in job.recipe]),
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
    pipe.sadd(keys.JOBS, job.job_id)
    pipe.execute()
    return "new"


def submit(job: ValidatedJob, settings: Settings, broker_url: str) -> Submission:
    """Submit a job; the same spec and items give the same job id, so submitting again resumes a
    submission that died part-way (its finished items are skipped) or reports the job as known."""
    client = connect_redis(broker_url)
    state = _register(client, job)
    if state == "done":
        return Submission(job.job_id, job.total, 0, already_submitted=True)
    chunks = send_chunks(producer_app(settings, broker_url), plan_chunks(job, settings.chunk_size))
    client.hset(keys.job_meta(job.job_id), "enqueued_at", time.time())
    return Submission(job.job_id, job.total, chunks, already_submitted=False, resumed=state == "resume")


def send_chunks(app: Celery, chunks: Iterable[Chunk]) -> int:
    """Send each chunk by task name to its stage's model queue, over one connection; returns the count."""
    count = 0
    with app.producer_or_acquire() as producer:
        for chunk in chunks:
            app.send_task(
                RUN_CHUNK_TASK,
                args=[chunk.model_dump(mode="json")],
                task_id=chunk.chunk_id,
                queue=chunk.stage.model.queue,
                producer=producer,
            )
            count += 1
    return count
