"""A chunk runs as calls of its model's batch size, with inputs fetched and outputs written on I/O
threads while a call runs; CPU `resize` stage and tiny SD, real Redis. What must hold: every item is
accounted for once, a failed write stops the chunk without losing what was written, and the threads
change nothing in the outputs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image

from jobs.embedded import EmbeddedRedis
from jobs.status import read_status
from schemas import keys
from schemas.errors import StorageError
from schemas.job import Defaults, Item, ResolvedParams
from schemas.messages import Chunk, ChunkItem, StageInput
from schemas.registry import BUILTIN_MODELS, ModelEntry, ResolvedModel
from schemas.settings import Settings
from tests.helpers import local_model, stage_plan, write_image
from workers import chunk as chunk_module
from workers.chunk import ChunkContext, process_chunk
from workers.models import LoadedModel
from workers.storage import LocalStorage, Storage, open_storage


def register(client: redis.Redis, job_id: str, output: Path, ids: list[str]) -> None:
    client.hset(keys.job_meta(job_id), mapping={"name": job_id, "output": str(output), "total": len(ids)})
    client.hset(keys.job_counts(job_id), mapping={"pending": len(ids)})
    client.hset(keys.job_items(job_id), mapping=dict.fromkeys(ids, "pending"))
    client.rpush(keys.job_order(job_id), *ids)


def resize_chunk(tmp_path: Path, ids: list[str], missing: tuple[str, ...] = ()) -> Chunk:
    members = []
    for index, item_id in enumerate(ids):
        path = tmp_path / "in" / f"{item_id}.png"
        if item_id not in missing:
            write_image(path, size=(24, 24), color=(index * 20, 40, 90))
        uri = str(path)
        members.append(ChunkItem(item=Item(id=item_id, image=uri), input=StageInput(kind="image", uri=uri)))
    return Chunk(
        job_id="job",
        chunk_id="job:s0:c0",
        output=str(tmp_path / "out"),
        stage_index=0,
        recipe=[stage_plan({"type": "resize"}, ResolvedModel(name="cpu", entry=BUILTIN_MODELS["cpu"]))],
        defaults=Defaults(),
        params=ResolvedParams(size=(16, 16)),
        items=members,
    )


def cpu_model(max_batch: int) -> LoadedModel:
    return LoadedModel("cpu", BUILTIN_MODELS["cpu"].model_copy(update={"max_batch": max_batch}))


class CountingCalls:
    """Wraps the resize stage to record each call's batch size, and to run before_call first; the stage
    itself runs unchanged."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, before_call: Callable[[], None] = lambda: None
    ) -> None:
        self.sizes: list[int] = []
        stage = chunk_module.STAGES["resize"]

        def counted(*args: Any, **kwargs: Any) -> Any:
            before_call()
            self.sizes.append(len(args[3]))
            return stage(*args, **kwargs)

        monkeypatch.setitem(chunk_module.STAGES, "resize", counted)


class FailingPuts(LocalStorage):
    """Local storage whose puts fail from the `fail_from`-th on (counting from 1)."""

    def __init__(self, root: Path, fail_from: int) -> None:
        super().__init__(root)
        self.fail_from, self.puts = fail_from, 0

    def put(self, key: str, data: bytes, content_type: str) -> str:
        self.puts += 1
        if self.puts >= self.fail_from:
            raise StorageError(f"injected: cannot write {key}")
        return super().put(key, data, content_type)


def no_next_stage(chunk: Chunk) -> None:
    raise AssertionError("a one-stage job handed a chunk on")


def context(
    client: redis.Redis, model: LoadedModel, threads: int, storage: Storage | None = None
) -> ChunkContext:
    return ChunkContext(
        model=model,
        settings=Settings(io_threads=threads),
        redis=client,
        send_chunk=no_next_stage,
        open_storage=open_storage if storage is None else lambda output, job_id: storage,
    )


@pytest.mark.parametrize("threads", [0, 3])
def test_a_chunk_runs_in_calls_of_the_batch_size_and_a_bad_item_fails_alone(
    threads: int,
    redis_server: EmbeddedRedis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    ids = [f"i{index}" for index in range(10)]
    register(client, "job", tmp_path / "out", ids)
    calls = CountingCalls(monkeypatch)
    chunk = resize_chunk(tmp_path, ids, missing=("i4",))
    with caplog.at_level(logging.INFO, logger="workers.chunk"):
        process_chunk(chunk, context(client, cpu_model(max_batch=3), threads))

    # i4's batch runs with the two items it has left; the failure costs no call.
    assert calls.sizes == [3, 2, 3, 1]
    status = read_status(client, "job")
    assert (status.succeeded, status.failed, status.finished_at is not None) == (9, 1, True)
    for item_id in set(ids) - {"i4"}:
        assert Image.open(tmp_path / "out" / "job" / item_id / "s0-resize.png").size == (16, 16)
    logged = [record for record in caplog.records if hasattr(record, "duty_cycle")]
    assert len(logged) == 1 and 0.0 < logged[0].duty_cycle <= 1.0, logged


@pytest.mark.parametrize(("threads", "most_held"), [(0, 3), (2, 9)])
def test_inputs_are_fetched_ahead_only_on_io_threads(
    threads: int, most_held: int, redis_server: EmbeddedRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In line, a batch's inputs are fetched just before its call (fetching ahead would overlap nothing
    and only hold more images); on threads, up to LOOKAHEAD batches ahead of the call."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    ids = [f"i{index}" for index in range(12)]
    register(client, "job", tmp_path / "out", ids)
    loaded, held_at_calls = [0], list[int]()
    load = chunk_module._ChunkRun._load

    def counted_load(run: Any, member: ChunkItem) -> Any:
        prepared = load(run, member)
        loaded[0] += 1
        return prepared

    def count_held() -> None:
        held_at_calls.append(loaded[0] - 3 * len(held_at_calls))  # fetched but not yet run

    monkeypatch.setattr(chunk_module._ChunkRun, "_load", counted_load)
    CountingCalls(monkeypatch, before_call=count_held)
    assert chunk_module.LOOKAHEAD == 2
    process_chunk(resize_chunk(tmp_path, ids), context(client, cpu_model(max_batch=3), threads))
    assert len(held_at_calls) == 4 and max(held_at_calls) <= most_held, held_at_calls
    if threads == 0:
        assert held_at_calls == [3, 3, 3, 3]


def test_a_failed_write_stops_the_chunk_and_keeps_what_was_written(
    redis_server: EmbeddedRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    ids = [f"i{index}" for index in range(8)]
    register(client, "job", tmp_path / "out", ids)
    chunk = resize_chunk(tmp_path, ids)
    model = cpu_model(max_batch=2)
    # Four writes succeed, then every write fails. Which calls' writes got the four depends on how the
    # I/O threads ran; what must hold is that no written item is lost and none is done twice.
    broken = FailingPuts(tmp_path / "out" / "job", fail_from=5)
    with pytest.raises(StorageError, match="injected"):
        process_chunk(chunk, context(client, model, threads=2, storage=broken))
    states = client.hgetall(keys.job_items("job"))
    finished = {str(item_id) for item_id, state in states.items() if state == "succeeded"}
    assert finished and len(finished) <= 4 and set(states.values()) <= {"succeeded", "running"}, states
    for item_id in finished:
        assert (tmp_path / "out" / "job" / item_id / "s0-resize.png").is_file()
    assert read_status(client, "job").finished_at is None

    calls = CountingCalls(monkeypatch)
    process_chunk(chunk, context(client, model, threads=2))  # the retry, with storage back
    assert sum(calls.sizes) == len(ids) - len(finished)  # only the items still open run again
    status = read_status(client, "job")
    assert (status.succeeded, status.failed, status.finished_at is not None) == (8, 0, True)


@pytest.mark.slow
def test_io_threads_and_batch_size_change_nothing_in_the_outputs(
    tiny_sd_dir: Path, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    model_ref = local_model("tiny-sd", tiny_sd_dir)
    plan = stage_plan({"type": "img2img"}, model_ref)
    rng = np.random.default_rng(0)
    members = []
    for index in range(5):
        path = tmp_path / "in" / f"i{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(path)
        item = Item(id=f"i{index}", image=str(path), prompt=f"prompt {index}", seed=index)
        members.append(ChunkItem(item=item, input=StageInput(kind="image", uri=str(path))))
    outputs = {}
    for job_id, max_batch, threads in (("one-call", 8, 0), ("pipelined", 2, 3)):
        register(client, job_id, tmp_path / "out", [member.item.id for member in members])
        entry: ModelEntry = model_ref.entry.model_copy(update={"max_batch": max_batch})
        chunk = Chunk(
            job_id=job_id,
            chunk_id=f"{job_id}:s0:c0",
            output=str(tmp_path / "out"),
            stage_index=0,
            recipe=[plan],
            defaults=Defaults(),
            params=ResolvedParams(strength=0.6, guidance_scale=7.5, steps=5, size=(32, 32)),
            items=members,
        )
        process_chunk(chunk, context(client, LoadedModel("tiny-sd", entry), threads))
        assert read_status(client, job_id).succeeded == 5
        outputs[job_id] = [
            np.asarray(Image.open(tmp_path / "out" / job_id / f"i{index}" / "s0-img2img.png"), dtype=np.int16)
            for index in range(5)
        ]
    for one_call, pipelined in zip(outputs["one-call"], outputs["pipelined"], strict=True):
        # Batches of 2 and of 5 sum convolutions in another order: at most one 8-bit step apart.
        assert np.abs(one_call - pipelined).max() <= 1
    assert np.abs(outputs["one-call"][0] - outputs["one-call"][1]).max() > 10  # the items differ


def test_a_chunk_stopped_by_a_fetch_records_the_calls_already_written(
    redis_server: EmbeddedRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    ids = [f"i{index}" for index in range(8)]
    register(client, "job", tmp_path / "out", ids)
    load = chunk_module._ChunkRun._load

    def storage_gone_at_i6(run: chunk_module._ChunkRun, member: ChunkItem) -> Any:
        if member.item.id == "i6":
            time.sleep(0.5)  # the writes of the calls before finish meanwhile, on their threads
            raise StorageError("injected: the input store went away")
        return load(run, member)

    monkeypatch.setattr(chunk_module._ChunkRun, "_load", storage_gone_at_i6)
    with pytest.raises(StorageError, match="went away"):
        process_chunk(resize_chunk(tmp_path, ids), context(client, cpu_model(max_batch=2), threads=2))
    states = client.hgetall(keys.job_items("job"))
    assert sorted(i for i, state in states.items() if state == "succeeded") == ids[:6], states


@pytest.mark.parametrize(
    ("policy", "top_row"),
    [("pad", (0, 0, 0)), ("crop", (200, 40, 90)), ("fit", (200, 40, 90))],
)
def test_the_chunk_fits_inputs_by_the_chunks_resize_policy(
    policy: str, top_row: tuple[int, int, int], redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """A wide input through the resize stage: padding leaves black bars above and below, cropping and
    stretching fill the square; the fetch must fit by the policy too, or every output is a crop."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    register(client, "job", tmp_path / "out", ["wide"])
    chunk = resize_chunk(tmp_path, ["wide"])
    Image.new("RGB", (48, 16), (200, 40, 90)).save(tmp_path / "in" / "wide.png")  # replaces the square one
    params = ResolvedParams.model_validate({"size": (16, 16), "resize": policy})
    chunk = chunk.model_copy(update={"params": params})
    process_chunk(chunk, context(client, cpu_model(max_batch=4), threads=0))
    output = Image.open(tmp_path / "out" / "job" / "wide" / "s0-resize.png").convert("RGB")
    assert output.size == (16, 16)
    assert output.getpixel((8, 0)) == top_row and output.getpixel((8, 8)) == (200, 40, 90)
