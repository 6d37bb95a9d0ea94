"""Whether any worker consumes the queues a job waits on, asked of the workers themselves through
Celery's remote control (a broadcast over the broker). With a broker of its own, `run` and
`status --watch` say so instead of waiting in silence for a worker that was never started."""

from __future__ import annotations

import time
from collections.abc import Callable

from celery import Celery

from jobstate.meta import JobMeta
from schemas.messages import JOB_END_QUEUE
from schemas.progress import JobStatus

QUIET_BEFORE_ASKING_S = 5.0  # no progress for this long before the workers are asked
ASK_EVERY_S = 30.0
REPLY_TIMEOUT_S = 1.0


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
