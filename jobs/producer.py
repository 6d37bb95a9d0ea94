"""Submitting a validated job: record it with the job-state owner, publish its item parts to the
job's storage, and send one first-stage chunk per part to the first model's queue."""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from celery import Celery

from jobs.broker import producer_app
from jobs.manifest import ValidatedJob, embedded_roots, validate_job
from jobs.registry import Registry
from jobstate.connection import connect_redis
from jobstate.meta import JobMeta
from jobstate.parts import JobParts
from jobstate.storage import open_storage
from jobstate.store import JobStore
from schemas.errors import ConfigError
from schemas.job import JobSpec, Priority
from schemas.messages import END_JOB_TASK, RUN_CHUNK_TASK, Chunk, JobEnd
from schemas.settings import Settings

SEND_BATCH = 64


@dataclass(frozen=True)
class Submission:
    job_id: str
    total: int
    chunks: int
    already_submitted: bool
    resumed: bool = False


@contextmanager
def prepared(
    job_path: Path,
    registry: Registry,
    settings: Settings,
    priority: Priority | None = None,
    check_local: bool = False,
) -> Iterator[ValidatedJob]:
    """The job validated, its items written as parts into a temporary folder for `submit`; with
    `priority`, at that priority instead of its spec's (the job id stays the same). With
    `check_local`, its local inputs and output are checked as `validate` checks them."""
    with tempfile.TemporaryDirectory(prefix="imgjobs-parts-") as folder:
        job = validate_job(
            job_path,
            registry,
            Path(folder),
            settings.chunk_size,
            check_local=check_local,
            embedded_roots=embedded_roots(settings) if check_local else None,
        )
        if priority is not None and priority != job.spec.priority:
            spec = JobSpec.model_validate({**job.spec.model_dump(), "priority": priority})
            job = replace(job, spec=spec)
        yield job


def submit(job: ValidatedJob, settings: Settings, broker_url: str) -> Submission:
    """Submit a job; the same spec and items give the same job id, so submitting again resumes a
    submission that died part-way (parts already sent are not sent again; finished items are
    skipped anyway) or reports the job as known.

    Parts are published and their chunks sent in batches that grow from 1 to SEND_BATCH, so workers
    start on the first part at once; a chunk never reaches a worker before its part is in storage."""
    if job.parts is None:
        raise ValueError("validate the job with parts_to= before submitting it")
    store = JobStore(connect_redis(broker_url))
    run_id = secrets.token_hex(8)
    if store.find(job.job_id) is None:
        # The first part before the job exists: storage that refuses it fails the submit alone,
        # leaving no job behind.
        job.parts.publish(JobParts(open_storage(job.output, job.job_id), run_id), 0, 1)
    created, meta = store.create(job.meta(run_id))
    if not created and meta.enqueued_at is not None:
        return Submission(job.job_id, job.total, 0, already_submitted=True)
    if meta.chunk_size != job.chunk_size:
        raise ConfigError(
            f"job {job.job_id} was submitted with chunks of {meta.chunk_size} items; resume it with "
            f"IMGJOBS_CHUNK_SIZE={meta.chunk_size}"
        )
    parts = JobParts(open_storage(meta.output, meta.job_id), meta.run_id)
    app = producer_app(settings, broker_url)
    sent = meta.parts_sent
    for batch in _batches(range(meta.parts_sent, meta.parts)):
        job.parts.publish(parts, batch.start, batch.stop)
        send_chunks(app, meta, [meta.first_chunk(part) for part in batch])
        sent = batch.stop
        store.record_sent(meta, sent)
    store.record_sent(meta, sent, enqueued=True)
    return Submission(
        job.job_id, job.total, sent - meta.parts_sent, already_submitted=False, resumed=not created
    )


def _batches(parts: range) -> list[range]:
    batches, size, start = [], 1, parts.start
    while start < parts.stop:
        batches.append(range(start, min(start + size, parts.stop)))
        start, size = start + size, min(size * 2, SEND_BATCH)
    return batches


def send_chunks(app: Celery, meta: JobMeta, chunks: Sequence[Chunk]) -> None:
    """Send chunks by task name to their stage's model queue at the job's priority, in one Redis
    pipeline (kombu's publish batch)."""
    with app.producer_or_acquire() as producer, producer.batch(max_size=len(chunks)):
        for chunk in chunks:
            options = chunk.send_options(meta.recipe[chunk.stage_index].model.queue, meta.spec.priority)
            app.send_task(RUN_CHUNK_TASK, **options, producer=producer)


def sender(settings: Settings, broker_url: str) -> Callable[[JobEnd], None]:
    """Sends a job's end to the CPU workers (after a cancel or a retry's undo, from the CLI)."""
    app = producer_app(settings, broker_url)

    def send_end(end: JobEnd) -> None:
        app.send_task(END_JOB_TASK, **end.send_options())

    return send_end
