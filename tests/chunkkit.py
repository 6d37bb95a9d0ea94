"""Running the workers' own chunk code in the test process, against a real Redis: a job created
through jobstate.seed (the same parts and state `imgjobs submit` makes), chunks run by
workers.chunk.process_chunk, handed-over chunks collected, and the job's end written in-process
when it is due."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from jobstate import layout
from jobstate.meta import JobMeta
from jobstate.seed import seed_job
from jobstate.storage import Storage, open_storage
from jobstate.store import JobStore
from kits.helpers import CPU, stage_plan
from schemas.job import IMAGES, Defaults, Item, OutputFormat, Outputs, ResolvedParams
from schemas.messages import Chunk, ItemResult, JobEnd, StagePlan
from schemas.registry import ResolvedModel
from schemas.settings import Settings
from workers.chunk import WorkerContext, process_chunk
from workers.job_end import EndContext, end_job
from workers.models import LoadedModel
from workers.stages.common import StageBatch, StageOutput
from workers.stages.kinds import STAGES, Stage

PARAMS = ResolvedParams(size=(16, 16))


def resize_recipe(stages: int = 1, model: ResolvedModel = CPU) -> list[StagePlan]:
    """`stages` resize stages on the cpu model, each handing its image to the next."""
    return [
        stage_plan(
            {"type": "resize"},
            model,
            index=index,
            handover="image" if index < stages - 1 else "none",
            save=() if index < stages - 1 else ("image",),
        )
        for index in range(stages)
    ]


def watched(kind: str, before: Callable[[StageBatch], None]) -> Mapping[str, Stage]:
    """The engine's stages, with the `kind` stage calling `before(batch)` first: a test's way to see,
    slow or fail that stage's calls, which otherwise run unchanged."""
    stage = STAGES[kind]

    def run(
        model: LoadedModel,
        plan: StagePlan,
        params: ResolvedParams,
        batch: StageBatch,
        outputs: Outputs = IMAGES,
    ) -> StageOutput:
        before(batch)
        return stage(model, plan, params, batch, outputs)

    return {**STAGES, kind: run}


@dataclass
class Harness:
    """One job and the context its chunks run in; `sent` collects the chunks handed to next stages,
    `ends` the job's ends sent (written at once unless `write_ends` is off). `stages` runs each stage
    kind: a test may wrap one to see or change its calls."""

    client: redis.Redis
    store: JobStore
    meta: JobMeta
    chunks: list[Chunk]
    model: LoadedModel
    settings: Settings
    storage_for: Callable[[str, str], Storage]
    write_ends: bool = True
    time_limits: tuple[type[BaseException], ...] = ()
    stages: Mapping[str, Stage] = field(default_factory=lambda: STAGES)
    sent: list[Chunk] = field(default_factory=list)
    ends: list[JobEnd] = field(default_factory=list)

    @property
    def ctx(self) -> WorkerContext:
        return WorkerContext(
            model=self.model,
            settings=self.settings,
            store=self.store,
            send_chunk=lambda chunk, _queue, _priority: self.sent.append(chunk),
            send_end=self._send_end,
            open_storage=self.storage_for,
            time_limits=self.time_limits,
            stages=self.stages,
        )

    @property
    def end_ctx(self) -> EndContext:
        return EndContext(store=self.store, settings=self.settings, open_storage=self.storage_for)

    def _send_end(self, end: JobEnd) -> None:
        self.ends.append(end)
        if self.write_ends:
            end_job(end, self.end_ctx, token=f"end-{len(self.ends)}")

    def run(self, chunk: Chunk, retries: int = 0, may_retry: bool = False) -> None:
        process_chunk(chunk, self.ctx, retries, may_retry)

    def run_all(self) -> None:
        """Every first-stage chunk, then every chunk handed over, until none is left."""
        for chunk in self.chunks:
            self.run(chunk)
        while self.sent:
            self.run(self.sent.pop(0))

    @property
    def job_dir(self) -> Path:
        return Path(layout.job_root(self.meta.output, self.meta.job_id))

    def results(self) -> dict[str, ItemResult]:
        lines = (self.job_dir / layout.RESULTS).read_text().splitlines()
        return {result.id: result for result in map(ItemResult.model_validate_json, lines)}


def harness(
    client: redis.Redis,
    items: Sequence[Item],
    output: Path,
    *,
    recipe: Sequence[StagePlan] | None = None,
    model: LoadedModel | None = None,
    settings: Settings | None = None,
    storage: Storage | None = None,
    job_id: str = "job",
    chunk_size: int | None = None,
    defaults: Defaults | None = None,
    dataset: bool = False,
    output_format: OutputFormat = "files",
) -> Harness:
    """A job of `items` (absolute paths) on Redis and in `output`; the cpu model's resize stage unless
    `recipe` says otherwise. `storage` replaces the job's storage everywhere (to inject faults)."""
    storage_for: Callable[[str, str], Storage] = (
        open_storage if storage is None else (lambda _output, _job_id: storage)
    )
    seeded = seed_job(
        client,
        items,
        recipe or resize_recipe(),
        str(output),
        job_id=job_id,
        chunk_size=chunk_size,
        defaults=defaults or Defaults(size=PARAMS.size),
        dataset=dataset,
        output_format=output_format,
        storage_for=storage_for,
    )
    return Harness(
        client=client,
        store=JobStore(client),
        meta=seeded.meta,
        chunks=seeded.chunks,
        model=model or LoadedModel("cpu", CPU.entry),
        settings=settings or Settings(),
        storage_for=storage_for,
    )
