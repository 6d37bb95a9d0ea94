"""`imgjobs retry` against a real Redis, with items failed by the workers' own chunk code: a retry
that stops leaves its items failed and retryable and the job open, and a job pruned while a retry
reads it stays deleted."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import redis

from jobs import plan, producer, redrive
from jobs.embedded import EmbeddedRedis
from jobs.manifest import ValidatedJob, validate_job
from jobs.plan import plan_chunks
from jobs.producer import submit
from jobs.prune import prune
from jobs.registry import Registry
from jobs.status import read_status
from schemas import keys
from schemas.errors import BrokerUnavailableError, ImgjobsError
from schemas.messages import Chunk, ItemResult
from schemas.registry import BUILTIN_MODELS
from schemas.settings import Settings
from tests.helpers import write_image, write_job
from workers.chunk import ChunkContext, process_chunk
from workers.models import LoadedModel
from workers.storage import LocalStorage

REGISTRY = Registry.load(None)


def failed_job(tmp_path: Path, server: EmbeddedRedis) -> tuple[redis.Redis, ValidatedJob, ChunkContext]:
    """A resize job whose three inputs are missing, run by the workers' own chunk code: all fail."""
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
    return client, job, ctx


def results_file(tmp_path: Path, job: ValidatedJob) -> dict[str, str]:
    lines = (Path(job.output) / job.job_id / "results.jsonl").read_text().splitlines()
    return {result.id: result.status for result in map(ItemResult.model_validate_json, lines)}


STATE = {"items": keys.job_items, "counts": keys.job_counts, "results": keys.job_results}


def test_a_retry_whose_chunks_cannot_be_sent_leaves_its_items_retryable(
    tmp_path: Path, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, job, _ctx = failed_job(tmp_path, redis_server)
    before = {name: client.hgetall(key(job.job_id)) for name, key in STATE.items()}

    def broker_gone(*_: Any, **__: Any) -> int:
        raise BrokerUnavailableError("injected: the broker went away")

    monkeypatch.setattr(redrive, "send_chunks", broker_gone)
    with pytest.raises(ImgjobsError, match=f"items are failed again: run `imgjobs retry {job.job_id}` again"):
        redrive.retry(client, Settings(), redis_server.url, job.job_id, None)
    # Items, counts and results as they were (before, they were left pending with nothing queued).
    assert {name: client.hgetall(key(job.job_id)) for name, key in STATE.items()} == before
    assert read_status(client, job.job_id).finished_at is None  # open until they are retried

    monkeypatch.undo()
    assert redrive.retry(client, Settings(), redis_server.url, job.job_id, None) == 3
    status = read_status(client, job.job_id)
    assert (status.pending, status.failed, status.finished_at) == (3, 0, None)
    assert client.llen("imgjobs.cpu") == 1


def test_a_retry_stopped_after_a_chunk_ran_does_not_close_the_job_on_stale_results(
    tmp_path: Path, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, job, ctx = failed_job(tmp_path, redis_server)
    for n in range(3):
        write_image(tmp_path / "in" / f"{n}.png")  # the inputs arrive: items succeed when run again

    def first_then_gone(app: Any, chunks: Iterable[Chunk], **options: Any) -> int:
        first = next(iter(chunks))
        producer.send_chunks(app, [first], **options)
        process_chunk(first, ctx)  # a worker runs it before the retry stops
        raise BrokerUnavailableError("injected: the broker went away")

    monkeypatch.setattr(redrive, "send_chunks", first_then_gone)
    with pytest.raises(ImgjobsError, match="items are failed again"):
        redrive.retry(client, Settings(chunk_size=1), redis_server.url, job.job_id, None)
    status = read_status(client, job.job_id)
    assert (status.pending, status.running, status.succeeded, status.failed) == (0, 0, 1, 2)
    # Before, the job was marked finished again, over a results.jsonl that said all three failed.
    assert status.finished_at is None

    monkeypatch.undo()
    assert redrive.retry(client, Settings(chunk_size=1), redis_server.url, job.job_id, None) == 2
    client.delete("imgjobs.cpu")
    for chunk in plan_chunks(job, 64):
        process_chunk(chunk, ctx)  # skips the one that succeeded, runs the other two, and finalizes
    status = read_status(client, job.job_id)
    assert (status.state.value, status.succeeded, status.failed) == ("succeeded", 3, 0)
    assert results_file(tmp_path, job) == dict.fromkeys(["i0", "i1", "i2"], "succeeded")


def test_a_job_pruned_while_a_retry_reads_it_stays_deleted(
    tmp_path: Path, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, job, _ctx = failed_job(tmp_path, redis_server)
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
