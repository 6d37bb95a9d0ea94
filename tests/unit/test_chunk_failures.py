"""The chunk runner when storage misbehaves or a chunk is failed late, with the CPU `resize` stage
and a real Redis: no item is lost, none is failed twice, the job always ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from jobs.embedded import EmbeddedRedis
from jobs.status import read_status
from schemas import keys
from schemas.errors import StageError, StorageError
from schemas.job import Defaults, Item, ResolvedParams
from schemas.messages import Chunk, ChunkItem, StageInput
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


def setup(tmp_path: Path, server: EmbeddedRedis, stages: int) -> tuple[redis.Redis, Chunk]:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    ids = ["a", "b"]
    client.hset(keys.job_meta("job"), mapping={"name": "job", "output": str(tmp_path / "out"), "total": 2})
    client.hset(keys.job_counts("job"), mapping={"pending": 2, "running": 0, "succeeded": 0, "failed": 0})
    client.hset(keys.job_items("job"), mapping=dict.fromkeys(ids, "pending"))
    client.rpush(keys.job_order("job"), *ids)
    members = []
    for item_id in ids:
        uri = str(write_image(tmp_path / "in" / f"{item_id}.png", size=(24, 24)))
        members.append(ChunkItem(item=Item(id=item_id, image=uri), input=StageInput(kind="image", uri=uri)))
    recipe = [
        stage_plan(
            {"type": "resize"},
            CPU,
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


def context(client: redis.Redis, storage: Storage, sent: list[Chunk]) -> ChunkContext:
    return ChunkContext(
        model=LoadedModel("cpu", CPU.entry),
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
