"""The Celery task: one chunk per task, retried with backoff when a retryable error stops it."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery.exceptions import Reject

from schemas.errors import ImgjobsError, JobCancelledError, PoisonChunkError, StageError
from schemas.messages import RUN_CHUNK_TASK, Chunk
from workers.app import app
from workers.chunk import ChunkContext, fail_items, process_chunk
from workers.observability import log_context, record_gpu_memory
from workers.progress import JobProgress
from workers.runtime import WorkerRuntime

log = logging.getLogger("imgjobs.worker")

MAX_RETRIES = 5
MAX_BACKOFF_S = 60
# A chunk whose items are all recorded as failed may still owe the job's finalize (results.jsonl, the
# report): that gets retries of its own beyond MAX_RETRIES, since without it the job never ends.
FINALIZE_RETRIES = 2 * MAX_RETRIES


@app.task(name=RUN_CHUNK_TASK, bind=True, max_retries=MAX_RETRIES)
def run_chunk(self: Any, payload: dict[str, Any]) -> None:
    chunk = Chunk.model_validate(payload)
    with log_context(job_id=chunk.job_id, chunk_id=chunk.chunk_id, stage=chunk.stage.name):
        try:
            _run_chunk(self, chunk)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Redis stayed away past the client's retries. Never fail items for that, and never let Celery
            # ack the message (acks_late acks a task that raised): requeue it, or, while Redis is still
            # down, leave it unacknowledged for the visibility timeout to bring back.
            log.error("chunk %s: lost the broker (%s); requeued", chunk.chunk_id, exc)
            raise Reject(exc, requeue=True) from None
        record_gpu_memory()


def _run_chunk(self: Any, chunk: Chunk) -> None:
    ctx = WorkerRuntime.context()
    progress = JobProgress(ctx.redis, chunk.job_id)
    standing = progress.standing()
    if standing == "unknown":
        # A redelivered chunk of a job pruned since: its items have nowhere to be recorded.
        log.warning("chunk %s: job %s is not on this broker (pruned?); dropped", chunk.chunk_id, chunk.job_id)
        return
    if chunk.stage.model.name != ctx.model.name:
        message = f"chunk for model {chunk.stage.model.name!r} reached the worker of {ctx.model.name!r}"
        _fail(self, chunk, ctx, StageError(message))
        return
    if standing == "cancelled":
        _fail(self, chunk, ctx, JobCancelledError("the job was cancelled"))
        return
    # Counted per retry, so only redeliveries count: a chunk whose worker dies mid-run comes back.
    deliveries = progress.count_delivery(f"{chunk.chunk_id}#{self.request.retries}")
    if deliveries > ctx.settings.max_deliveries:
        message = f"delivered {deliveries} times; its worker died each time (IMGJOBS_MAX_DELIVERIES)"
        log.error("chunk %s: dead-lettered: %s", chunk.chunk_id, message)
        _fail(self, chunk, ctx, PoisonChunkError(message))
        return
    log.info(
        "chunk %s: %s, %d item(s), delivery %d",
        chunk.chunk_id,
        chunk.stage.name,
        len(chunk.items),
        deliveries,
    )
    try:
        process_chunk(chunk, ctx)
    except ImgjobsError as exc:
        if not exc.retryable or self.request.retries >= MAX_RETRIES:
            log.error("chunk %s: failing its unfinished items: %s", chunk.chunk_id, exc)
            _fail(self, chunk, ctx, exc)
            return
        raise self.retry(exc=exc, countdown=min(2**self.request.retries, MAX_BACKOFF_S)) from None
    except (redis.ConnectionError, redis.TimeoutError):
        raise  # run_chunk requeues the chunk
    except Exception as exc:
        # Unexpected: still account for every item, so the job ends instead of hanging.
        log.exception("chunk %s: unexpected error", chunk.chunk_id)
        _fail(self, chunk, ctx, StageError(f"{type(exc).__name__}: {exc}"))


def _fail(self: Any, chunk: Chunk, ctx: ChunkContext, error: ImgjobsError) -> None:
    """fail_items, and where its items were the job's last, the job's finalize. A storage error in that
    finalize retries the chunk, whose items are failed by then, so its retry only finalizes."""
    try:
        fail_items(chunk, ctx, error)
    except ImgjobsError as exc:
        if exc.retryable and self.request.retries < FINALIZE_RETRIES:
            countdown = min(2**self.request.retries, MAX_BACKOFF_S)
            raise self.retry(exc=exc, countdown=countdown, max_retries=FINALIZE_RETRIES) from None
        log.error(
            "chunk %s: job %s left unfinished, its results not written: %s; `imgjobs retry %s` finishes it",
            chunk.chunk_id,
            chunk.job_id,
            exc,
            chunk.job_id,
        )
