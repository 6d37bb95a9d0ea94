"""`imgjobs retry` and `cancel` against a real Redis, with jobs submitted by the producer and items
run by the workers' own chunk code: a retry that stops leaves its items failed and retryable and the
job's end written again, a cancel accounts for every item at once and its items can be retried, and
a job pruned while a retry reads it stays deleted."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from jobs import redrive
from jobs.embedded import EmbeddedRedis
from jobs.manifest import ValidatedJob
from jobs.producer import prepared, submit
from jobs.registry import Registry
from jobstate import keys
from jobstate.meta import JobMeta
from jobstate.store import JobStore
from kits.helpers import write_image, write_job
from schemas.errors import BrokerUnavailableError, ConfigError, ImgjobsError
from schemas.messages import Chunk, ItemResult, JobEnd, priority_lists
from schemas.registry import BUILTIN_MODELS
from schemas.settings import Settings
from workers.chunk import WorkerContext, process_chunk
from workers.job_end import EndContext, end_job
from workers.models import LoadedModel

REGISTRY = Registry.load(None)


@dataclass
class Job:
    """A submitted resize job, whose chunks this process runs as a worker would."""

    client: redis.Redis
    store: JobStore
    validated: ValidatedJob
    sent: list[Chunk] = field(default_factory=list)
    ends: list[JobEnd] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        return self.validated.job_id

    @property
    def meta(self) -> JobMeta:
        return self.store.meta(self.job_id)

    def ctx(self) -> WorkerContext:
        return WorkerContext(
            model=LoadedModel("cpu", BUILTIN_MODELS["cpu"]),
            settings=Settings(),
            store=self.store,
            send_chunk=lambda chunk, queue, priority: self.sent.append(chunk),
            send_end=self.ends.append,
        )

    def run(self, chunks: Sequence[Chunk]) -> None:
        for chunk in chunks:
            process_chunk(chunk, self.ctx())

    def write_end(self) -> None:
        """The job's end as the CPU worker writes it, once for each end sent."""
        while self.ends:
            end_job(self.ends.pop(0), EndContext(self.store, Settings()), token=f"t{time.monotonic_ns()}")

    def send(self, meta: JobMeta, chunks: list[Chunk]) -> None:
        self.sent += chunks

    def retry(self, reason: str | None = None) -> int:
        return redrive.retry(self.store, self.job_id, reason, self.send, self.ends.append)

    def results(self) -> dict[str, ItemResult]:
        lines = (Path(self.validated.output) / self.job_id / "results.jsonl").read_text().splitlines()
        return {result.id: result for result in map(ItemResult.model_validate_json, lines)}


def failed_job(tmp_path: Path, server: EmbeddedRedis, count: int = 3, chunk_size: int = 64) -> Job:
    """A resize job whose inputs are missing, run by the workers' own chunk code: all fail."""
    rows = [{"id": f"i{n}", "image": f"in/{n}.png"} for n in range(count)]
    spec = write_job(tmp_path, rows, stage={"type": "resize"})
    client = redis.Redis.from_url(server.url, decode_responses=True)
    settings = Settings(chunk_size=chunk_size)
    with prepared(spec, REGISTRY, settings) as validated:
        submit(validated, settings, server.url)
    client.delete(
        *priority_lists("imgjobs.cpu")
    )  # run here, by the workers' own code, instead of by a worker
    job = Job(client, JobStore(client), validated)
    job.run([job.meta.first_chunk(part) for part in range(job.meta.parts)])
    job.write_end()
    status = job.store.status(job.job_id)
    assert (status.state.value, status.failed) == ("failed", count)
    return job


def test_a_retry_whose_chunks_cannot_be_sent_leaves_its_items_retryable(
    tmp_path: Path, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = failed_job(tmp_path, redis_server)
    times = {"finished_at", "stopped_s"}  # the job's end is written again, after the time the retry took
    before = job.store.status(job.job_id).model_dump(exclude=times)

    def broker_gone(meta: JobMeta, chunks: list[Chunk]) -> None:
        raise BrokerUnavailableError("injected: the broker went away")

    with pytest.raises(ImgjobsError, match=f"items are failed again: run `imgjobs retry {job.job_id}` again"):
        redrive.retry(job.store, job.job_id, None, broker_gone, job.ends.append)
    # Counts as they were (the items are not left pending with nothing queued), and the job's end is
    # due again, for the new round.
    assert job.store.status(job.job_id).model_dump(exclude=times) == before | {"state": "running"}
    assert [end.round for end in job.ends] == [1]
    job.write_end()
    assert job.store.status(job.job_id).model_dump(exclude=times) == before

    assert job.retry() == 3
    status = job.store.status(job.job_id)
    assert (status.pending, status.failed, status.finished_at) == (3, 0, None)
    assert [chunk.round for chunk in job.sent] == [2]


def test_a_retry_stopped_after_a_chunk_ran_ends_the_job_on_what_ran(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    job = failed_job(tmp_path, redis_server, chunk_size=1)
    for n in range(3):
        write_image(tmp_path / "in" / f"{n}.png")  # the inputs arrive: items succeed when run again

    def first_then_gone(meta: JobMeta, chunks: list[Chunk]) -> None:
        job.run(chunks[:1])  # a worker runs the first before the retry stops
        raise BrokerUnavailableError("injected: the broker went away")

    with pytest.raises(ImgjobsError, match="items are failed again"):
        redrive.retry(job.store, job.job_id, None, first_then_gone, job.ends.append)
    job.write_end()
    status = job.store.status(job.job_id)
    assert (status.pending, status.running, status.succeeded, status.failed) == (0, 0, 1, 2)
    # The end is written from the parts, so it says what ran: i0 now succeeded.
    assert {i: r.status for i, r in job.results().items()} == {
        "i0": "succeeded",
        "i1": "failed",
        "i2": "failed",
    }

    assert job.retry() == 2
    job.run(job.sent)
    job.write_end()
    status = job.store.status(job.job_id)
    assert (status.state.value, status.succeeded, status.failed) == ("succeeded", 3, 0)
    assert {r.status for r in job.results().values()} == {"succeeded"}


def test_retry_by_reason_and_of_a_cancelled_job(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    rows = [{"id": f"i{n}", "image": "in/ok.png" if n % 2 else "in/gone.png"} for n in range(6)]
    write_image(tmp_path / "in" / "ok.png")
    spec = write_job(tmp_path, rows, stage={"type": "resize"})
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    settings = Settings(chunk_size=2)
    with prepared(spec, REGISTRY, settings) as validated:
        submit(validated, settings, redis_server.url)
    client.delete(*priority_lists("imgjobs.cpu"))
    job = Job(client, JobStore(client), validated)
    job.run([job.meta.first_chunk(0)])  # i0 fails, i1 succeeds
    assert redrive.cancel(job.store, job.job_id, job.ends.append) == "cancelled"
    job.run([job.meta.first_chunk(part) for part in (1, 2)])  # sent before the cancel: dropped
    job.write_end()
    status = job.store.status(job.job_id)
    assert (status.state.value, status.succeeded, status.failed, status.cancelled) == ("cancelled", 1, 5, 4)
    results = job.results()
    assert list(results) == [f"i{n}" for n in range(6)]
    reasons = {i: r.error.type if r.error else None for i, r in results.items()}
    assert reasons == {"i0": "InputImageError", "i1": None} | dict.fromkeys(
        ["i2", "i3", "i4", "i5"], "JobCancelledError"
    )
    assert {r.id for r in redrive.failures(job.store, job.job_id, "JobCancelledError")} == {
        "i2",
        "i3",
        "i4",
        "i5",
    }

    with pytest.raises(ConfigError, match="was cancelled: `imgjobs retry"):
        job.retry(reason="InputImageError")  # it would leave the cancelled items open with nothing queued
    assert job.retry(reason="JobCancelledError") == 4
    assert job.store.status(job.job_id).state.value == "running"  # no longer cancelled
    job.run(job.sent)
    job.write_end()
    status = job.store.status(job.job_id)
    assert (status.state.value, status.succeeded, status.failed, status.cancelled) == ("failed", 3, 3, 0)
    assert [r.id for r in redrive.failures(job.store, job.job_id)] == ["i0", "i2", "i4"]


def test_a_job_pruned_while_a_retry_reads_it_stays_deleted(
    tmp_path: Path, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = failed_job(tmp_path, redis_server)
    targets = redrive._targets
    pruned: list[str] = []

    def prune_meanwhile(*args: Any, **kwargs: Any) -> Any:
        # After the retry read the job, before it moved anything.
        pruned.extend(pruned_job.job_id for pruned_job in job.store.prune(time.time() + 10))
        return targets(*args, **kwargs)

    monkeypatch.setattr(redrive, "_targets", prune_meanwhile)
    with pytest.raises(ImgjobsError, match="pruned meanwhile"):
        job.retry()
    assert pruned == [job.job_id]
    # Before: a meta hash holding only `retries` came back, and chunks went out for a job nobody knew.
    assert list(job.client.scan_iter(match=f"{keys.PREFIX}:job:{job.job_id}:*")) == []
    assert job.sent == []


def test_a_job_cancelled_while_a_retry_reads_it_is_left_as_it_is(
    tmp_path: Path, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = failed_job(tmp_path, redis_server)
    targets = redrive._targets
    job.store.reopen_items(job.meta, [0], reopen=True, cancelled=False)  # a retry of i0: the job runs again
    before = job.store.status(job.job_id)

    def cancel_meanwhile(*args: Any, **kwargs: Any) -> Any:
        redrive.cancel(job.store, job.job_id, job.ends.append)
        return targets(*args, **kwargs)

    monkeypatch.setattr(redrive, "_targets", cancel_meanwhile)
    with pytest.raises(ImgjobsError, match="was cancelled meanwhile"):
        job.retry()
    # Reopening the job would un-cancel it and send chunks of the old epoch, which are dropped: nothing
    # would be cancelled any more and nothing would run, so the job would never end.
    status = job.store.status(job.job_id)
    assert (status.state.value, status.failed, job.sent) == ("cancelled", before.failed + 1, [])
