"""Dead letters and redrive: list a job's failed items, run them again, or cancel the job."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from jobs.broker import producer_app
from jobs.plan import chunk_size_for, first_stage_item, group_into_chunks
from jobs.producer import send_chunks
from schemas import keys
from schemas.errors import ImgjobsError
from schemas.job import Item, JobSpec, ResolvedParams, resolve_params
from schemas.messages import Chunk, ChunkItem, ItemResult, StagePlan
from schemas.progress import ItemState
from schemas.settings import Settings

SCAN_BATCH = 1000


def _meta(client: redis.Redis, job_id: str) -> dict[str, str]:
    # Clients here decode responses, so keys and values are str.
    meta = {str(key): str(value) for key, value in client.hgetall(keys.job_meta(job_id)).items()}
    if not meta:
        raise ImgjobsError(f"no job {job_id!r} on this broker")
    return meta


def failures(client: redis.Redis, job_id: str, reason: str | None = None) -> Iterator[ItemResult]:
    """The job's failed items, with their reasons; only those of type `reason` when given."""
    _meta(client, job_id)
    for _item_id, line in client.hscan_iter(keys.job_results(job_id), count=SCAN_BATCH):
        result = ItemResult.model_validate_json(line)
        if result.status == "failed" and (reason is None or (result.error and result.error.type == reason)):
            yield result


def cancel(client: redis.Redis, job_id: str) -> None:
    """Workers drop the job's queued chunks from now on; chunks already running finish."""
    _meta(client, job_id)
    client.hsetnx(keys.job_meta(job_id), "cancelled_at", time.time())


def retry(client: redis.Redis, settings: Settings, broker_url: str, job_id: str, reason: str | None) -> int:
    """Move failed items (of type `reason`, or all) back to pending and run them again from the first
    stage. Items that succeeded stay as they are. Returns how many items were re-enqueued."""
    meta = _meta(client, job_id)
    recipe = [StagePlan.model_validate(plan) for plan in json.loads(meta["recipe"])]
    spec = JobSpec.model_validate_json(meta["spec"])
    item_ids = [result.id for result in failures(client, job_id, reason)]
    if not item_ids:
        return 0
    stored = client.hmget(keys.job_inputs(job_id), item_ids)
    move = client.register_script(keys.TRANSITION_SCRIPT)
    state_keys = [keys.job_items(job_id), keys.job_counts(job_id), keys.job_results(job_id)]
    members: list[tuple[ChunkItem, ResolvedParams]] = []
    for item_id, raw in zip(item_ids, stored, strict=True):
        if raw is None:
            continue  # failed by a worker that predates redrive: nothing to run it from
        moved = move(
            keys=state_keys,
            args=keys.transition_args([ItemState.FAILED.value], [(item_id, ItemState.PENDING.value, "-")]),
        )
        if int(moved[0]) < 0:
            continue  # someone else moved it already
        item = Item.model_validate_json(raw)
        members.append(
            (first_stage_item(item, Path("/")), resolve_params(item, recipe[0].spec, spec.defaults))
        )
    if not members:
        return 0
    moved = [member.item.id for member, _ in members]
    # They run every stage again: take back the stages they had come through.
    passed = client.hmget(keys.job_stage(job_id), moved)
    pipe = client.pipeline(transaction=False)
    for last in passed:
        for plan in recipe[: int(str(last)) + 1] if last is not None else []:
            pipe.hincrby(keys.job_stages(job_id), plan.name, -1)
    pipe.hdel(keys.job_stage(job_id), *moved)
    pipe.execute()
    # The job is open again: it finishes, and writes its results, when these items do.
    client.hdel(keys.job_meta(job_id), "finished_at", "cancelled_at")
    round_number = client.hincrby(keys.job_meta(job_id), "retries", 1)
    counter = itertools.count()

    def make(params: ResolvedParams, group: list[ChunkItem]) -> Chunk:
        return Chunk(
            job_id=job_id,
            chunk_id=f"{job_id}:r{round_number}:s0:c{next(counter)}",
            output=meta["output"],
            stage_index=0,
            recipe=recipe,
            defaults=spec.defaults,
            params=params,
            items=group,
            dataset=spec.dataset,
        )

    chunk_size = chunk_size_for(recipe, settings.chunk_size)
    send_chunks(producer_app(settings, broker_url), group_into_chunks(members, chunk_size, make))
    return len(moved)
