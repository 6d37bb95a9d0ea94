"""What the workers say of themselves through Celery's remote control (a broadcast over the broker):
whether any consumes the queues a job waits on (with a broker of its own, `run` and `status --watch`
say so instead of waiting in silence for a worker that was never started), and what each is and runs
(`imgjobs workers`, answered by workers/remote_control.py)."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery

from jobstate.meta import JobMeta
from jobstate.store import JobStore
from schemas.messages import JOB_END_QUEUE, WORKER_REPORT, Chunk
from schemas.progress import JobStatus

QUIET_BEFORE_ASKING_S = 5.0  # no progress for this long before the workers are asked
ASK_EVERY_S = 30.0
REPLY_TIMEOUT_S = 1.0
REPORT_TIMEOUT_S = 2.0  # `imgjobs workers` waits this long for the answers


def queues_waited_on(meta: JobMeta, status: JobStatus) -> list[str]:
    """The queues of the stages that still have items, or the job's end queue once none has."""
    if status.done >= status.total:
        return [JOB_END_QUEUE]
    done = {stage.name: stage.done for stage in status.stages}
    return sorted({plan.model.queue for plan in meta.recipe if done.get(plan.name, 0) < status.total})


def consumed_queues(app: Celery) -> set[str]:
    """The queues some worker consumes now, by the workers' own replies."""
    replies = app.control.inspect(timeout=REPLY_TIMEOUT_S).active_queues() or {}
    return {queue["name"] for queues in replies.values() for queue in queues or []}


class ConsumerWatch:
    """Told each status of a job as it is polled; returns the warnings to print: one per queue the
    job waits on that no worker consumes, once until a worker takes that queue again."""

    def __init__(
        self,
        meta: JobMeta,
        consumed: Callable[[], set[str]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.meta = meta
        self.consumed = consumed
        self.clock = clock
        self.progress: tuple[int, ...] | None = None
        self.quiet_since = clock()
        self.asked_at: float | None = None
        self.warned: set[str] = set()

    def warnings(self, status: JobStatus) -> list[str]:
        now = self.clock()
        progress = (status.done, status.running, *(stage.done for stage in status.stages))
        if progress != self.progress:
            self.progress, self.quiet_since = progress, now
            return []
        if now - self.quiet_since < QUIET_BEFORE_ASKING_S:
            return []
        if self.asked_at is not None and now - self.asked_at < ASK_EVERY_S:
            return []
        self.asked_at = now
        missing = [queue for queue in queues_waited_on(self.meta, status) if queue not in self.consumed()]
        new = [queue for queue in missing if queue not in self.warned]
        self.warned = set(missing)
        return [f"waiting: no worker is consuming {queue}" for queue in new]


@dataclass(frozen=True)
class RunningTask:
    """A task a worker runs now: a chunk, with how far it got, or a job's end."""

    job_id: str
    task: str  # a chunk's id, or "end"
    stage: str | None  # s0, s1, ...; None for a job's end
    items: int  # the chunk's items
    done: int  # of them finished
    running_s: float


@dataclass(frozen=True)
class LiveWorker:
    """A worker as it answers `imgjobs workers`."""

    name: str  # Celery's node name: imgjobs.<model>.<pid>@<host>
    host: str
    model: str | None
    device: str | None  # None until its model has loaded
    rss_bytes: int  # its processes' resident memory
    gpu_bytes: int | None  # the accelerator memory its model's process holds
    uptime_s: float
    running: list[RunningTask]


def live_workers(
    app: Celery, store: JobStore, timeout_s: float = REPORT_TIMEOUT_S, limit: int | None = None
) -> list[LiveWorker]:
    """Every worker of the broker that answers within `timeout_s` (or the first `limit` to answer),
    by name; its chunks' progress is read from the job-state owner."""
    replies = app.control.broadcast(WORKER_REPORT, reply=True, timeout=timeout_s, limit=limit) or []
    found = {name: answer for reply in replies for name, answer in reply.items() if isinstance(answer, dict)}
    now = time.time()
    return [
        LiveWorker(
            name=name,
            host=name.rpartition("@")[2],
            model=answer.get("model"),
            device=answer.get("device"),
            rss_bytes=int(answer.get("rss_bytes") or 0),
            gpu_bytes=answer.get("gpu_bytes"),
            uptime_s=float(answer.get("uptime_s") or 0.0),
            running=[_progress(task, store, now) for task in answer.get("tasks", [])],
        )
        for name, answer in sorted(found.items())
    ]


def _progress(task: dict[str, Any], store: JobStore, now: float) -> RunningTask:
    running_s = round(now - float(task.get("started_at") or now), 1)
    if task.get("task") != "chunk":
        return RunningTask(str(task.get("job_id")), "end", None, 0, 0, running_s)
    chunk = Chunk.model_validate({key: value for key, value in task.items() if key in Chunk.model_fields})
    meta = store.find(chunk.job_id)
    items = len(meta.positions(chunk.part)) if meta else 0
    if chunk.slots is not None:
        items = sum(bin(byte).count("1") for byte in base64.b64decode(chunk.slots))
    left = store.in_flight(chunk.job_id).get(chunk.chunk_id, 0)
    return RunningTask(
        chunk.job_id, chunk.chunk_id, f"s{chunk.stage_index}", items, max(items - left, 0), running_s
    )
