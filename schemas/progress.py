"""Job and item states, and the status object `imgjobs status --json` prints."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class ItemState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


TERMINAL_ITEM_STATES = (ItemState.SUCCEEDED, ItemState.FAILED)


class JobState(StrEnum):
    """pending: nothing started. running: started, not finished. succeeded / failed: every item
    is done and results.jsonl is written; failed means at least one item failed."""

    PENDING = "pending"
    RUNNING = "running"
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
    failed: int
    output: str
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    stages: list[StageProgress] = []

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    @property
    def finished(self) -> bool:
        return self.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
