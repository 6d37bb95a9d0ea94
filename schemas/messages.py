"""What travels over the broker (a Chunk or a JobEnd, as JSON) and what a finished item records
(ItemResult)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from schemas.job import (
    Defaults,
    Item,
    Priority,
    ResizeStage,
    ResolvedParams,
    SaveKind,
    ScoreSpec,
    StageSpec,
    base_prompt,
    resolve_negative_prompt,
    resolve_seed,
    without_none,
)
from schemas.registry import LoraRef, ModelEntry, ResolvedModel, merged_loras

RUN_CHUNK_TASK = "imgjobs.run_chunk"
END_JOB_TASK = "imgjobs.end_job"
# Consumed by the `cpu` model's workers, so that a job's end never takes GPU time.
JOB_END_QUEUE = "imgjobs.end"
# Set by `imgjobs worker` for the Celery worker it starts: the resolved model, as WorkerModel JSON.
WORKER_MODEL_ENV = "IMGJOBS_WORKER_MODEL"
# The remote control command a worker answers `imgjobs workers` with (workers/remote_control.py).
WORKER_REPORT = "imgjobs_worker"

# A job's priority as Celery's message priority. Celery's Redis transport (kombu) emulates priorities
# with one Redis list per step of its `priority_steps` (celery_config sets these three), and a worker
# takes from the lowest number first. A message sent without a priority counts as 0, in the list
# named after the queue itself, so 0 has to be high: normal and low are lists of their own.
PRIORITY_STEPS: dict[Priority, int] = {"high": 0, "normal": 3, "low": 6}
# What kombu's Redis transport puts between a queue's name and its step (kombu.transport.redis.Channel.sep).
PRIORITY_SEPARATOR = "\x06\x16"


def priority_lists(queue: str) -> tuple[str, ...]:
    """The Redis lists that hold a Celery queue's waiting messages, one per priority, in the order
    workers take from them: what a queue's length is the sum of."""
    return tuple(
        f"{queue}{PRIORITY_SEPARATOR}{step}" if step else queue for step in sorted(PRIORITY_STEPS.values())
    )


def queue_of_list(name: str) -> str:
    """The Celery queue whose messages of some priority the Redis list `name` holds."""
    return name.split(PRIORITY_SEPARATOR, 1)[0]


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
    scorer: ResolvedModel | None = Field(None, description="the CLIP checkpoint of the stage's `score`")

    @model_serializer(mode="wrap")
    def _scorer_only_when_scored(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A job's id digests its recipe as JSON: that of a job that scores nothing stays as it was.
        return without_none(handler(self), "scorer")

    @property
    def prompt_syntax(self) -> str:
        return "plain" if isinstance(self.spec, ResizeStage) else self.spec.prompt_syntax

    @property
    def loras(self) -> tuple[LoraRef, ...]:
        """The adapters this stage runs with: its model's, then its own."""
        own = () if isinstance(self.spec, ResizeStage) else self.spec.loras
        return merged_loras(self.model.entry.loras, own)

    @property
    def image_format(self) -> str:
        return self.spec.format if isinstance(self.spec, ResizeStage) else "png"

    @property
    def score(self) -> ScoreSpec | None:
        return None if isinstance(self.spec, ResizeStage) else self.spec.score

    @property
    def attempts(self) -> int:
        """The most runs of one item at this stage: 1, plus the re-rolls its score gate allows."""
        return 1 + (self.score.rerolls if self.score else 0)

    @property
    def writes(self) -> tuple[SaveKind, ...]:
        """Everything this stage writes: what is saved plus what the next stage reads."""
        handed = () if self.handover == "none" else (self.handover,)
        return tuple(kind for kind in ("image", "latent") if kind in self.save or kind in handed)


class StageInput(_Message):
    kind: Literal["image", "latent", "none"]
    uri: str | None = None


class ScoreAttempt(_Message):
    """One run of an item at a stage that re-rolls: its seed and the scores of its output."""

    seed: int
    clip_score: float | None = None
    input_similarity: float | None = None


class QualityRecord(_Message):
    """The scores of one stage's output (the one kept), made on the worker that made it."""

    stage: str = Field(description="the stage whose output was scored, e.g. s0-img2img")
    model: str = Field(description="the scoring model (a CLIP checkpoint)")
    clip_score: float | None = Field(
        None,
        description="100 x max(cosine, 0) of the output's and the prompt's CLIP embeddings; none "
        "without a prompt",
    )
    input_similarity: float | None = Field(
        None, description="cosine of the output's and the input image's CLIP embeddings; none without one"
    )
    phash: str | None = Field(None, description="64-bit difference hash (dHash) of the output, 16 hex digits")
    low_score: bool = Field(False, description="below a gate of the stage (kept: flagged)")
    seed: int = Field(description="the seed that made the kept output")
    attempts: list[ScoreAttempt] = Field(
        default_factory=list, description="every run when the item was re-rolled, in order; else empty"
    )


class StageRecord(_Message):
    name: str
    model: str
    params: ResolvedParams
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per phase")
    nsfw: bool = Field(False, description="the safety checker flagged this stage's output (made black)")
    prompt: str | None = Field(
        None, description="the prompt the stage ran with, after its prompt_template; none for resize"
    )
    prompt_truncated: bool = Field(
        False,
        description="the model's tokenizer cut the prompt to its limit (77 CLIP tokens): the rest was unused",
    )
    # What the stage ran (params say what was asked): kept together, last, so that the report's
    # header finds them in a results line without parsing it (workers/report.py, which knows every
    # field's order: a field added here goes into its pattern too).
    sampler: str | None = Field(
        None, description="the sampler run: its name in the table (README, Samplers), else its class"
    )
    schedule: str | None = Field(None, description="its schedule; None: the checkpoint's own spacing")
    steps_run: int | None = Field(None, description="denoising steps run: int(steps x strength) for img2img")
    unet_evaluations: int | None = Field(
        None, description="UNet evaluations per item: the steps' calls, doubled by classifier-free guidance"
    )
    quality: QualityRecord | None = Field(None, description="the scores of this stage's output")

    @model_serializer(mode="wrap")
    def _quality_only_when_scored(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return without_none(handler(self), "quality")  # an unscored job's rows stay as they were


class ChunkItem(_Message):
    """One item as a stage runs it: the item from its part, its input, and what earlier stages made."""

    item: Item = Field(description="the item as submitted; a local image path is made absolute")
    input: StageInput
    outputs: dict[str, str] = Field(default_factory=dict, description="outputs of the stages before this one")
    stages: list[StageRecord] = Field(default_factory=list, description="the stages before this one")
    overrides: dict[str, Any] | None = Field(None, description="what `retry --set` changed in `item`")


# `{job_id}:s0:c{part}`, `{job_id}:r{round}:s0:c{part}`, then `/s{stage}.{digest}` per handover.
_CHUNK_ID = re.compile(
    r"^(?P<job_id>[^:/]+)(?::r(?P<round>\d+))?:s0:c(?P<part>\d+)(?P<handovers>(?:/s\d+\.[^/]+)*)\Z"
)


@dataclass(frozen=True)
class ChunkId:
    """What a chunk's id says. The id is the chunk's Celery task id and its field in the job's
    in-flight hash: one chunk, one id, and a redelivery keeps it. A first-stage chunk is named by its
    part, and by the retry round that sent it again; a later stage's by the chunk that handed its
    items over and which items those were (`digest`: workers/recording.py), so that two handovers
    of different items of one part never share an id."""

    job_id: str
    part: int
    retry_round: int = 0  # 0: sent by submit
    handovers: tuple[tuple[int, str], ...] = ()  # (stage index, digest), one per stage after the first

    def __str__(self) -> str:
        sent = f"{self.job_id}:r{self.retry_round}" if self.retry_round else self.job_id
        return f"{sent}:s0:c{self.part}" + "".join(f"/s{stage}.{digest}" for stage, digest in self.handovers)

    @property
    def stage_index(self) -> int:
        return self.handovers[-1][0] if self.handovers else 0

    def handed_over(self, stage_index: int, digest: str) -> ChunkId:
        """The id of the chunk this one hands items (named by `digest`) over to at `stage_index`."""
        return ChunkId(self.job_id, self.part, self.retry_round, (*self.handovers, (stage_index, digest)))

    @classmethod
    def parse(cls, text: str) -> ChunkId:
        match = _CHUNK_ID.match(text)
        if match is None:
            raise ValueError(f"not a chunk id: {text!r}")
        handovers = tuple(
            (int(stage), digest)
            for stage, digest in (hop.split(".", 1) for hop in match["handovers"].split("/s")[1:])
        )
        return cls(match["job_id"], int(match["part"]), int(match["round"] or 0), handovers)


class Chunk(_Message):
    """A unit of work, one Celery task: items of one part of the job at one stage. It names them
    rather than holding them: the items are in the part's file in storage (jobstate/parts.py), and
    so is what the stage before handed over to a later stage's chunk."""

    # `carry` is the handover part's name in the JSON, as chunks already queued have it, so that
    # workers of two releases read each other's chunks (docs/operations.md, "Message format").
    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, serialize_by_alias=True)

    job_id: str
    run_id: str = Field(description="the run of the job id the chunk belongs to")
    chunk_id: str = Field(description="its ChunkId, as text")
    part: int = Field(ge=0, description="the items part: manifest positions part * chunk_size onwards")
    stage_index: int = Field(ge=0)
    epoch: int = Field(0, ge=0, description="the job's epoch when sent; a cancel raises it")
    round: int = Field(0, ge=0, description="the job's retry round when sent")
    slots: str | None = Field(
        None, description="the part's slots this chunk runs, as a base64 bitmap; all if unset"
    )
    handover_part: str | None = Field(
        None, alias="carry", description="the handover part's key, for a stage after the first"
    )
    overrides: dict[str, Any] | None = Field(
        None, description="item fields `imgjobs retry --set` changed for its items' run (JSON values)"
    )

    def task_args(self) -> list[dict[str, Any]]:
        """The task's arguments, as JSON; unset fields are left out (each defaults to None)."""
        return [self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)]

    def task_repr(self) -> str:
        """What Celery shows for the task's arguments in logs and events: a name, never the contents."""
        return f"<{self.chunk_id}>"

    def send_options(self, queue: str, priority: Priority) -> dict[str, Any]:
        """Celery's send_task options for this chunk: by task name to its stage's model queue at its
        job's priority (the message's, never an argument: a worker has the job's meta), with the chunk
        id as the task id (deterministic, so logs and redeliveries name it)."""
        return {
            "args": self.task_args(),
            "argsrepr": self.task_repr(),
            "task_id": self.chunk_id,
            "queue": queue,
            "priority": PRIORITY_STEPS[priority],
        }


# Sends a chunk to its queue at its job's priority: Celery's send_task in a worker, a list in tests.
ChunkSender = Callable[[Chunk, str, Priority], None]


class JobEnd(_Message):
    """The job's end as a task of its own: results.jsonl and the report, on a CPU worker."""

    job_id: str
    run_id: str
    round: int = Field(ge=0)

    def send_options(self) -> dict[str, Any]:
        # Celery's own task id (random): a redelivered end task keeps it, a second one sent for the same
        # end has another, and the end's claim (jobstate) lets only one of them run.
        return {"args": [self.model_dump(mode="json")], "queue": JOB_END_QUEUE}


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
    nsfw: bool = Field(False, description="a stage's safety checker flagged the item's output")
    overrides: dict[str, Any] | None = Field(
        None, description="item fields `imgjobs retry --set` changed for this run of the item"
    )
    key: str | None = Field(None, description="an input shard's sample key, where the id was derived from it")
    # After `stages`, whose records hold their own: the report takes a line's last "quality" key for
    # this one (workers/quality_report.py; tested there).
    quality: QualityRecord | None = Field(None, description="the scores of the last scored stage's output")

    @model_serializer(mode="wrap")
    def _only_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The rows of a job that reads no shards and scores nothing stay as they were.
        return without_none(handler(self), "key", "quality")


SCORE_COLUMNS = ("clip_score", "input_similarity", "phash", "low_score", "score_seed")


def score_columns(quality: QualityRecord | None) -> dict[str, Any]:
    """An item's scores as flat columns, for tables that index a job's outputs without their images
    (the dataset's metadata.jsonl); empty when nothing scored it."""
    if quality is None:
        return {}
    return {
        "clip_score": quality.clip_score,
        "input_similarity": quality.input_similarity,
        "phash": quality.phash,
        "low_score": quality.low_score,
        "score_seed": quality.seed,
    }


class WorkerModel(_Message):
    """Handed from `imgjobs worker` to the Celery worker process it starts."""

    name: str
    entry: ModelEntry


def item_result(
    item: Item,
    defaults: Defaults,
    plan: StagePlan,
    params: ResolvedParams,
    records: list[StageRecord],
    outputs: dict[str, str],
    error: Exception | None = None,
    overrides: dict[str, Any] | None = None,
) -> ItemResult:
    """The results line of an item that ended at stage `plan` with these parameters."""
    return ItemResult(
        id=item.id,
        status="failed" if error else "succeeded",
        image=item.image,
        outputs=outputs,
        seed=resolve_seed(item, defaults),
        model=plan.model.name,
        prompt=base_prompt(item, defaults),
        negative_prompt=resolve_negative_prompt(item, plan.spec, defaults),
        params=params,
        stages=records,
        timings=summed_timings(records),
        error=ErrorInfo(type=type(error).__name__, message=str(error)) if error else None,
        failed_stage=plan.name if error else None,
        nsfw=any(record.nsfw for record in records),
        overrides=overrides,
        key=item.key,
        quality=next((record.quality for record in reversed(records) if record.quality), None),
    )


def summed_timings(records: list[StageRecord]) -> dict[str, float]:
    total: dict[str, float] = {}
    for record in records:
        for phase, seconds in record.timings.items():
            total[phase] = round(total.get(phase, 0.0) + seconds, 4)
    return total
