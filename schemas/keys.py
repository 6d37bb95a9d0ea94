"""Every Redis key imgjobs uses, in one place. Celery's own keys (the queues `imgjobs.<model>`,
kombu's `unacked` bookkeeping) are named by Celery and not listed here.

    imgjobs:jobs                      set    every job id ever submitted (a job joins it when created,
                                             before its items are recorded)
    imgjobs:job:<id>:meta             hash   name, output, total, spec, submitted_at, started_at, finished_at
    imgjobs:job:<id>:counts           hash   pending / running / succeeded / failed -> count (pending
                                             is the item count at submit; a state absent is 0)
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
A job's keys stay until `imgjobs prune` (or a schedules file's `keep_finished_jobs_for`) deletes them,
some time after the job finished.
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


def job_keys(job_id: str) -> list[str]:
    """Every key of one job (not its id in JOBS): what `imgjobs prune` deletes."""
    return [
        job_meta(job_id),
        job_counts(job_id),
        job_items(job_id),
        job_order(job_id),
        job_results(job_id),
        job_stage(job_id),
        job_inputs(job_id),
        job_deliveries(job_id),
        job_stages(job_id),
    ]


def schedule_seen(name: str) -> str:
    return f"{PREFIX}:schedule:{name}:seen"


# The one way items change state, shared by the producer (retry) and the workers.
# KEYS: items hash, counts hash, results hash, and optionally the job's meta hash.  ARGV: n, the n states
# items may move from, then for each item its id, its new state and its result JSON ("" keeps the stored
# result, "-" deletes it). Returns, per item, 1 when it moved, -1 for an unknown item, -2 when it is in
# none of the allowed states (it is left as it is then). One script, so the per-state counts always add
# up to the total; many items per call, so a worker records a whole batch in one round trip.
# With the meta hash (`imgjobs retry`): items of a job that no longer exists (pruned) are all unknown,
# and a move reopens the job (deletes finished_at and cancelled_at) in the same step, so `imgjobs prune`
# either deletes the job before or keeps it.
TRANSITION_SCRIPT = """
local allowed, first = {}, 2 + tonumber(ARGV[1])
for i = 2, first - 1 do allowed[ARGV[i]] = true end
local exists = not KEYS[4] or redis.call('HEXISTS', KEYS[4], 'total') == 1
local outcomes, moved = {}, 0
for i = first, #ARGV, 3 do
  local id, to, result = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local current = exists and redis.call('HGET', KEYS[1], id)
  if not current then outcomes[#outcomes + 1] = -1
  elseif not allowed[current] then outcomes[#outcomes + 1] = -2
  else
    redis.call('HSET', KEYS[1], id, to)
    redis.call('HINCRBY', KEYS[2], current, -1)
    redis.call('HINCRBY', KEYS[2], to, 1)
    if result == '-' then redis.call('HDEL', KEYS[3], id)
    elseif result ~= '' then redis.call('HSET', KEYS[3], id, result) end
    outcomes[#outcomes + 1] = 1
    moved = moved + 1
  end
end
if KEYS[4] and moved > 0 then redis.call('HDEL', KEYS[4], 'finished_at', 'cancelled_at') end
return outcomes
"""


def transition_args(allowed: list[str], moves: list[tuple[str, str, str]]) -> list[str]:
    """TRANSITION_SCRIPT's ARGV for (item id, new state, result) moves from the allowed states."""
    return [str(len(allowed)), *allowed, *(part for move in moves for part in move)]
