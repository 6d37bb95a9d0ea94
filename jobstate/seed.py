"""Creating a job without the producer: for tests and benchmarks that run the worker's chunk code
directly. The job is real, in Redis and in storage, made by the same JobParts and JobStore calls
that `imgjobs submit` makes; only validating a manifest and sending chunks are left out."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from jobstate.meta import JobMeta, chunk_size_for
from jobstate.parts import JobParts
from jobstate.storage import Storage, open_storage
from jobstate.store import JobStore
from schemas.job import Defaults, Item, JobSpec, OutputFormat
from schemas.messages import Chunk, StagePlan


@dataclass(frozen=True)
class SeededJob:
    meta: JobMeta
    chunks: list[Chunk]  # the first stage's, one per part, as submit sends them


def seed_job(
    client: redis.Redis,
    items: Sequence[Item],
    recipe: Sequence[StagePlan],
    output: str,
    *,
    job_id: str = "job",
    defaults: Defaults | None = None,
    chunk_size: int | None = None,
    dataset: bool = False,
    output_format: OutputFormat = "files",
    storage_for: Callable[[str, str], Storage] = open_storage,
) -> SeededJob:
    """Write the items' parts and create the job; local paths in `items` must be absolute already."""
    spec = JobSpec(
        version=1,
        name="seeded",
        output=output,
        items="items.jsonl",
        defaults=defaults or Defaults(),
        stages=[plan.spec for plan in recipe],
        dataset=dataset,
        output_format=output_format,
    )
    meta = JobMeta(
        job_id=job_id,
        name=spec.name,
        output=output,
        total=len(items),
        chunk_size=chunk_size or chunk_size_for(recipe, None),
        run_id=secrets.token_hex(8),
        spec=spec,
        recipe=tuple(recipe),
        submitted_at=time.time(),
    )
    parts = JobParts(storage_for(output, job_id), meta.run_id)
    for part in range(meta.parts):
        lines = (
            items[position].model_dump_json(exclude_none=True) + "\n" for position in meta.positions(part)
        )
        parts.put_items(part, "".join(lines).encode("utf-8"))
    store = JobStore(client)
    created, meta = store.create(meta)
    if not created:
        raise ValueError(f"job {job_id!r} exists on this broker already")
    store.record_sent(meta, meta.parts, enqueued=True)
    return SeededJob(meta, [meta.first_chunk(part) for part in range(meta.parts)])
