"""What travels over the broker (a Chunk, as JSON) and what a finished item records (ItemResult)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.job import ItemId, ResolvedParams
from schemas.registry import ModelEntry

RUN_CHUNK_TASK = "imgjobs.run_chunk"
# Set by `imgjobs worker` for the Celery worker it starts: the resolved model, as WorkerModel JSON.
WORKER_MODEL_ENV = "IMGJOBS_WORKER_MODEL"


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChunkItem(_Message):
    id: ItemId
    image: str = Field(description="absolute local path, file://, s3:// or http(s):// URI")
    prompt: str
    negative_prompt: str | None
    seed: int


class Chunk(_Message):
    """A unit of work: items that share one model, stage and ResolvedParams, run as one batch."""

    job_id: str
    chunk_id: str
    output: str = Field(description="the job's output root; outputs go under {output}/{job_id}/")
    stage_index: int = Field(ge=0)
    stage_type: Literal["img2img"]
    model: str
    params: ResolvedParams
    items: list[ChunkItem] = Field(min_length=1)


class ErrorInfo(_Message):
    type: str
    message: str


class ItemResult(_Message):
    """One line of results.jsonl."""

    id: str
    status: Literal["succeeded", "failed"]
    outputs: dict[str, str] = Field(default_factory=dict, description="stage name -> output URI")
    seed: int
    model: str
    prompt: str
    negative_prompt: str | None = None
    params: ResolvedParams
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per phase")
    error: ErrorInfo | None = None


class WorkerModel(_Message):
    """Handed from `imgjobs worker` to the Celery worker process it starts."""

    name: str
    entry: ModelEntry
