"""Item state transitions and job completion, written by workers into Redis.

Every transition runs as one Lua script so the per-state counts always add up to the total,
whoever else is writing. The worker whose transition finishes the last item writes the job's results.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from schemas import keys
from schemas.messages import ItemResult
from schemas.progress import ItemState

RESULTS_BATCH = 1000

# KEYS: items hash, counts hash, results hash.  ARGV: item id, new state, result JSON or "",
# then the states the item may move from. Returns pending + running after the move, -1 for an
# unknown item, -2 when the item is in none of the allowed states (nothing changes then).
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return -1 end
local allowed = false
for i = 4, #ARGV do if ARGV[i] == current then allowed = true end end
if not allowed then return -2 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], current, -1)
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
if ARGV[3] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[3]) end
local open = redis.call('HMGET', KEYS[2], 'pending', 'running')
return tonumber(open[1] or 0) + tonumber(open[2] or 0)
"""

UNKNOWN_ITEM = -1
NOT_ALLOWED = -2


class JobProgress:
    def __init__(self, client: redis.Redis, job_id: str) -> None:
        self.client = client
        self.job_id = job_id
        self._transition = client.register_script(_TRANSITION)
        self._keys = [keys.job_items(job_id), keys.job_counts(job_id), keys.job_results(job_id)]

    def _move(self, item_id: str, to: ItemState, result: str, allowed: Iterable[ItemState]) -> int:
        return int(
            self._transition(keys=self._keys, args=[item_id, to.value, result, *[s.value for s in allowed]])
        )

    def start(self, item_ids: Iterable[str], stage_index: int) -> list[str]:
        """Mark items running; returns those this stage should work on. Finished items, and items
        already handed past this stage, are skipped, so a chunk delivered twice never recomputes or
        overwrites them; running ones were orphaned by a lost worker and are taken over."""
        self.client.hsetnx(keys.job_meta(self.job_id), "started_at", time.time())
        allowed = (ItemState.PENDING, ItemState.RUNNING)
        ids = [i for i in item_ids if self._move(i, ItemState.RUNNING, "", allowed) >= 0]
        if not ids:
            return []
        passed = self.client.hmget(keys.job_stage(self.job_id), ids)
        return [i for i, done in zip(ids, passed, strict=True) if done is None or int(done) < stage_index]

    def handed_over(self, item_ids: Iterable[str], stage_index: int) -> None:
        """Record that these items' next stage has its input and its chunk is queued."""
        mapping: dict[Any, Any] = dict.fromkeys(item_ids, stage_index)  # redis-py types keys invariantly
        if mapping:
            self.client.hset(keys.job_stage(self.job_id), mapping=mapping)

    def finish(self, result: ItemResult) -> bool:
        """Record an item's result; True when this was the job's last open item."""
        state = ItemState(result.status)
        remaining = self._move(
            result.id, state, result.model_dump_json(), (ItemState.PENDING, ItemState.RUNNING)
        )
        return remaining == 0

    def result_lines(self) -> Iterator[str]:
        """Each finished item's ItemResult JSON, in manifest order."""
        order_key, results_key = keys.job_order(self.job_id), keys.job_results(self.job_id)
        start = 0
        while ids := self.client.lrange(order_key, start, start + RESULTS_BATCH - 1):
            for line in self.client.hmget(results_key, ids):
                if line is not None:
                    yield line if isinstance(line, str) else line.decode()
            start += RESULTS_BATCH

    def mark_finished(self, results_uri: str, report_uri: str) -> None:
        self.client.hset(
            keys.job_meta(self.job_id),
            mapping={"finished_at": time.time(), "results": results_uri, "report": report_uri},
        )
