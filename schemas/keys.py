"""Every Redis key imgjobs uses, in one place. Celery's own keys (the queues `imgjobs.<model>`,
kombu's `unacked` bookkeeping) are named by Celery and not listed here.

    imgjobs:jobs                      set    every job id ever submitted
    imgjobs:job:<id>:meta             hash   name, output, total, spec, submitted_at, started_at, finished_at
    imgjobs:job:<id>:counts           hash   pending / running / succeeded / failed -> count
    imgjobs:job:<id>:items            hash   item id -> ItemState
    imgjobs:job:<id>:order            list   item ids in manifest order (results.jsonl follows it)
    imgjobs:job:<id>:results          hash   item id -> ItemResult JSON, once the item is finished
    imgjobs:job:<id>:stage            hash   item id -> index of the last stage handed to the next one
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
