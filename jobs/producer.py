"""Submitting a validated job: record it in Redis and send its chunks (planned by jobs/plan.py) to
the model queues."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from celery import Celery

from jobs.broker import connect_redis, producer_app
from jobs.manifest import ValidatedJob
from jobs.plan import Members, Registration, chunk_size_for, create_job, plan_chunks
from schemas import keys
from schemas.messages import RUN_CHUNK_TASK, Chunk
from schemas.settings import Settings

SEND_BATCH = 64
# A batch is held in memory until published: bounded in items too, since one chunk may hold thousands.
SEND_BATCH_ITEMS = 4096


@dataclass(frozen=True)
class Submission:
    job_id: str
    total: int
    chunks: int
    already_submitted: bool
    resumed: bool = False


def submit(job: ValidatedJob, settings: Settings, broker_url: str) -> Submission:
    """Submit a job; the same spec and items give the same job id, so submitting again resumes a
    submission that died part-way (finished items are skipped) or reports the job as known.

    One pass over the items records them and sends their chunks, pipelined: every SEND_BATCH chunks
    (or SEND_BATCH_ITEMS items), the items read so far are recorded, then the chunks are published in
    one round trip. A chunk thus never reaches a worker before its items are recorded."""
    client = connect_redis(broker_url)
    state = create_job(client, job)
    if state == "done":
        return Submission(job.job_id, job.total, 0, already_submitted=True)
    registration = Registration(client, job.job_id)

    def recorded(members: Members) -> Members:
        for member in members:
            registration.add(member[0].item.id)
            yield member

    chunks = plan_chunks(job, chunk_size_for(job.recipe, settings.chunk_size), wrap=recorded)
    sent = send_chunks(producer_app(settings, broker_url), chunks, before_publish=registration.flush)
    client.hset(keys.job_meta(job.job_id), "enqueued_at", time.time())
    return Submission(job.job_id, job.total, sent, already_submitted=False, resumed=state == "resume")


def send_chunks(
    app: Celery, chunks: Iterable[Chunk], before_publish: Callable[[], None] = lambda: None
) -> int:
    """Send each chunk by task name to its stage's model queue; returns the count. Chunks go out in
    batches, each in one Redis pipeline (kombu's publish batch) after before_publish() returns. The
    batches grow from 1 to SEND_BATCH chunks (fewer where they would hold over SEND_BATCH_ITEMS
    items), so workers start on the first chunk at once while the rest of the manifest is read."""
    count = 0
    with app.producer_or_acquire() as producer:
        for batch in _send_batches(chunks):
            before_publish()
            with producer.batch(max_size=len(batch)):
                for chunk in batch:
                    app.send_task(RUN_CHUNK_TASK, **chunk.send_options(), producer=producer)
            count += len(batch)
    return count


def _send_batches(chunks: Iterable[Chunk]) -> Iterator[list[Chunk]]:
    size, batch, items = 1, list[Chunk](), 0
    for chunk in chunks:
        batch.append(chunk)
        items += len(chunk.items)
        if len(batch) >= size or items >= SEND_BATCH_ITEMS:
            yield batch
            size, batch, items = min(size * 2, SEND_BATCH), [], 0
    if batch:
        yield batch
