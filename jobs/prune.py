"""`imgjobs prune`: forget jobs in Redis some time after they finish.

Every job keeps its item states, results and inputs in Redis until it is pruned, so a broker that runs
nightly jobs for a year grows without bound (and `imgjobs metrics` reads every job at each scrape).
Pruning deletes a finished job's keys and its id in `imgjobs:jobs`; outputs, results.jsonl and the
report in storage stay (the bucket's own lifecycle rules govern those). A pruned job is unknown to
`imgjobs status` and `imgjobs retry`, and submitting the same job again runs it again from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from schemas import keys

SCAN_BATCH = 1000

# KEYS: the job's keys (meta hash first), then the jobs set. ARGV: job id, cutoff time. Deletes the job
# only while it is still finished before the cutoff, in one step: an `imgjobs retry` that reopened it
# (retry deletes finished_at) keeps it.
_DELETE_IF_FINISHED_BEFORE = """
local finished = tonumber(redis.call('HGET', KEYS[1], 'finished_at'))
if not finished or finished >= tonumber(ARGV[2]) then return 0 end
redis.call('DEL', unpack(KEYS, 1, #KEYS - 1))
redis.call('SREM', KEYS[#KEYS], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class PrunedJob:
    job_id: str
    name: str
    finished_at: float


def prune(client: redis.Redis, cutoff: float, dry_run: bool = False) -> list[PrunedJob]:
    """Delete every job that finished before `cutoff` (a Unix time); returns them. With dry_run,
    only returns them. Jobs still running, or never finished (a cancelled job's queued chunks not
    yet drained), are kept whatever their age."""
    delete = client.register_script(_DELETE_IF_FINISHED_BEFORE)
    pruned: list[PrunedJob] = []
    batch: list[str] = []

    def prune_batch() -> None:
        pipe = client.pipeline(transaction=False)
        for job_id in batch:
            pipe.hmget(keys.job_meta(job_id), ["finished_at", "name"])
        for job_id, (finished_at, name) in zip(batch, pipe.execute(), strict=True):
            if finished_at is None or float(finished_at) >= cutoff:
                continue
            if dry_run or delete(keys=[*keys.job_keys(job_id), keys.JOBS], args=[job_id, cutoff]):
                pruned.append(PrunedJob(job_id, str(name or ""), float(finished_at)))
        batch.clear()

    # SSCAN returns every member present from start to end, whatever is removed meanwhile.
    for job_id in client.sscan_iter(keys.JOBS, count=SCAN_BATCH):
        batch.append(str(job_id))
        if len(batch) >= SCAN_BATCH:
            prune_batch()
    if batch:
        prune_batch()
    return pruned
