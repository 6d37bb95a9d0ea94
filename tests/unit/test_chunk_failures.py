"""The chunk runner and the job's end when storage misbehaves or a chunk is failed late, with the CPU
`resize` stage and a real Redis: no item is lost, none is failed twice, the job always ends."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
import torch
from celery.exceptions import SoftTimeLimitExceeded

from jobs.embedded import EmbeddedRedis
from jobstate import keys, layout
from jobstate.bits import unmask
from jobstate.storage import LocalStorage
from kits.helpers import CPU, write_image
from schemas.errors import StorageError
from schemas.job import Item
from schemas.messages import JobEnd
from schemas.registry import ResolvedModel
from tests.chunkkit import Harness, harness, resize_recipe, watched
from workers.chunk import RetryChunk
from workers.job_end import RetryEnd, end_job
from workers.models import LoadedModel
from workers.runtime import TIME_LIMITS
from workers.stages.common import StageBatch


class FlakyStorage(LocalStorage):
    """Local storage whose put_file fails `put_file_failures` times and whose deletes always fail."""

    def __init__(self, root: Path, put_file_failures: int = 0) -> None:
        super().__init__(root)
        self.put_file_failures = put_file_failures

    def put_file(self, key: str, path: Path, content_type: str) -> str:
        if self.put_file_failures and not key.startswith(f"{layout.PARTS}/"):
            self.put_file_failures -= 1
            raise StorageError(f"injected: cannot write {key}")
        return super().put_file(key, path, content_type)

    def delete(self, key: str) -> None:
        raise StorageError(f"injected: cannot delete {key}")


class PutsThenFails(LocalStorage):
    """Local storage that takes `allowed` output writes, then fails every one until given more (the
    job's own parts are always written)."""

    def __init__(self, root: Path, allowed: int) -> None:
        super().__init__(root)
        self.allowed = allowed

    def put(self, key: str, data: bytes, content_type: str) -> str:
        if not key.startswith(f"{layout.PARTS}/"):
            if self.allowed <= 0:
                raise StorageError(f"injected: cannot write {key}")
            self.allowed -= 1
        return super().put(key, data, content_type)


def setup(
    tmp_path: Path,
    server: EmbeddedRedis,
    stages: int,
    storage: LocalStorage | None = None,
    model: ResolvedModel = CPU,
    bad_uri: str | None = None,
) -> Harness:
    """A job of items a and b (and c, reading bad_uri, when given)."""
    client = redis.Redis.from_url(server.url, decode_responses=True)
    ids = ["a", "b"] if bad_uri is None else ["a", "b", "c"]
    rows = []
    for item_id in ids:
        uri = (
            bad_uri if item_id == "c" else str(write_image(tmp_path / "in" / f"{item_id}.png", size=(24, 24)))
        )
        assert uri is not None
        rows.append(Item(id=item_id, image=uri))
    return harness(
        client,
        rows,
        tmp_path / "out",
        recipe=resize_recipe(stages, model),
        model=LoadedModel("cpu", model.entry),
        storage=storage,
    )


def items_done_end_due(
    tmp_path: Path, server: EmbeddedRedis, put_file_failures: int
) -> tuple[Harness, JobEnd]:
    """A one-stage job whose items are done, and its end, sent once by the chunk that finished the
    last item and not written yet; results.jsonl's first `put_file_failures` writes fail."""
    storage = FlakyStorage(tmp_path / "out" / "job", put_file_failures=put_file_failures)
    job = setup(tmp_path, server, stages=1, storage=storage)
    job.write_ends = False
    job.run_all()
    (end,) = job.ends
    return job, end


def test_a_job_end_stopped_by_storage_is_written_by_its_retry(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    job, end = items_done_end_due(tmp_path, redis_server, put_file_failures=1)
    with pytest.raises(RetryEnd, match="injected"):  # reaches the task, which retries it
        end_job(end, job.end_ctx, "task-1", may_retry=True)
    assert job.store.status("job").finished_at is None
    assert end_job(end, job.end_ctx, "task-2") == "claimed"  # a second end task sent for it waits
    assert end_job(end, job.end_ctx, "task-1", may_retry=True) == "finished"  # the retry, same task
    status = job.store.status("job")
    assert (status.state.value, status.succeeded) == ("succeeded", 2)
    assert list(job.results()) == ["a", "b"]


def test_a_job_end_that_cannot_be_written_fails_the_job_with_its_reason(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    job, end = items_done_end_due(tmp_path, redis_server, put_file_failures=99)
    assert end_job(end, job.end_ctx, "task-1", may_retry=False) == "failed"  # its retries are used up
    status = job.store.status("job")
    assert (status.state.value, status.finished) == ("failed", True)
    assert status.error is not None and "injected: cannot write results.jsonl" in status.error
    assert [pruned.job_id for pruned in job.store.prune(time.time() + 1)] == ["job"]


def test_items_succeed_when_handover_files_cannot_be_deleted(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    job = setup(tmp_path, redis_server, stages=2, storage=FlakyStorage(tmp_path / "out" / "job"))
    job.run_all()
    status = job.store.status("job")
    assert (status.state.value, status.succeeded, status.failed) == ("succeeded", 2, 0)
    assert (tmp_path / "out" / "job" / "a" / "s0-resize.png").exists(), "kept, since deleting it failed"


def test_a_stage_delivered_again_after_its_handover_leaves_the_items_to_the_next(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    job = setup(tmp_path, redis_server, stages=2)
    (chunk,) = job.chunks
    job.run(chunk)
    (handed,) = job.sent
    written = (tmp_path / "out" / "job" / "a" / "s0-resize.png").stat().st_mtime_ns
    job.run(chunk)  # a redelivery of stage 0: nothing of it is left to do
    assert len(job.sent) == 1 and job.store.status("job").failed == 0
    assert (tmp_path / "out" / "job" / "a" / "s0-resize.png").stat().st_mtime_ns == written
    job.run(handed)
    status = job.store.status("job")
    assert (status.state.value, status.succeeded) == ("succeeded", 2)
    assert not (tmp_path / "out" / "job" / "a" / "s0-resize.png").exists(), "a handover file, deleted"


@pytest.mark.parametrize("bad_uri", ["http://[::1/c.png", "http://127.0.0.1:abc/c.png"])
def test_an_input_url_urllib_cannot_parse_fails_its_item_alone(
    tmp_path: Path, redis_server: EmbeddedRedis, bad_uri: str
) -> None:
    job = setup(tmp_path, redis_server, stages=1, bad_uri=bad_uri)
    job.run_all()
    status = job.store.status("job")  # the whole chunk failed, and the job never finished, before
    assert (status.state.value, status.succeeded, status.failed) == ("failed", 2, 1)
    error = job.results()["c"].error
    assert error is not None and error.type == "InputImageError"
    assert (tmp_path / "out" / "job" / "report.html").exists()


def test_an_input_that_cannot_be_read_for_now_leaves_the_others_running_then_fails_alone(
    tmp_path: Path, redis_server: EmbeddedRedis, without_aws_credentials: None
) -> None:
    job = setup(tmp_path, redis_server, stages=1, bad_uri="s3://bucket/x.png")
    (chunk,) = job.chunks
    with pytest.raises(RetryChunk, match=r"s3://bucket/x\.png"):  # retries remain: c stays open
        job.run(chunk, may_retry=True)
    status = job.store.status("job")
    assert (status.succeeded, status.failed, status.finished) == (2, 0, False), "a and b are done"
    job.run(chunk, retries=1)  # the last try: c alone fails, with its own input's error
    status = job.store.status("job")
    assert (status.state.value, status.succeeded, status.failed) == ("failed", 2, 1)
    results = job.results()
    assert [results[item].status for item in ("a", "b")] == ["succeeded", "succeeded"]
    error = results["c"].error
    assert error is not None and error.type == "StorageError"
    assert error.message.startswith("s3://bucket/x.png:") and "credentials" in error.message


def test_a_call_out_of_memory_is_halved_until_it_fits_and_only_an_item_too_large_alone_fails(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    """Accelerator memory allows two items a call, and none at all for the item prompted "huge"."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    ids = ["a", "b", "c", "d", "e", "f"]
    items = [
        Item(
            id=item_id,
            image=str(
                write_image(tmp_path / "in" / f"{item_id}.png", size=(24, 24), color=(40 * index, 30, 200))
            ),
            prompt="huge" if item_id == "d" else "fits",
        )
        for index, item_id in enumerate(ids)
    ]
    calls: list[int] = []

    def tight_memory(batch: StageBatch) -> None:
        calls.append(len(batch))
        if len(batch) > 2 or "huge" in batch.prompts:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")

    job = harness(client, items, tmp_path / "out")
    job.stages = watched("resize", tight_memory)
    job.run_all()
    assert calls[:2] == [6, 3], "the call of six, then its first half"
    results = job.results()
    assert [item_id for item_id in ids if results[item_id].status == "succeeded"] == ["a", "b", "c", "e", "f"]
    error = results["d"].error
    assert error is not None and error.type == "StageError"
    assert (
        error.message == "out of memory even in a batch of 1: CUDA out of memory. Tried to allocate 20.00 GiB"
    )
    # The same items with memory to spare.
    reference = harness(client, items, tmp_path / "reference", job_id="reference")
    reference.run_all()
    for item_id in ["a", "b", "c", "e", "f"]:
        ours = (job.job_dir / item_id / "s0-resize.png").read_bytes()
        assert ours == (reference.job_dir / item_id / "s0-resize.png").read_bytes(), item_id


def test_items_a_time_limit_stops_fail_as_timed_out_and_those_finished_before_are_kept(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    one_at_a_time = ResolvedModel(name="cpu", entry=CPU.entry.model_copy(update={"max_batch": 1}))
    job = setup(tmp_path, redis_server, stages=1, model=one_at_a_time)
    job.time_limits = TIME_LIMITS  # the worker's own
    calls: list[int] = []

    def slow(batch: StageBatch) -> None:
        calls.append(len(batch))
        if len(calls) == 2:
            raise SoftTimeLimitExceeded()  # what Celery raises in the task at the soft limit

    job.stages = watched("resize", slow)
    job.run_all()
    results = job.results()
    assert results["a"].status == "succeeded"
    error = results["b"].error
    assert error is not None and error.type == "TimeLimitError"
    assert "IMGJOBS_TASK_TIME_LIMIT_S" in error.message
    assert job.store.status("job").finished


def test_handovers_of_a_run_and_its_retry_have_their_own_chunk_ids(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    one_at_a_time = ResolvedModel(name="cpu", entry=CPU.entry.model_copy(update={"max_batch": 1}))
    storage = PutsThenFails(tmp_path / "out" / "job", allowed=1)
    job = setup(tmp_path, redis_server, stages=2, model=one_at_a_time, storage=storage)
    (chunk,) = job.chunks
    with pytest.raises(RetryChunk, match="injected"):  # a's output written, b's not: the task retries
        job.run(chunk, may_retry=True)
    storage.allowed = 100
    job.run(chunk, retries=1)  # the retry hands over b
    handed = list(job.sent)
    assert [unmask(h.slots or "") for h in handed] == [b"\x80", b"\x40"]  # a, then b
    # The next stage counts deliveries per chunk id: the same id twice read as a redelivery.
    assert handed[0].chunk_id != handed[1].chunk_id and handed[0].handover_part != handed[1].handover_part
    job.sent.clear()
    for next_chunk in handed:
        job.run(next_chunk)
    status = job.store.status("job")
    assert (status.state.value, status.succeeded) == ("succeeded", 2)


def test_outputs_that_can_never_be_written_fail_their_items_at_once_and_end_the_job(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    """An output folder under a file: no retry helps, so nothing is retried and the job ends failed."""
    (tmp_path / "afile").write_text("not a folder")
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    image = str(write_image(tmp_path / "in" / "a.png", size=(24, 24)))
    job = harness(client, [Item(id="a", image=image)], tmp_path / "spare")
    # The job's parts stay readable; its outputs, results.jsonl and report go under the file.
    bad = LocalStorage(tmp_path / "afile" / "sub" / "job")
    parts_ok = LocalStorage(tmp_path / "spare" / "job")

    class OutputsUnderAFile(LocalStorage):
        def put(self, key: str, data: bytes, content_type: str) -> str:
            target = parts_ok if key.startswith(f"{layout.PARTS}/") else bad
            return target.put(key, data, content_type)

        def put_file(self, key: str, path: Path, content_type: str) -> str:
            return bad.put_file(key, path, content_type)

        def get(self, key: str) -> bytes:
            return parts_ok.get(key)

        def list(self, prefix: str) -> list[str]:
            return parts_ok.list(prefix)

    job.storage_for = lambda _output, _job: OutputsUnderAFile(tmp_path / "spare" / "job")
    started = time.monotonic()
    (chunk,) = job.chunks
    job.run(chunk, may_retry=True)  # a refused write is not retryable: no RetryChunk
    status = job.store.status("job")
    assert (status.state.value, status.finished, status.failed) == ("failed", True, 1)
    assert status.error is not None and "Not a directory" in status.error
    assert time.monotonic() - started < 5


def test_late_chunks_of_a_pruned_job_leave_it_pruned(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    job = setup(tmp_path, redis_server, stages=1)
    job.run_all()
    results = (tmp_path / "out" / "job" / "results.jsonl").read_text()
    assert results.count("\n") == 2
    assert [pruned.job_id for pruned in job.store.prune(time.time() + 10)] == ["job"]
    job.run(job.chunks[0])  # a redelivery
    assert (tmp_path / "out" / "job" / "results.jsonl").read_text() == results
    assert list(job.client.scan_iter(match=f"{keys.PREFIX}:job:job:*")) == []
