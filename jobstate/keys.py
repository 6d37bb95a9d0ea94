"""Every Redis key imgjobs uses, in one place. Celery's own keys (the queues `imgjobs.<model>`,
kombu's `unacked` bookkeeping) are named by Celery and not listed here.

Per job, Redis holds what is in flight; what is done lives in the job's storage prefix (jobstate/parts.py):

    imgjobs:jobs                      set     every job id on this broker
    imgjobs:job:<id>:meta             hash    the job's JobMeta fields (jobstate/meta.py), and end_claim
                                              and end_sent, which only its scripts write
                                              (jobstate/STATES.md)
    imgjobs:job:<id>:counts           hash    done, failed, and stage:<name> (items through each stage)
    imgjobs:job:<id>:done             bitmap  bit p: the item at manifest position p is finished, its
                                              result in a results part
    imgjobs:job:<id>:failed           bitmap  bit p: ... and it failed
    imgjobs:job:<id>:handed:<s>       bitmap  bit p: the item was handed past stage s to stage s + 1
    imgjobs:job:<id>:inflight         hash    chunk id -> items it is running now
    imgjobs:job:<id>:deliveries       hash    chunk id + retry number -> deliveries, while it runs
    imgjobs:job:<id>:shard:<part>     string  the token of the worker writing output shard <part>, with a
                                              time to live: there only while a shard is written

    imgjobs:unet-rates:<model>        hash    "<shape>|items", "|evaluations", "|seconds": what the
                                              model's pipeline calls took by shape, in UNet evaluations,
                                              halved past 5,000 items (owned by jobstate/rates.py)

    imgjobs:schedule:<name>:seen      set     "<uri>|<etag or content hash>" of every source object a
                                              schedule has submitted (owned by jobs/scheduler.py)
    imgjobs:schedule:<name>:last      hash    fired_at and, once a firing submitted one, job_id: the
                                              schedule's last firing (owned by jobs/scheduler.py)
    imgjobs:redbeat:*                         RedBeat's schedule state

A bitmap costs one bit per item; the hashes hold a field per chunk in flight, not per item.
"""

from __future__ import annotations

from schemas.job import MAX_STAGES

PREFIX = "imgjobs"

JOBS = f"{PREFIX}:jobs"
REDBEAT_PREFIX = f"{PREFIX}:redbeat:"


def job_meta(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:meta"


def job_counts(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:counts"


def job_done(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:done"


def job_failed(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:failed"


def job_handed(job_id: str, stage_index: int) -> str:
    return f"{PREFIX}:job:{job_id}:handed:{stage_index}"


def job_inflight(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:inflight"


def job_deliveries(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:deliveries"


def job_shard_lease(job_id: str, part: int) -> str:
    return f"{PREFIX}:job:{job_id}:shard:{part}"


def job_keys(job_id: str) -> list[str]:
    """Every key of one job (not its id in JOBS): what `imgjobs prune` deletes. A shard's lease is
    not among them: it expires on its own, and is there only while a worker writes the shard."""
    return [
        job_meta(job_id),
        job_counts(job_id),
        job_done(job_id),
        job_failed(job_id),
        *(job_handed(job_id, index) for index in range(MAX_STAGES - 1)),
        job_inflight(job_id),
        job_deliveries(job_id),
    ]


def model_rates(model: str) -> str:
    return f"{PREFIX}:unet-rates:{model}"


def schedule_seen(name: str) -> str:
    return f"{PREFIX}:schedule:{name}:seen"


def schedule_last(name: str) -> str:
    return f"{PREFIX}:schedule:{name}:last"
