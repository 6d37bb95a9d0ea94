"""The Celery tasks: one chunk per task, and a job's end per task; retried with backoff when a
retryable error stops them."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import redis
from celery.exceptions import Reject
from kombu.exceptions import OperationalError

from schemas.messages import END_JOB_TASK, RUN_CHUNK_TASK, Chunk, JobEnd
from workers.app import app
from workers.chunk import RetryChunk, process_chunk
from workers.events import emit
from workers.job_end import RetryEnd, end_job
from workers.observability import log_context, record_gpu_memory
from workers.remote_control import tell_main_process
from workers.runtime import WorkerRuntime

log = logging.getLogger("imgjobs.worker")


@dataclass(frozen=True)
class RetryPolicy:
    """How a task that stopped on a retryable error runs again: up to `retries` more times, after
    an exponential backoff capped at `cap_s`, of which a random share up to `jitter` is taken off,
    so that workers stopped by the same outage do not all come back at once."""

    retries: int
    base_s: float = 1.0
    cap_s: float = 60.0
    jitter: float = 0.5

    def countdown(self, retries: int) -> float:
        backoff = min(self.base_s * 2.0**retries, self.cap_s)
        return backoff * (1 - self.jitter * random.random())


CHUNK_RETRIES = RetryPolicy(retries=5)
END_RETRIES = RetryPolicy(retries=8)


@app.task(name=RUN_CHUNK_TASK, bind=True, max_retries=CHUNK_RETRIES.retries)
def run_chunk(self: Any, payload: dict[str, Any]) -> None:
    chunk = Chunk.model_validate(payload)
    retries = int(self.request.retries)
    with log_context(job_id=chunk.job_id, chunk_id=chunk.chunk_id, stage=f"s{chunk.stage_index}"):
        try:
            process_chunk(chunk, WorkerRuntime.context(), retries, may_retry=retries < CHUNK_RETRIES.retries)
        except RetryChunk as stopped:
            countdown = CHUNK_RETRIES.countdown(retries)
            emit.chunk_retried(chunk.chunk_id, stopped.error, countdown)
            raise self.retry(exc=stopped.error, countdown=countdown) from None
        except (redis.ConnectionError, redis.TimeoutError, OperationalError) as exc:
            # Redis stayed away past the client's retries, or a send to it failed. Never fail items for
            # that, and never let Celery drop the message (a task that raises is acknowledged and
            # gone): requeue it, or, while Redis is still down, leave it unacknowledged for the
            # visibility timeout to bring back. Run again, the chunk skips what it finished, hands over
            # again what it had not, and sends the job's end if that is still to send.
            log.error("chunk %s: lost the broker (%s); requeued", chunk.chunk_id, exc)
            raise Reject(exc, requeue=True) from None
        except Exception as exc:
            # Anything else that escaped the chunk's own handling (a time limit in its last steps, a
            # bug): requeued too, so that its items are not left open for good; the delivery count
            # ends a chunk that fails every time.
            log.exception("chunk %s: stopped by %s; requeued", chunk.chunk_id, type(exc).__name__)
            raise Reject(exc, requeue=True) from None
        record_gpu_memory()
        tell_main_process(WorkerRuntime.context().model.device)


@app.task(name=END_JOB_TASK, bind=True, max_retries=END_RETRIES.retries)
def end_job_task(self: Any, payload: dict[str, Any]) -> None:
    end = JobEnd.model_validate(payload)
    retries = int(self.request.retries)
    with log_context(job_id=end.job_id):
        try:
            end_job(
                end, WorkerRuntime.end_context(), self.request.id, may_retry=retries < END_RETRIES.retries
            )
        except RetryEnd as stopped:
            countdown = END_RETRIES.countdown(retries)
            log.warning(
                "job %s: its end stopped (%s); trying again in %.1f s", end.job_id, stopped, countdown
            )
            what = (
                f"the job's end (results.jsonl, report.html): {type(stopped.error).__name__}: {stopped}; "
                f"retry {retries + 1} of {END_RETRIES.retries} in {countdown:.0f} s"
            )
            WorkerRuntime.end_context().store.note_end_retry(end, self.request.id, what)
            raise self.retry(exc=stopped.error, countdown=countdown) from None
        except (redis.ConnectionError, redis.TimeoutError, OperationalError) as exc:
            log.error("job %s: lost the broker writing its end (%s); requeued", end.job_id, exc)
            raise Reject(exc, requeue=True) from None
