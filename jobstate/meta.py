"""A job's metadata, typed: what the producer records at submit and the state owner keeps in the
job's meta hash (jobstate/keys.py), plus the times and marks that its life adds."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jobstate import layout
from schemas.job import JobSpec
from schemas.messages import Chunk, ChunkId, StagePlan

# Fields the meta hash holds beyond JobMeta's, read and written only by jobstate/lua scripts
# (jobstate/STATES.md):
# the token of the end task that holds the job's end (claim_end.lua; finish_job.lua checks it)
END_CLAIM = "end_claim"
# the round whose end a chunk dropped after a cancel has sent (start_chunk.lua): every chunk a cancel
# left queued finds the end due, and only the first sends it
END_SENT = "end_sent"


def chunk_size_for(recipe: Sequence[StagePlan], override: int | None) -> int:
    """Items per part and per chunk: the override (IMGJOBS_CHUNK_SIZE) where set, else the smallest
    chunk_size among the job's models, since a part's items go through every stage together."""
    return override or min(stage.model.entry.items_per_chunk for stage in recipe)


class JobMeta(BaseModel):
    """One job on the broker. `run_id` names one incarnation of the job id: a job pruned and
    submitted again is a new run, whose parts live apart from the old one's."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: str
    name: str
    output: str = Field(description="the output root; the job's files go under {output}/{job_id}/")
    total: int = Field(ge=0, description="items in the manifest")
    chunk_size: int = Field(ge=1, description="items per part and per first-stage chunk")
    run_id: str
    spec: JobSpec
    recipe: tuple[StagePlan, ...]
    submitted_at: float
    schedule: str | None = Field(None, description="the schedule whose firing submitted the job")
    parts_sent: int = Field(0, description="first-stage chunks sent so far, in part order")
    enqueued_at: float | None = Field(None, description="when every first-stage chunk was sent")
    started_at: float | None = None
    finished_at: float | None = Field(None, description="when the job's end was written (or failed)")
    cancelled_at: float | None = None
    touched_at: float | None = Field(None, description="when a chunk of it last started or finished items")
    stopped_at: float | None = Field(None, description="stopped (its run stopped) since then, until resumed")
    stopped_s: float = Field(0.0, description="time it spent stopped, or finished before a retry reopened it")
    epoch: int = Field(0, description="raised by each cancel: chunks sent before it are dropped")
    round: int = Field(0, description="raised by each retry: its results win over the earlier rounds'")
    end_error: str | None = Field(None, description="why the job's end could not be written")
    unrecorded: str | None = Field(
        None, description="why the results of failed items could not be written (the last such error)"
    )
    end_retrying: str | None = Field(None, description="what the job's end is retrying now, and why")
    results: str | None = Field(None, description="results.jsonl's URI, once written")
    report: str | None = None

    @property
    def parts(self) -> int:
        return -(-self.total // self.chunk_size)

    def part_of(self, position: int) -> int:
        return position // self.chunk_size

    @property
    def local_folder(self) -> str | None:
        """{output}/{job_id} where the output is a local folder; None for S3."""
        return None if self.output.startswith("s3://") else layout.job_root(self.output, self.job_id)

    def positions(self, part: int) -> range:
        """The manifest positions of the items in `part`."""
        first = part * self.chunk_size
        return range(first, min(first + self.chunk_size, self.total))

    @property
    def last_stage(self) -> int:
        return len(self.recipe) - 1

    def first_chunk(self, part: int) -> Chunk:
        """The first stage's chunk of `part`, as submit sends it."""
        return Chunk(
            job_id=self.job_id,
            run_id=self.run_id,
            chunk_id=str(ChunkId(self.job_id, part)),
            part=part,
            stage_index=0,
            epoch=self.epoch,
            round=self.round,
        )

    def to_hash(self) -> dict[str, str]:
        """The meta hash's fields: set fields only, as strings (JSON for the spec and the recipe)."""
        data = self.model_dump(mode="json", exclude_none=True)
        data["spec"] = self.spec.model_dump_json()
        data["recipe"] = json.dumps([plan.model_dump(mode="json") for plan in self.recipe])
        return {key: value if isinstance(value, str) else json.dumps(value) for key, value in data.items()}

    @classmethod
    def from_hash(cls, job_id: str, raw: dict[str, str]) -> JobMeta:
        data: dict[str, Any] = {key: value for key, value in raw.items() if key in cls.model_fields}
        for key in ("spec", "recipe"):
            data[key] = json.loads(data[key])
        return cls.model_validate({**data, "job_id": job_id})
