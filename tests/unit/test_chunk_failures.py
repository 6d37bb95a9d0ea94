"""The chunk runner when storage misbehaves or a chunk is failed late, with the CPU `resize` stage
and a real Redis: no item is lost, none is failed twice, the job always ends."""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from jobs.embedded import EmbeddedRedis
from jobs.prune import prune
from jobs.status import read_status
from schemas import keys
from schemas.errors import StageError, StorageError
from schemas.job import Defaults, Item, ResolvedParams
from schemas.messages import Chunk, ChunkItem, ItemResult, StageInput
from schemas.registry import BUILTIN_MODELS, ResolvedModel
from schemas.settings import Settings
from tests.helpers import stage_plan, write_image
from workers.chunk import ChunkContext, fail_items, process_chunk
from workers.models import LoadedModel
from workers.storage import LocalStorage, Storage

CPU = ResolvedModel(name="cpu", entry=BUILTIN_MODELS["cpu"])
PARAMS = ResolvedParams(size=(16, 16))


class FlakyStorage(LocalStorage):
    """Local storage whose put_file fails `put_file_failures` times and whose deletes always fail."""

    def __init__(self, root: Path, put_file_failures: int = 0) -> None:
        super().__init__(root)
        self.put_file_failures = put_file_failures

    def put_file(self, key: str, path: Path, content_type: str) -> str:
        if self.put_file_failures:
            self.put_file_failures -= 1
            raise StorageError(f"injected: cannot write {key}")
        return super().put_file(key, path, content_type)

    def delete(self, key: str) -> None:
        raise StorageError(f"injected: cannot delete {key}")


def setup(
    tmp_path: Path, server: EmbeddedRedis, stages: int, model: ResolvedModel = CPU, bad_uri: str | None = None
) -> tuple[redis.Redis, Chunk]:
    """A job of items a and b (and c, reading bad_uri, when given) and its first chunk."""
    client = redis.Redis.from_url(server.url, decode_responses=True)
    ids = ["a", "b"] if bad_uri is None else ["a", "b", "c"]
    total = len(ids)
    client.hset(
        keys.job_meta("job"), mapping={"name": "job", "output": str(tmp_path / "out"), "total": total}
    )
    client.hset(keys.job_counts("job"), mapping={"pending": total, "running": 0, "succeeded": 0, "failed": 0})
    client.hset(keys.job_items("job"), mapping=dict.fromkeys(ids, "pending"))
    client.rpush(keys.job_order("job"), *ids)
    members = []
    for item_id in ids:
        uri = (
            bad_uri if item_id == "c" else str(write_image(tmp_path / "in" / f"{item_id}.png", size=(24, 24)))
        )
        assert uri is not None
        members.append(ChunkItem(item=Item(id=item_id, image=uri), input=StageInput(kind="image", uri=uri)))
    recipe = [
        stage_plan(
            {"type": "resize"},
            model,
            index=index,
            handover="image" if index < stages - 1 else "none",
            save=() if index < stages - 1 else ("image",),
        )
        for index in range(stages)
    ]
    chunk = Chunk(
        job_id="job",
        chunk_id="job:s0:c0",
        output=str(tmp_path / "out"),
        stage_index=0,
        recipe=recipe,
        defaults=Defaults(),
        params=PARAMS,
        items=members,
    )
    return client, chunk


def context(
    client: redis.Redis, storage: Storage, sent: list[Chunk], model: ResolvedModel = CPU
) -> ChunkContext:
    return ChunkContext(
        model=LoadedModel("cpu", model.entry),
        settings=Settings(),
        redis=client,
        send_chunk=sent.append,
        open_storage=lambda _output, _job: storage,
    )


def test_a_failed_finalize_is_done_again_by_the_retry(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    client, chunk = setup(tmp_path, redis_server, stages=1)
    ctx = context(client, FlakyStorage(tmp_path / "out" / "job", put_file_failures=1), [])
    with pytest.raises(StorageError, match="injected"):  # reaches the task, which retries the chunk
        process_chunk(chunk, ctx)
    assert read_status(client, "job").finished_at is None
    process_chunk(chunk, ctx)  # the task's retry: nothing left to run, but the job still needs its end
    status = read_status(client, "job")
    assert (status.state.value, status.succeeded) == ("succeeded", 2)
    assert (tmp_path / "out" / "job" / "results.jsonl").read_text().count("\n") == 2


def test_items_succeed_when_handover_files_cannot_be_deleted(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    client, chunk = setup(tmp_path, redis_server, stages=2)
    sent: list[Chunk] = []
    ctx = context(client, FlakyStorage(tmp_path / "out" / "job"), sent)
    process_chunk(chunk, ctx)
    (handed,) = sent
    process_chunk(handed, ctx)
    status = read_status(client, "job")
    assert (status.state.value, status.succeeded, status.failed) == ("succeeded", 2, 0)
    assert (tmp_path / "out" / "job" / "a" / "s0-resize.png").exists(), "kept, since deleting it failed"


def test_failing_a_chunk_late_spares_items_handed_on(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    client, chunk = setup(tmp_path, redis_server, stages=2)
    sent: list[Chunk] = []
    ctx = context(client, LocalStorage(tmp_path / "out" / "job"), sent)
    process_chunk(chunk, ctx)
    fail_items(chunk, ctx, StageError("stage 0 failed after handing over"))  # e.g. a later send broke
    assert read_status(client, "job").failed == 0
    process_chunk(sent[0], ctx)
    status = read_status(client, "job")
    assert (status.state.value, status.succeeded) == ("succeeded", 2)
    assert client.hlen(keys.job_inputs("job")) == 0, "nothing was kept for a retry"


@pytest.mark.parametrize("bad_uri", ["http://[::1/c.png", "http://127.0.0.1:abc/c.png"])
def test_an_input_url_urllib_cannot_parse_fails_its_item_alone(
    tmp_path: Path, redis_server: EmbeddedRedis, bad_uri: str
) -> None:
    client, chunk = setup(tmp_path, redis_server, stages=1, bad_uri=bad_uri)
    process_chunk(chunk, context(client, LocalStorage(tmp_path / "out" / "job"), []))
    status = read_status(client, "job")  # the whole chunk failed, and the job never finished, before
    assert (status.state.value, status.succeeded, status.failed) == ("failed", 2, 1)
    result = ItemResult.model_validate_json(client.hget(keys.job_results("job"), "c") or "")
    assert result.error is not None and result.error.type == "InputImageError"
    assert (tmp_path / "out" / "job" / "report.html").exists()


class PutsThenFails(LocalStorage):
    """Local storage that takes `allowed` puts, then fails every put until given more."""

    def __init__(self, root: Path, allowed: int) -> None:
        super().__init__(root)
        self.allowed = allowed

    def put(self, key: str, data: bytes, content_type: str) -> str:
        if self.allowed <= 0:
            raise StorageError(f"injected: cannot write {key}")
        self.allowed -= 1
        return super().put(key, data, content_type)


def test_handovers_of_a_run_and_its_retry_have_their_own_chunk_ids(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    one_at_a_time = ResolvedModel(name="cpu", entry=CPU.entry.model_copy(update={"max_batch": 1}))
    client, chunk = setup(tmp_path, redis_server, stages=2, model=one_at_a_time)
    storage, sent = PutsThenFails(tmp_path / "out" / "job", allowed=1), list[Chunk]()
    ctx = context(client, storage, sent, one_at_a_time)
    with pytest.raises(StorageError, match="injected"):  # a's output written, b's not: the task retries
        process_chunk(chunk, ctx)
    storage.allowed = 100
    process_chunk(chunk, ctx)  # the retry hands over b
    assert [[member.item.id for member in handed.items] for handed in sent] == [["a"], ["b"]]
    # The next stage counts deliveries per chunk id: the same id twice read as a redelivery.
    assert sent[0].chunk_id != sent[1].chunk_id
    for handed in sent:
        process_chunk(handed, ctx)
    status = read_status(client, "job")
    assert (status.state.value, status.succeeded) == ("succeeded", 2)


class RetryRequested(Exception):
    pass


class TaskStandIn:
    """What workers.tasks._fail uses of a bound Celery task: its retry count and retry()."""

    def __init__(self, retries: int) -> None:
        self.request = SimpleNamespace(retries=retries)
        self.retried_with: dict[str, object] = {}

    def retry(self, **options: object) -> RetryRequested:
        self.retried_with = options
        return RetryRequested()


def test_a_finalize_that_fails_while_failing_items_retries_the_chunk(
    tmp_path: Path, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMGJOBS_BROKER_URL", redis_server.url)  # workers.app makes its Celery app on import
    tasks = importlib.import_module("workers.tasks")
    client, chunk = setup(tmp_path, redis_server, stages=1)
    ctx = context(client, FlakyStorage(tmp_path / "out" / "job", put_file_failures=1), [])
    task = TaskStandIn(retries=tasks.MAX_RETRIES)  # the chunk used up its own retries: its items fail now
    with pytest.raises(RetryRequested):  # escaped the task before: the job stayed running for ever
        tasks._fail(task, chunk, ctx, StageError("gave up"))
    assert task.retried_with["max_retries"] == tasks.FINALIZE_RETRIES
    assert read_status(client, "job").finished_at is None
    process_chunk(chunk, ctx)  # that retry: every item is failed already, so it only finalizes
    status = read_status(client, "job")
    assert (status.state.value, status.failed) == ("failed", 2)
    assert (tmp_path / "out" / "job" / "results.jsonl").read_text().count("\n") == 2


def test_late_chunks_of_a_pruned_job_leave_it_pruned(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    client, chunk = setup(tmp_path, redis_server, stages=1)
    ctx = context(client, LocalStorage(tmp_path / "out" / "job"), [])
    process_chunk(chunk, ctx)
    results = (tmp_path / "out" / "job" / "results.jsonl").read_text()
    assert results.count("\n") == 2
    client.sadd(keys.JOBS, "job")
    assert [job.job_id for job in prune(client, time.time() + 10)] == ["job"]
    process_chunk(chunk, ctx)  # a redelivery
    fail_items(chunk, ctx, StageError("failed late"))
    # Before, the finalize ran again: an empty results.jsonl over the real one, and a meta hash that
    # made a resubmission of the job "resume" a job with no items.
    assert (tmp_path / "out" / "job" / "results.jsonl").read_text() == results
    assert list(client.scan_iter(match=f"{keys.PREFIX}:job:job:*")) == []
