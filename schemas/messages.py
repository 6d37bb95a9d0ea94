"""What travels over the broker (a Chunk, as JSON) and what a finished item records (ItemResult)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.job import Defaults, Item, ResizeStage, ResolvedParams, SaveKind, StageSpec
from schemas.registry import ModelEntry, ResolvedModel

RUN_CHUNK_TASK = "imgjobs.run_chunk"
# Set by `imgjobs worker` for the Celery worker it starts: the resolved model, as WorkerModel JSON.
WORKER_MODEL_ENV = "IMGJOBS_WORKER_MODEL"


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StagePlan(_Message):
    """One stage of a job as planned at submit: the model it runs on and how its output moves on."""

    index: int = Field(ge=0)
    name: str = Field(description="s{index}-{type}: the name of its outputs")
    spec: StageSpec
    model: ResolvedModel
    handover: Literal["image", "latent", "none"] = Field(
        description="what the next stage reads; none when last"
    )
    save: tuple[SaveKind, ...] = Field(description="outputs kept after the item finishes")
    controlnet: ResolvedModel | None = None
    depth_model: ResolvedModel | None = None

    @property
    def prompt_syntax(self) -> str:
        return "plain" if isinstance(self.spec, ResizeStage) else self.spec.prompt_syntax

    @property
    def image_format(self) -> str:
        return self.spec.format if isinstance(self.spec, ResizeStage) else "png"

    @property
    def writes(self) -> tuple[SaveKind, ...]:
        """Everything this stage writes: what is saved plus what the next stage reads."""
        handed = () if self.handover == "none" else (self.handover,)
        return tuple(kind for kind in ("image", "latent") if kind in self.save or kind in handed)


class StageInput(_Message):
    kind: Literal["image", "latent", "none"]
    uri: str | None = None


class StageRecord(_Message):
    name: str
    model: str
    params: ResolvedParams
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per phase")


class ChunkItem(_Message):
    item: Item = Field(description="the item as submitted; a local image path is made absolute")
    input: StageInput
    outputs: dict[str, str] = Field(default_factory=dict, description="outputs of the stages before this one")
    stages: list[StageRecord] = Field(default_factory=list, description="the stages before this one")


class Chunk(_Message):
    """A unit of work, one Celery task: items at one stage that share ResolvedParams, run as batched
    calls of the model's batch size."""

    job_id: str
    chunk_id: str
    output: str = Field(description="the job's output root; outputs go under {output}/{job_id}/")
    stage_index: int = Field(ge=0)
    recipe: list[StagePlan] = Field(min_length=1)
    defaults: Defaults
    params: ResolvedParams
    items: list[ChunkItem] = Field(min_length=1)
    dataset: bool = Field(False, description="also write the final images as an imagefolder dataset")

    @property
    def stage(self) -> StagePlan:
        return self.recipe[self.stage_index]

    @property
    def is_last_stage(self) -> bool:
        return self.stage_index == len(self.recipe) - 1

    def task_args(self) -> list[dict[str, Any]]:
        """The task's arguments, as JSON. Unset fields are left out: every optional field defaults to
        None, so the worker reads the same chunk back, and a chunk of 64 items is a third the size."""
        return [self.model_dump(mode="json", exclude_none=True)]

    def task_repr(self) -> str:
        """What Celery shows for the task's arguments in logs and events: a name, never the prompts.
        Without it Celery formats the whole chunk per message, most of the producer's cost."""
        return f"<{self.chunk_id}: {self.stage.name}, {len(self.items)} item(s)>"

    def send_options(self) -> dict[str, Any]:
        """Celery's send_task options for this chunk: by task name to its stage's model queue, with
        the chunk id as the task id (deterministic, so logs and redeliveries name it)."""
        return {
            "args": self.task_args(),
            "argsrepr": self.task_repr(),
            "task_id": self.chunk_id,
            "queue": self.stage.model.queue,
        }


class ErrorInfo(_Message):
    type: str
    message: str


class ItemResult(_Message):
    """One line of results.jsonl. `model` and `params` are those of the last stage the item reached;
    `stages` has every stage's model, parameters and timings."""

    id: str
    status: Literal["succeeded", "failed"]
    image: str | None = Field(None, description="the input image, as workers read it")
    outputs: dict[str, str] = Field(default_factory=dict, description="output name -> URI")
    seed: int
    model: str
    prompt: str
    negative_prompt: str | None = None
    params: ResolvedParams
    stages: list[StageRecord] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per phase, all stages")
    error: ErrorInfo | None = None
    failed_stage: str | None = None


class WorkerModel(_Message):
    """Handed from `imgjobs worker` to the Celery worker process it starts."""

    name: str
    entry: ModelEntry
