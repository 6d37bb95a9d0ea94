"""Item state transitions and job completion, written by workers into Redis.

Every transition runs as one Lua script so the per-state counts always add up to the total,
whoever else is writing. The worker whose transition finishes the last item writes the job's results.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import redis

from schemas import keys
from schemas.job import Item
from schemas.messages import ItemResult
from schemas.progress import ItemState

RESULTS_BATCH = 1000
OPEN_STATES = (ItemState.PENDING, ItemState.RUNNING)

# KEYS: meta hash. ARGV: time. The job's first start, recorded only while the job exists (not pruned).
_MARK_STARTED = """
if redis.call('HEXISTS', KEYS[1], 'total') == 1 then redis.call('HSETNX', KEYS[1], 'started_at', ARGV[1]) end
"""

# KEYS: counts hash, meta hash. ARGV: time, results URI, report URI. Sets finished_at only while no
# item is pending or running, so a finalize racing `imgjobs retry` cannot close a reopened job; and
# only while the job exists, so a finalize racing `imgjobs prune` leaves no stray meta hash.
_MARK_FINISHED = """
if redis.call('HEXISTS', KEYS[2], 'total') == 0 then return 0 end
local open = redis.call('HMGET', KEYS[1], 'pending', 'running')
if tonumber(open[1] or 0) + tonumber(open[2] or 0) > 0 then return 0 end
redis.call('HSET', KEYS[2], 'finished_at', ARGV[1], 'results', ARGV[2], 'report', ARGV[3])
return 1
"""


class JobProgress:
    def __init__(self, client: redis.Redis, job_id: str) -> None:
        self.client = client
        self.job_id = job_id
        self._transition = client.register_script(keys.TRANSITION_SCRIPT)
        self._mark_finished = client.register_script(_MARK_FINISHED)
        self._mark_started = client.register_script(_MARK_STARTED)
        self._keys = [keys.job_items(job_id), keys.job_counts(job_id), keys.job_results(job_id)]

    def _move_all(self, moves: list[tuple[str, ItemState, str]], allowed: Iterable[ItemState]) -> list[int]:
        """Each (item id, new state, result) through the transition script, in one call."""
        if not moves:
            return []
        args = keys.transition_args(
            [state.value for state in allowed], [(item_id, to.value, result) for item_id, to, result in moves]
        )
        return [int(outcome) for outcome in self._transition(keys=self._keys, args=args)]

    def start(self, item_ids: Iterable[str], stage_index: int) -> list[str]:
        """Mark items running; returns those this stage should work on. Finished items, and items
        already handed past this stage, are skipped, so a chunk delivered twice never recomputes or
        overwrites them; running ones were orphaned by a lost worker and are taken over."""
        self._mark_started(keys=[keys.job_meta(self.job_id)], args=[time.time()])
        candidates = list(item_ids)
        moved = self._move_all([(i, ItemState.RUNNING, "") for i in candidates], OPEN_STATES)
        ids = [i for i, outcome in zip(candidates, moved, strict=True) if outcome >= 0]
        if not ids:
            return []
        passed = self.client.hmget(keys.job_stage(self.job_id), ids)
        return [i for i, done in zip(ids, passed, strict=True) if done is None or int(done) < stage_index]

    def handed_over(self, item_ids: Iterable[str], stage_index: int) -> None:
        """Record that these items' next stage has its input and its chunk is queued."""
        mapping: dict[Any, Any] = dict.fromkeys(item_ids, stage_index)  # redis-py types keys invariantly
        if mapping:
            self.client.hset(keys.job_stage(self.job_id), mapping=mapping)

    def standing(self) -> Literal["open", "cancelled", "unknown"]:
        """Whether the job takes work: "unknown" once `imgjobs prune` deleted it."""
        total, cancelled_at = self.client.hmget(keys.job_meta(self.job_id), ["total", "cancelled_at"])
        if total is None:
            return "unknown"
        return "open" if cancelled_at is None else "cancelled"

    def count_delivery(self, delivery: str) -> int:
        """How many times the broker has handed out this chunk (this retry of it), this time included."""
        return int(self.client.hincrby(keys.job_deliveries(self.job_id), delivery, 1))

    def keep_for_retry(self, item: Item) -> None:
        self.client.hset(keys.job_inputs(self.job_id), item.id, item.model_dump_json())

    def stage_passed(self, stage: str, count: int) -> None:
        self.client.hincrby(keys.job_stages(self.job_id), stage, count)

    def finish(self, results: list[ItemResult]) -> list[bool]:
        """Record items' results; False where an item was not open (finished already, or unknown)."""
        moves = [(result.id, ItemState(result.status), result.model_dump_json()) for result in results]
        return [outcome >= 0 for outcome in self._move_all(moves, OPEN_STATES)]

    def open_at(self, item_ids: Iterable[str], stage_index: int) -> list[str]:
        """Items not finished and not yet handed past this stage: what this stage still owes."""
        ids = list(item_ids)
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(keys.job_items(self.job_id), ids)
        pipe.hmget(keys.job_stage(self.job_id), ids)
        states, passed = pipe.execute()
        open_states = (ItemState.PENDING.value, ItemState.RUNNING.value)
        return [
            item_id
            for item_id, state, done in zip(ids, states, passed, strict=True)
            if state in open_states and (done is None or int(done) < stage_index)
        ]

    def unfinalized(self) -> bool:
        """The job exists (not pruned), every item is finished, and it is not marked finished yet."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(keys.job_counts(self.job_id), [ItemState.PENDING.value, ItemState.RUNNING.value])
        pipe.hmget(keys.job_meta(self.job_id), ["total", "finished_at"])
        (pending, running), (total, finished) = pipe.execute()
        return total is not None and int(pending or 0) + int(running or 0) == 0 and finished is None

    def result_lines(self) -> Iterator[str]:
        """Each finished item's ItemResult JSON, in manifest order."""
        order_key, results_key = keys.job_order(self.job_id), keys.job_results(self.job_id)
        start = 0
        while ids := self.client.lrange(order_key, start, start + RESULTS_BATCH - 1):
            for line in self.client.hmget(results_key, ids):
                if line is not None:
                    yield line if isinstance(line, str) else line.decode()
            start += RESULTS_BATCH

    def mark_finished(self, results_uri: str, report_uri: str) -> bool:
        """Mark the job finished, unless items were opened again meanwhile (`imgjobs retry`)."""
        done = self._mark_finished(
            keys=[keys.job_counts(self.job_id), keys.job_meta(self.job_id)],
            args=[time.time(), results_uri, report_uri],
        )
        return bool(done)
