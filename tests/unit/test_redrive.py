"""`imgjobs retry` against a real Redis, with items failed by the workers' own chunk code: a retry
whose chunks cannot be sent leaves the items failed and retryable, and a job pruned while a retry
reads it stays deleted."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis

from jobs import plan, redrive
from jobs.embedded import EmbeddedRedis
from jobs.manifest import ValidatedJob, validate_job
from jobs.plan import plan_chunks
from jobs.producer import submit
from jobs.prune import prune
from jobs.registry import Registry
from jobs.status import read_status
from schemas import keys
from schemas.errors import BrokerUnavailableError, ImgjobsError
from schemas.registry import BUILTIN_MODELS
from schemas.settings import Settings
from tests.helpers import write_job
from workers.chunk import ChunkContext, process_chunk
from workers.models import LoadedModel
from workers.storage import LocalStorage

REGISTRY = Registry.load(None)


def failed_job(tmp_path: Path, server: EmbeddedRedis) -> tuple[redis.Redis, ValidatedJob]:
    """A two-stage resize job whose three inputs are missing: every item fails in stage 0."""
    rows = [{"id": f"i{n}", "image": f"in/{n}.png"} for n in range(3)]
    spec = write_job(tmp_path, rows, stage={"type": "resize"})
    job = validate_job(spec, REGISTRY)
    submit(job, Settings(), server.url)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    client.delete("imgjobs.cpu")  # run here, by the workers' own code, instead of by a worker
    ctx = ChunkContext(
        model=LoadedModel("cpu", BUILTIN_MODELS["cpu"]),
        settings=Settings(),
        redis=client,
        send_chunk=lambda chunk: None,
        open_storage=lambda output, job_id: LocalStorage(Path(output) / job_id),
    )
    for chunk in plan_chunks(job, 64):
        process_chunk(chunk, ctx)
    status = read_status(client, job.job_id)
    assert (status.state.value, status.failed) == ("failed", 3)
    return client, job


def test_a_retry_whose_chunks_cannot_be_sent_leaves_its_items_retryable(
    tmp_path: Path, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, job = failed_job(tmp_path, redis_server)
    before = {name: client.hgetall(key(job.job_id)) for name, key in STATE.items()}

    def broker_gone(*_: Any, **__: Any) -> int:
        raise BrokerUnavailableError("injected: the broker went away")

    monkeypatch.setattr(redrive, "send_chunks", broker_gone)
    with pytest.raises(BrokerUnavailableError):
        redrive.retry(client, Settings(), redis_server.url, job.job_id, None)
    after = {name: client.hgetall(key(job.job_id)) for name, key in STATE.items()}
    # Items, counts and results as they were (they were left pending, with no chunk, before);
    # the meta differs only in its retries count.
    assert {name: after[name] for name in STATE if name != "meta"} == {
        name: before[name] for name in STATE if name != "meta"
    }
    assert after["meta"] == before["meta"] | {"retries": "1"}

    monkeypatch.undo()
    assert redrive.retry(client, Settings(), redis_server.url, job.job_id, None) == 3
    status = read_status(client, job.job_id)
    assert (status.pending, status.failed, status.finished_at) == (3, 0, None)
    queued = client.lrange("imgjobs.cpu", 0, -1)
    assert len(queued) == 1


STATE = {
    "items": keys.job_items,
    "counts": keys.job_counts,
    "results": keys.job_results,
    "meta": keys.job_meta,
}


def test_a_job_pruned_while_a_retry_reads_it_stays_deleted(
    tmp_path: Path, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, job = failed_job(tmp_path, redis_server)
    planned = plan.first_stage_item
    pruned: list[str] = []

    def prune_meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not pruned:  # after the retry read the job, before it moved anything
            pruned.extend(job.job_id for job in prune(client, time.time() + 10))
        return planned(*args, **kwargs)

    monkeypatch.setattr(redrive, "first_stage_item", prune_meanwhile)
    with pytest.raises(ImgjobsError, match="pruned meanwhile"):
        redrive.retry(client, Settings(), redis_server.url, job.job_id, None)
    assert pruned == [job.job_id]
    # Before: a meta hash holding only `retries` came back, and chunks went out for a job nobody knew.
    assert list(client.scan_iter(match=f"{keys.PREFIX}:job:{job.job_id}:*")) == []
    assert client.llen("imgjobs.cpu") == 0
