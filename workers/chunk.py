"""One run of one chunk, without Celery: ask the job's state owner whether and what to run, read
the items from their parts, run the stage engine with a recorder as its sink, then end the run and,
where it was the job's last work, send the job's end.

    start_chunk (jobstate)  ->  items part (+ handover part)  ->  StageEngine.run  ->  ChunkRecorder
        ->  end_chunk (jobstate)  ->  the job's end, when due, as a task of its own

A chunk whose job was cancelled since it was sent is dropped at start, at one script call; one of a
job that is no longer on the broker (pruned) likewise. A bad item fails alone. A retryable error
(StorageError) ends the run so that the task can run the chunk again (what was written is recorded
first); any other error fails the items of the run that are still open.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import redis

from jobstate.bits import unmask
from jobstate.meta import JobMeta
from jobstate.parts import Attempt, JobParts
from jobstate.storage import Storage, open_storage
from jobstate.store import JobStore
from schemas.errors import ImgjobsError, PoisonChunkError, StageError, TimeLimitError, UnknownJobError
from schemas.job import Item, ResolvedParams, overrides_of, resolve_params, with_overrides
from schemas.messages import Chunk, ChunkItem, ChunkSender, JobEnd, StageInput
from schemas.settings import Settings
from workers.engine import StageEngine, StageJob, WorkItem
from workers.events import ChunkInfo, emit
from workers.models import LoadedModel
from workers.recording import ChunkRecorder
from workers.shard_sink import ShardSink
from workers.stages.kinds import STAGES, Stage

log = logging.getLogger(__name__)

META_CACHE = 32  # jobs whose definition a worker keeps, by run


@dataclass(frozen=True)
class WorkerContext:
    """What a worker process holds for the life of its model: the same for every chunk it runs."""

    model: LoadedModel
    settings: Settings
    store: JobStore
    send_chunk: ChunkSender
    send_end: Callable[[JobEnd], None]
    open_storage: Callable[[str, str], Storage] = open_storage
    # What the task runner raises at a chunk's soft time limit (Celery's SoftTimeLimitExceeded); kept
    # apart from bugs so that its items fail with a reason that says what to change.
    time_limits: tuple[type[BaseException], ...] = ()
    stages: Mapping[str, Stage] = field(default_factory=lambda: STAGES)  # what runs each stage kind


class RetryChunk(Exception):
    """The run stopped on a retryable error; the task runs the chunk again."""

    def __init__(self, error: ImgjobsError) -> None:
        super().__init__(str(error))
        self.error = error


_definitions: OrderedDict[tuple[str, str], JobMeta] = OrderedDict()


def _definition(store: JobStore, chunk: Chunk) -> JobMeta | None:
    """The job's meta as far as it never changes (its spec, recipe and size), read once per run of
    a job id; None when the chunk's run of the job is not on the broker."""
    key = (chunk.job_id, chunk.run_id)
    if key in _definitions:
        _definitions.move_to_end(key)
        return _definitions[key]
    try:
        meta = store.meta(chunk.job_id)
    except UnknownJobError:
        return None
    if meta.run_id != chunk.run_id:
        return None
    _definitions[key] = meta
    while len(_definitions) > META_CACHE:
        _definitions.popitem(last=False)
    return meta


def work_items(parts: JobParts, meta: JobMeta, chunk: Chunk, slots: tuple[int, ...]) -> list[WorkItem]:
    """The chunk's items to run at its stage: each from its part, with what the stage before handed
    over."""
    plan = meta.recipe[chunk.stage_index]
    defaults = meta.spec.defaults
    items = parts.items(chunk.part)
    if chunk.overrides:
        running = set(slots)
        items = [
            with_overrides(item, chunk.overrides) if slot in running else item
            for slot, item in enumerate(items)
        ]
    if chunk.stage_index == 0:
        members = {
            slot: ChunkItem(
                item=items[slot],
                input=StageInput(kind="image", uri=items[slot].image)
                if items[slot].image
                else StageInput(kind="none"),
                overrides=chunk.overrides,
            )
            for slot in slots
        }
    else:
        handed = {item.slot: item for item in parts.handover(chunk.handover_part or "")}
        members = {
            slot: ChunkItem(
                item=items[slot],
                input=handed[slot].input,
                outputs=handed[slot].outputs,
                stages=handed[slot].stages,
                overrides=chunk.overrides,
            )
            for slot in slots
            if slot in handed
        }
    first = meta.positions(chunk.part).start
    resolved: dict[tuple[object, ...], ResolvedParams] = {}

    def params_of(item: Item) -> ResolvedParams:
        key = overrides_of(item)  # most of a chunk shares one set
        if key not in resolved:
            resolved[key] = resolve_params(item, plan.spec, defaults)
        return resolved[key]

    return [
        WorkItem(position=first + slot, slot=slot, member=member, params=params_of(member.item))
        for slot, member in members.items()
    ]


def process_chunk(chunk: Chunk, ctx: WorkerContext, retries: int = 0, may_retry: bool = False) -> None:
    """Run the chunk; with `may_retry`, a retryable error raises RetryChunk instead of failing items."""
    meta = _definition(ctx.store, chunk)
    start = (
        ctx.store.start_chunk(meta, chunk, retries, unmask(chunk.slots) if chunk.slots else b"")
        if meta
        else None
    )
    if meta is None or start is None or start.verdict == "unknown":
        # A redelivered chunk of a job pruned since: its items have nowhere to be recorded.
        log.warning("chunk %s: job %s is not on this broker (pruned?); dropped", chunk.chunk_id, chunk.job_id)
        return
    if start.verdict == "dropped":
        log.info("chunk %s: job %s was cancelled; dropped", chunk.chunk_id, chunk.job_id)
        if start.end_round is not None:
            ctx.send_end(JobEnd(job_id=chunk.job_id, run_id=chunk.run_id, round=start.end_round))
        return
    plan = meta.recipe[chunk.stage_index]
    info = ChunkInfo(
        chunk.job_id, chunk.chunk_id, plan.model.name, plan.name, len(start.slots), start.delivery
    )
    storage = ctx.open_storage(meta.output, meta.job_id)
    parts = JobParts(storage, meta.run_id)
    attempt = Attempt(chunk.round, chunk.stage_index, retries, start.delivery)
    chunk_recorder = ChunkRecorder(ctx.store, parts, storage, meta, chunk, attempt, info, ctx.send_chunk)
    recorder: ChunkRecorder | ShardSink = chunk_recorder
    shards: ShardSink | None = None
    if meta.spec.sharded and chunk.stage_index == meta.last_stage:
        # The last stage's outputs go to the part's shard, recorded once it is published.
        recorder = shards = ShardSink(chunk_recorder, ctx.store, storage, meta, chunk)
    job = StageJob(
        recipe=meta.recipe, defaults=meta.spec.defaults, dataset=meta.spec.dataset, folder=meta.local_folder
    )
    engine = StageEngine(
        ctx.model,
        ctx.settings,
        storage,
        job,
        chunk.stage_index,
        info,
        retry_inputs=may_retry,
        spool=shards.spool if shards is not None else None,
        stages=ctx.stages,
    )
    started = time.perf_counter()
    error: ImgjobsError | None = None
    if start.slots:
        log.info(
            "chunk %s: %s, %d item(s), delivery %d",
            chunk.chunk_id,
            plan.name,
            len(start.slots),
            start.delivery,
        )
        emit.chunk_started(info)
    items: list[WorkItem] | None = None
    try:
        if start.slots:
            items = work_items(parts, meta, chunk, start.slots)
            recorder.expect(items)
            if plan.model.name != ctx.model.name:
                error = StageError(
                    f"chunk for model {plan.model.name!r} reached the worker of {ctx.model.name!r}"
                )
            elif start.delivery > ctx.settings.max_deliveries:
                message = (
                    f"delivered {start.delivery} times; its worker died each time (IMGJOBS_MAX_DELIVERIES)"
                )
                log.error("chunk %s: dead-lettered: %s", chunk.chunk_id, message)
                error = PoisonChunkError(message)
            else:
                engine.run(items, recorder)
                if shards is not None:
                    shards.close()  # here, so that storage failing to take the shard retries the chunk
    except ImgjobsError as exc:
        if exc.retryable and may_retry:
            # Hand over what this run finished, where storage takes it; what it cannot hand over stays
            # open, and the retry runs it again.
            with contextlib.suppress(ImgjobsError):
                recorder.close()
            ctx.store.end_chunk(chunk, retries)
            raise RetryChunk(exc) from exc
        log.error("chunk %s: failing its unfinished items: %s", chunk.chunk_id, exc)
        error = exc
    except (redis.ConnectionError, redis.TimeoutError):
        raise  # the task requeues the chunk; nothing here can be recorded
    except ctx.time_limits:
        log.error("chunk %s: stopped at its soft time limit", chunk.chunk_id)
        error = TimeLimitError(
            "its chunk ran past the soft time limit (IMGJOBS_TASK_TIME_LIMIT_S) before it finished; "
            "a longer limit or a smaller chunk_size lets it finish"
        )
    except Exception as exc:
        # Unexpected: still account for every item, so the job ends instead of hanging.
        log.exception("chunk %s: unexpected error", chunk.chunk_id)
        error = StageError(f"{type(exc).__name__}: {exc}")
    try:
        recorder.close()
    except ImgjobsError as exc:
        error = error or exc  # what it would have handed over fails below
    if error is not None and items is None:
        # Its items could not even be read: they end failed with no row, and the job's end says why.
        first = meta.positions(chunk.part).start
        ctx.store.note_unrecorded(chunk, f"its chunk's items could not be read: {error}")
        ctx.store.finish_items(chunk, plan.name, [(first + slot, True) for slot in start.slots])
    elif error is not None:
        failure = error
        recorder.fail_open(lambda work: engine.failed(work, failure))
    end_round = ctx.store.end_chunk(chunk, retries)
    emit.chunk_done(info, time.perf_counter() - started, engine.busy_s, engine.unet_s)
    if end_round is not None:
        ctx.send_end(JobEnd(job_id=chunk.job_id, run_id=chunk.run_id, round=end_round))
