"""Planning a submission without the broker: the job and its items recorded in Redis, and the
first stage's chunks. Free of Celery, so the GPU benchmark (whose machine has no Celery) runs the
producer's own planning; jobs/producer.py sends what this plans.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import redis

from jobs.manifest import ValidatedJob, iter_items
from schemas import keys
from schemas.job import IMAGE_URI_SCHEMES, Item, ResolvedParams
from schemas.messages import Chunk, ChunkItem, StagePlan
from schemas.progress import ItemState

REGISTER_BATCH = 10_000


def _absolute(uri: str | None, items_dir: Path) -> str | None:
    if uri is None or uri.startswith(IMAGE_URI_SCHEMES):
        return uri
    path = os.path.expanduser(uri)
    if os.path.isabs(path):
        return path
    joined = os.path.join(items_dir, path)
    # Lexical normalising costs no system calls (resolve() costs one per path component, per item,
    # most of a local manifest's submit time); it differs from the file system only where ".."
    # follows a symbolic link, so only such paths are resolved.
    return str(Path(joined).resolve()) if ".." in path.split(os.sep) else os.path.normpath(joined)


def first_stage_item(item: Item, items_dir: Path) -> ChunkItem:
    """The item as the first stage reads it, its local paths made absolute for workers; items_dir is
    already resolved."""
    paths = {
        "image": _absolute(item.image, items_dir),
        "control_image": _absolute(item.control_image, items_dir),
    }
    if paths != {"image": item.image, "control_image": item.control_image}:
        item = item.model_copy(update=paths)
    stage_input = {"kind": "image", "uri": item.image} if item.image else {"kind": "none"}
    return ChunkItem.model_validate({"item": item, "input": stage_input})


def chunk_size_for(recipe: Sequence[StagePlan], override: int | None) -> int:
    """Items per chunk: the override (IMGJOBS_CHUNK_SIZE) where set, else the smallest chunk_size among
    the job's models, since a chunk carries its items through every stage."""
    return override or min(stage.model.entry.items_per_chunk for stage in recipe)


def group_into_chunks(
    members: Iterable[tuple[ChunkItem, ResolvedParams]],
    chunk_size: int,
    make: Callable[[ResolvedParams, list[ChunkItem]], Chunk],
) -> Iterator[Chunk]:
    """Chunks of up to chunk_size items with equal parameters, in order within each group; full chunks
    leave as they fill, partial ones at the end."""
    open_chunks: dict[ResolvedParams, list[ChunkItem]] = {}
    for member, params in members:
        group = open_chunks.setdefault(params, [])
        group.append(member)
        if len(group) >= chunk_size:
            yield make(params, open_chunks.pop(params))
    for params, group in open_chunks.items():
        yield make(params, group)


Members = Iterator[tuple[ChunkItem, ResolvedParams]]


def plan_chunks(
    job: ValidatedJob, chunk_size: int, wrap: Callable[[Members], Members] = lambda members: members
) -> Iterator[Chunk]:
    """The first stage's chunks; wrap sees every item as it is read, before its chunk is made."""
    counter = itertools.count()

    def make(params: ResolvedParams, members: list[ChunkItem]) -> Chunk:
        return Chunk(
            job_id=job.job_id,
            chunk_id=f"{job.job_id}:s0:c{next(counter)}",
            output=job.output,
            stage_index=0,
            recipe=list(job.recipe),
            defaults=job.spec.defaults,
            params=params,
            items=members,
            dataset=job.spec.dataset,
        )

    items_dir = job.items_path.parent.resolve()
    members = ((first_stage_item(item, items_dir), params) for item, params in iter_items(job))
    yield from group_into_chunks(wrap(members), chunk_size, make)


# KEYS: meta hash, counts hash, jobs set. ARGV: job id, item count, then the meta hash as field, value
# pairs. Creates the job only where it does not exist, in one step, so two producers submitting the same
# job cannot both create it. Every item counts as pending from the start (the other states count up
# from nothing); the items themselves are recorded as they stream.
_CREATE_JOB = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('HSET', KEYS[2], 'pending', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""


def create_job(client: redis.Redis, job: ValidatedJob) -> Literal["new", "resume", "done"]:
    created = client.eval(
        _CREATE_JOB,
        3,
        keys.job_meta(job.job_id),
        keys.job_counts(job.job_id),
        keys.JOBS,
        job.job_id,
        job.total,
        *itertools.chain.from_iterable(job.meta().items()),
    )
    if created:
        return "new"
    return "done" if client.hexists(keys.job_meta(job.job_id), "enqueued_at") else "resume"


# KEYS: items hash, order list. ARGV: the pending state, the manifest position of the first id, then
# ids in manifest order. Records each id as pending where it has no state yet, and appends it to the
# order list when the list ends just before its position. Every producer of a job writes the same thing
# at the same place, so one that resumes a dead submission, or runs beside another submit of the same
# job, never resets a state a worker has moved on nor repeats an id in the order (results.jsonl
# follows it).
_RECORD_ITEMS = """
local length = redis.call('LLEN', KEYS[2])
local position = tonumber(ARGV[2])
for i = 3, #ARGV do
  redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[1])
  if position == length then
    redis.call('RPUSH', KEYS[2], ARGV[i])
    length = length + 1
  end
  position = position + 1
end
return length
"""


class Registration:
    """Records items, in batches of up to REGISTER_BATCH, through _RECORD_ITEMS."""

    def __init__(self, client: redis.Redis, job_id: str) -> None:
        self.record = client.register_script(_RECORD_ITEMS)
        self.keys = [keys.job_items(job_id), keys.job_order(job_id)]
        self.position = 0
        self.ids: list[str] = []

    def add(self, item_id: str) -> None:
        self.ids.append(item_id)
        if len(self.ids) >= REGISTER_BATCH:
            self.flush()  # early is harmless; it bounds memory when many chunks fill slowly

    def flush(self) -> None:
        if self.ids:
            self.record(keys=self.keys, args=[ItemState.PENDING.value, self.position, *self.ids])
            self.position += len(self.ids)
            self.ids = []
