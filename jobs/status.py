"""Reading a job's progress from Redis."""

from __future__ import annotations

import json

import redis

from schemas import keys
from schemas.errors import ImgjobsError
from schemas.progress import ItemState, JobState, JobStatus, StageProgress


def _float(value: str | None) -> float | None:
    return float(value) if value else None


def read_status(client: redis.Redis, job_id: str) -> JobStatus:
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(keys.job_meta(job_id))
    pipe.hgetall(keys.job_counts(job_id))
    pipe.hgetall(keys.job_stages(job_id))
    meta, counts, passed = pipe.execute()
    if not meta:
        raise ImgjobsError(f"no job {job_id!r} on this broker")
    count = {state: int(counts.get(state.value, 0)) for state in ItemState}
    finished_at = _float(meta.get("finished_at"))
    if meta.get("cancelled_at"):
        state = JobState.CANCELLED
    elif finished_at is not None:
        state = JobState.FAILED if count[ItemState.FAILED] else JobState.SUCCEEDED
    elif meta.get("started_at"):
        state = JobState.RUNNING
    else:
        state = JobState.PENDING
    return JobStatus(
        job_id=job_id,
        name=meta.get("name", ""),
        state=state,
        total=int(meta.get("total", 0)),
        pending=count[ItemState.PENDING],
        running=count[ItemState.RUNNING],
        succeeded=count[ItemState.SUCCEEDED],
        failed=count[ItemState.FAILED],
        output=meta.get("output", ""),
        submitted_at=_float(meta.get("submitted_at")),
        started_at=_float(meta.get("started_at")),
        finished_at=finished_at,
        stages=[StageProgress(name=name, done=int(passed.get(name, 0))) for name in _stage_names(meta)],
    )


def _stage_names(meta: dict[str, str]) -> list[str]:
    return [plan["name"] for plan in json.loads(meta.get("recipe", "[]"))]
