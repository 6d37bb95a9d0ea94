"""Dead letters and redrive: list a job's failed items, run them again, or cancel the job."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from pydantic import ValidationError

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
# Items moved per script call: a call blocks Redis while it runs (200,000 items took 0.65 s here).
MOVE_BATCH = 10_000


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
    stage. Items that succeeded stay as they are. Returns how many items were re-enqueued.

    Everything is read and planned before anything changes. Items move, and the job reopens, in one
    script per MOVE_BATCH items, so `imgjobs prune` either deletes the job before or keeps it. Should
    anything stop the retry after that (an error publishing the chunks, Ctrl-C), the items that have
    not started again go back to failed with their results, so running `imgjobs retry` again finds
    them. The job then stays open (not finished) until they are retried: its results are rewritten
    only by the workers. Only a Redis lost mid-retry can leave items pending with nothing queued."""
    meta = _meta(client, job_id)
    recipe = [StagePlan.model_validate(plan) for plan in json.loads(meta["recipe"])]
    spec = JobSpec.model_validate_json(meta["spec"])
    failed = {result.id: result for result in failures(client, job_id, reason)}
    if not failed:
        return 0
    members: list[tuple[ChunkItem, ResolvedParams]] = []
    for raw in client.hmget(keys.job_inputs(job_id), list(failed)):
        if raw is None:
            continue  # failed by a worker that predates redrive: nothing to run it from
        try:
            item = Item.model_validate_json(raw)
        except ValidationError:
            continue  # kept by a version whose items this one no longer reads: it stays failed
        members.append(
            (first_stage_item(item, Path("/")), resolve_params(item, recipe[0].spec, spec.defaults))
        )
    moved: list[tuple[ChunkItem, ResolvedParams]] = []
    passed: list[Any] = []  # the last stage each moved item had come through, once taken back
    try:
        # Batch by batch here, so that a retry stopped part-way knows which items it moved.
        for start in range(0, len(members), MOVE_BATCH):
            batch = members[start : start + MOVE_BATCH]
            outcomes = _move(
                client,
                job_id,
                ItemState.FAILED,
                [(member.item.id, ItemState.PENDING.value, "-") for member, _ in batch],
                reopen=True,
            )
            if not moved and all(outcome == -1 for outcome in outcomes):
                raise ImgjobsError(f"no job {job_id!r} on this broker (pruned meanwhile)")
            # Others (a second retry) may have moved some already.
            moved += [member for member, outcome in zip(batch, outcomes, strict=True) if outcome == 1]
        if not moved:
            return 0
        moved_ids = [member.item.id for member, _ in moved]
        # They run every stage again: take back the stages they had come through.
        stage_of = client.hmget(keys.job_stage(job_id), moved_ids)
        _count_stages(client, job_id, recipe, stage_of, -1)
        passed = stage_of
        client.hdel(keys.job_stage(job_id), *moved_ids)
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
        send_chunks(producer_app(settings, broker_url), group_into_chunks(moved, chunk_size, make))
    except BaseException as exc:
        if not moved:
            raise
        _put_back(
            client, job_id, recipe, [(member.item.id, failed[member.item.id]) for member, _ in moved], passed
        )
        if isinstance(exc, Exception):
            raise ImgjobsError(
                f"job {job_id}: the retry stopped ({exc}); its items are failed again: "
                f"run `imgjobs retry {job_id}` again"
            ) from exc
        raise
    return len(moved)


def _put_back(
    client: redis.Redis,
    job_id: str,
    recipe: list[StagePlan],
    items: list[tuple[str, ItemResult]],
    passed: list[Any],
) -> None:
    """Undo a stopped retry: items still pending go back to failed with their results, and the stages
    they had come through (where already taken back) are theirs again. An item a worker took meanwhile
    is left to it."""
    back = _move(
        client,
        job_id,
        ItemState.PENDING,
        [(item_id, ItemState.FAILED.value, result.model_dump_json()) for item_id, result in items],
    )
    if not passed:
        return
    restored = [
        (item_id, last)
        for (item_id, _), last, outcome in zip(items, passed, back, strict=True)
        if outcome == 1
    ]
    stages: dict[Any, Any] = {item_id: last for item_id, last in restored if last is not None}
    if stages:  # redis-py types mapping keys invariantly, hence Any
        client.hset(keys.job_stage(job_id), mapping=stages)
    _count_stages(client, job_id, recipe, [last for _, last in restored], +1)


def _move(
    client: redis.Redis,
    job_id: str,
    allowed: ItemState,
    moves: list[tuple[str, str, str]],
    reopen: bool = False,
) -> list[int]:
    """TRANSITION_SCRIPT's outcome per (item id, new state, result) move, MOVE_BATCH moves per call;
    with reopen, the job reopens in the call that moves its first item."""
    move = client.register_script(keys.TRANSITION_SCRIPT)
    state_keys = [keys.job_items(job_id), keys.job_counts(job_id), keys.job_results(job_id)]
    if reopen:
        state_keys.append(keys.job_meta(job_id))
    outcomes: list[int] = []
    for start in range(0, len(moves), MOVE_BATCH):
        args = keys.transition_args([allowed.value], moves[start : start + MOVE_BATCH])
        outcomes += [int(outcome) for outcome in move(keys=state_keys, args=args)]
    return outcomes


def _count_stages(
    client: redis.Redis, job_id: str, recipe: list[StagePlan], passed: list[Any], sign: int
) -> None:
    """Add sign to the count of each stage the items had come through (`passed`: last stage index)."""
    pipe = client.pipeline(transaction=False)
    for last in passed:
        for plan in recipe[: int(str(last)) + 1] if last is not None else []:
            pipe.hincrby(keys.job_stages(job_id), plan.name, sign)
    pipe.execute()
