"""Every Redis key imgjobs uses, in one place. Celery's own keys (the queues `imgjobs.<model>`,
kombu's `unacked` bookkeeping) are named by Celery and not listed here.

    imgjobs:jobs                      set    every job id ever submitted
    imgjobs:job:<id>:meta             hash   name, output, total, spec, submitted_at, started_at, finished_at
    imgjobs:job:<id>:counts           hash   pending / running / succeeded / failed -> count
    imgjobs:job:<id>:items            hash   item id -> ItemState
    imgjobs:job:<id>:order            list   item ids in manifest order (results.jsonl follows it)
    imgjobs:job:<id>:results          hash   item id -> ItemResult JSON, once the item is finished
    imgjobs:job:<id>:stage            hash   item id -> index of the last stage handed to the next one
    imgjobs:job:<id>:inputs           hash   item id -> the item as submitted (Item JSON), kept while it is
                                             failed, so `imgjobs retry` can run it again
    imgjobs:job:<id>:deliveries       hash   chunk id + retry number -> times the broker delivered it
    imgjobs:job:<id>:stages           hash   stage name (s0-img2img, ...) -> items that came through it

    imgjobs:schedule:<name>:seen      set    "<uri>|<etag or content hash>" of every source object a
                                             schedule has submitted (RedBeat keeps its own state
                                             under redbeat:)

The meta hash also holds `recipe` (the planned stages, JSON) and `cancelled_at` once cancelled.
"""

from __future__ import annotations

PREFIX = "imgjobs"

JOBS = f"{PREFIX}:jobs"


def job_meta(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:meta"


def job_counts(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:counts"


def job_items(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:items"


def job_order(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:order"


def job_results(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:results"


def job_stage(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:stage"


def job_inputs(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:inputs"


def job_deliveries(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:deliveries"


def job_stages(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:stages"


def schedule_seen(name: str) -> str:
    return f"{PREFIX}:schedule:{name}:seen"


# The one way an item changes state, shared by the producer (retry) and the workers.
# KEYS: items hash, counts hash, results hash.  ARGV: item id, new state, result JSON ("" keeps the
# stored result, "-" deletes it), then the states the item may move from. Returns pending + running
# after the move, -1 for an unknown item, -2 when the item is in none of the allowed states (nothing
# changes then). One script, so the per-state counts always add up to the total.
TRANSITION_SCRIPT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return -1 end
local allowed = false
for i = 4, #ARGV do if ARGV[i] == current then allowed = true end end
if not allowed then return -2 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], current, -1)
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
if ARGV[3] == '-' then redis.call('HDEL', KEYS[3], ARGV[1])
elseif ARGV[3] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[3]) end
local open = redis.call('HMGET', KEYS[2], 'pending', 'running')
return tonumber(open[1] or 0) + tonumber(open[2] or 0)
"""
