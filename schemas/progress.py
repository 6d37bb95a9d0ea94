"""Job states, and the status object `imgjobs status --json` prints."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class JobState(StrEnum):
    """pending: nothing started. running: started, not finished. stopped: its embedded run stopped, and
    nothing runs it until it is run again. succeeded / failed: every item is done and results.jsonl is
    written; failed means at least one item failed, or the job's end could not be written (`error`).
    cancelled: cancelled; finished once its end is written."""

    PENDING = "pending"
    RUNNING = "running"
    STOPPED = "stopped"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StageProgress(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    done: int


class JobStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str
    name: str
    state: JobState
    total: int
    pending: int
    running: int
    succeeded: int
    failed: int = Field(description="failed items, the cancelled ones included")
    cancelled: int = Field(0, description="items cancelled before they ran (counted in failed too)")
    output: str
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    stopped_s: float = Field(
        0.0, description="seconds the job was stopped, or finished before a retry: not its running time"
    )
    error: str | None = Field(None, description="why the job's end could not be written")
    retrying: str | None = Field(None, description="what is being retried now, and why (the job's end)")
    schedule: str | None = Field(None, description="the schedule whose firing submitted the job")
    stages: list[StageProgress] = []

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    def running_s(self, now: float) -> float:
        """How long the job has run, or ran: from its start to its end (or `now`), less its stops."""
        if self.started_at is None:
            return 0.0
        return max((self.finished_at or now) - self.started_at - self.stopped_s, 0.0)

    @property
    def finished(self) -> bool:
        """The job's end is written (or failed for good): nothing more happens without a retry."""
        return self.finished_at is not None
