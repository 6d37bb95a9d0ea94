"""A chunk runs as calls of its model's batch size, with inputs fetched and outputs written on I/O
threads while a call runs; CPU `resize` stage and tiny SD, real Redis, jobs made by jobstate.seed.
What must hold: every item is accounted for once, a failed write stops the chunk without losing what
was written, and the threads change nothing in the outputs."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from PIL import Image

from jobs.embedded import EmbeddedRedis
from jobstate import layout
from jobstate.bits import ones
from jobstate.storage import LocalStorage, Storage
from kits.helpers import local_model, stage_plan, write_image
from schemas.errors import StorageError
from schemas.job import Defaults, Item
from schemas.registry import BUILTIN_MODELS, ModelEntry
from schemas.settings import Settings
from tests.chunkkit import Harness, harness, resize_recipe, watched
from workers.chunk import RetryChunk
from workers.engine import LOOKAHEAD
from workers.events import ChunkInfo, EngineEvents, subscribed
from workers.models import LoadedModel
from workers.stages.common import StageBatch
from workers.stages.kinds import Stage


def resize_items(tmp_path: Path, ids: list[str], missing: tuple[str, ...] = ()) -> list[Item]:
    rows = []
    for index, item_id in enumerate(ids):
        path = tmp_path / "in" / f"{item_id}.png"
        if item_id not in missing:
            write_image(path, size=(24, 24), color=(index * 20, 40, 90))
        rows.append(Item(id=item_id, image=str(path)))
    return rows


def cpu_model(max_batch: int) -> LoadedModel:
    return LoadedModel("cpu", BUILTIN_MODELS["cpu"].model_copy(update={"max_batch": max_batch}))


def job_of(
    server: EmbeddedRedis,
    tmp_path: Path,
    rows: list[Item],
    model: LoadedModel,
    threads: int,
    storage: Storage | None = None,
) -> Harness:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    return harness(
        client, rows, tmp_path / "out", model=model, settings=Settings(io_threads=threads), storage=storage
    )


class CountingCalls:
    """The resize stage, recording each call's batch size after running before_call; the stage itself
    runs unchanged. `stages` is the engine's table with it in place of the resize stage."""

    def __init__(self, before_call: Callable[[], None] = lambda: None) -> None:
        self.sizes: list[int] = []
        self.before_call = before_call

    def seen(self, batch: StageBatch) -> None:
        self.before_call()
        self.sizes.append(len(batch))

    @property
    def stages(self) -> Mapping[str, Stage]:
        return watched("resize", self.seen)


class ImageServer(ThreadingHTTPServer):
    """Serves a 24x24 PNG at every path on loopback, counting the requests: the inputs fetched."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _PngHandler)
        self.served = 0
        self.lock = threading.Lock()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}.png"


class _PngHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        assert isinstance(self.server, ImageServer)
        with self.server.lock:
            self.server.served += 1
        image = io.BytesIO()
        Image.new("RGB", (24, 24), (len(self.path) * 10 % 256, 40, 90)).save(image, format="PNG")
        self.send_response(200)
        self.send_header("Content-Length", str(len(image.getvalue())))
        self.end_headers()
        self.wfile.write(image.getvalue())

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class FailingPuts(LocalStorage):
    """Local storage whose puts fail from the `fail_from`-th on (counting from 1)."""

    def __init__(self, root: Path, fail_from: int) -> None:
        super().__init__(root)
        self.fail_from, self.puts = fail_from, 0

    def put(self, key: str, data: bytes, content_type: str) -> str:
        if not key.startswith(f"{layout.PARTS}/"):  # outputs fail; the job's own parts are written
            self.puts += 1
            if self.puts >= self.fail_from:
                raise StorageError(f"injected: cannot write {key}")
        return super().put(key, data, content_type)


class DutyCycles(EngineEvents):
    def __init__(self) -> None:
        self.chunks: list[tuple[float, float]] = []
        self.unet_s: list[float] = []

    def chunk_done(self, chunk: ChunkInfo, elapsed_s: float, busy_s: float, unet_s: float) -> None:
        self.chunks.append((elapsed_s, busy_s))
        self.unet_s.append(unet_s)


@pytest.mark.parametrize("threads", [0, 3])
def test_a_chunk_runs_in_calls_of_the_batch_size_and_a_bad_item_fails_alone(
    threads: int, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    ids = [f"i{index}" for index in range(10)]
    job = job_of(redis_server, tmp_path, resize_items(tmp_path, ids, missing=("i4",)), cpu_model(3), threads)
    calls = CountingCalls()
    job.stages = calls.stages
    with subscribed(DutyCycles()) as duty:
        job.run_all()

    # i4's batch runs with the two items it has left; the failure costs no call.
    assert calls.sizes == [3, 2, 3, 1]
    status = job.store.status("job")
    assert (status.succeeded, status.failed, status.finished_at is not None) == (9, 1, True)
    for item_id in set(ids) - {"i4"}:
        assert Image.open(tmp_path / "out" / "job" / item_id / "s0-resize.png").size == (16, 16)
    ((elapsed, busy),) = duty.chunks
    assert 0.0 < busy <= elapsed
    assert duty.unet_s == [0.0], "the resize stage has no UNet"


@pytest.mark.parametrize(("threads", "most_held"), [(0, 3), (2, 9)])
def test_inputs_are_fetched_ahead_only_on_io_threads(
    threads: int, most_held: int, redis_server: EmbeddedRedis, tmp_path: Path, image_server: ImageServer
) -> None:
    """In line, a batch's inputs are fetched just before its call (fetching ahead would overlap nothing
    and only hold more images); on threads, up to LOOKAHEAD batches ahead of the call. The inputs are
    served over http on loopback, which counts their fetches."""
    rows = [Item(id=f"i{index}", image=image_server.url(f"i{index}")) for index in range(12)]
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    settings = Settings(io_threads=threads, http_allow_private=True)
    job = harness(client, rows, tmp_path / "out", model=cpu_model(3), settings=settings)
    held_at_calls: list[int] = []

    def count_held() -> None:
        held_at_calls.append(image_server.served - 3 * len(held_at_calls))  # fetched but not yet run

    job.stages = CountingCalls(before_call=count_held).stages
    assert LOOKAHEAD == 2
    job.run_all()
    assert len(held_at_calls) == 4 and max(held_at_calls) <= most_held, held_at_calls
    if threads == 0:
        assert held_at_calls == [3, 3, 3, 3]


def test_a_failed_write_stops_the_chunk_and_keeps_what_was_written(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    ids = [f"i{index}" for index in range(8)]
    # Four writes succeed, then every write fails. Which calls' writes got the four depends on how the
    # I/O threads ran; what must hold is that no written item is lost and none is done twice.
    broken = FailingPuts(tmp_path / "out" / "job", fail_from=5)
    job = job_of(redis_server, tmp_path, resize_items(tmp_path, ids), cpu_model(2), 2, storage=broken)
    (chunk,) = job.chunks
    with pytest.raises(RetryChunk, match="injected"):
        job.run(chunk, may_retry=True)
    status = job.store.status("job")
    assert 0 < status.succeeded <= 4 and (status.failed, status.running) == (0, 0), status
    finished = {position for position in ones(job.store.bits(job.meta).done, 8)}
    for position in finished:
        assert (tmp_path / "out" / "job" / ids[position] / "s0-resize.png").is_file()
    assert status.finished_at is None

    calls = CountingCalls()
    job.stages = calls.stages
    broken.fail_from = 10**9  # storage is back
    job.run(chunk, retries=1)  # the retry
    assert sum(calls.sizes) == len(ids) - len(finished)  # only the items still open run again
    status = job.store.status("job")
    assert (status.succeeded, status.failed, status.finished_at is not None) == (8, 0, True)


@pytest.mark.slow
def test_io_threads_and_batch_size_change_nothing_in_the_outputs(
    tiny_sd_dir: Path, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    model_ref = local_model("tiny-sd", tiny_sd_dir)
    plan = stage_plan({"type": "img2img", "strength": 0.6, "guidance_scale": 7.5, "steps": 5}, model_ref)
    rng = np.random.default_rng(0)
    rows = []
    for index in range(5):
        path = tmp_path / "in" / f"i{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(path)
        rows.append(Item(id=f"i{index}", image=str(path), prompt=f"prompt {index}", seed=index))
    outputs = {}
    for job_id, max_batch, threads in (("one-call", 8, 0), ("pipelined", 2, 3)):
        entry: ModelEntry = model_ref.entry.model_copy(update={"max_batch": max_batch})
        job = harness(
            client,
            rows,
            tmp_path / "out",
            recipe=[plan],
            model=LoadedModel("tiny-sd", entry),
            settings=Settings(io_threads=threads),
            job_id=job_id,
            defaults=Defaults(size=(32, 32)),
        )
        job.run_all()
        assert job.store.status(job_id).succeeded == 5
        outputs[job_id] = [
            np.asarray(Image.open(tmp_path / "out" / job_id / f"i{index}" / "s0-img2img.png"), dtype=np.int16)
            for index in range(5)
        ]
    for one_call, pipelined in zip(outputs["one-call"], outputs["pipelined"], strict=True):
        # Batches of 2 and of 5 sum convolutions in another order: at most one 8-bit step apart.
        assert np.abs(one_call - pipelined).max() <= 1
    assert np.abs(outputs["one-call"][0] - outputs["one-call"][1]).max() > 10  # the items differ


def test_a_fetch_that_fails_for_now_leaves_only_its_item_to_the_retry(
    redis_server: EmbeddedRedis, tmp_path: Path, without_aws_credentials: None
) -> None:
    """i6's input is on S3, which this worker cannot reach for now (no credentials: a StorageError,
    which may pass); the others are local and are read, run and written on the I/O threads."""
    ids = [f"i{index}" for index in range(8)]
    rows = [
        Item(id=row.id, image="s3://bucket/i6.png") if row.id == "i6" else row
        for row in resize_items(tmp_path, ids)
    ]
    job = job_of(redis_server, tmp_path, rows, cpu_model(2), 2)
    with pytest.raises(RetryChunk, match=r"s3://bucket/i6\.png"):
        job.run(job.chunks[0], may_retry=True)
    assert sorted(ones(job.store.bits(job.meta).done, 8)) == [0, 1, 2, 3, 4, 5, 7]


@pytest.mark.parametrize(
    ("policy", "top_row"),
    [("pad", (0, 0, 0)), ("crop", (200, 40, 90)), ("fit", (200, 40, 90))],
)
def test_the_chunk_fits_inputs_by_the_items_resize_policy(
    policy: str, top_row: tuple[int, int, int], redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """A wide input through the resize stage: padding leaves black bars above and below, cropping and
    stretching fill the square; the fetch must fit by the policy too, or every output is a crop."""
    path = tmp_path / "in" / "wide.png"
    path.parent.mkdir(parents=True)
    Image.new("RGB", (48, 16), (200, 40, 90)).save(path)
    item = Item.model_validate({"id": "wide", "image": str(path), "resize": policy})
    job = job_of(redis_server, tmp_path, [item], cpu_model(4), 0)
    job.run_all()
    output = Image.open(tmp_path / "out" / "job" / "wide" / "s0-resize.png").convert("RGB")
    assert output.size == (16, 16)
    assert output.getpixel((8, 0)) == top_row and output.getpixel((8, 8)) == (200, 40, 90)


@pytest.mark.parametrize("on_nsfw", ["keep", "fail"])
def test_an_output_the_safety_checker_flags_is_recorded_and_kept_or_failed(
    on_nsfw: str,
    tiny_sd_dir: Path,
    redis_server: EmbeddedRedis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    model_ref = local_model("tiny-sd", tiny_sd_dir, on_nsfw=on_nsfw)
    plan = stage_plan({"type": "img2img", "strength": 0.5, "steps": 2}, model_ref)
    rows = [
        Item(id=item_id, image=str(write_image(tmp_path / "in" / f"{item_id}.png", (32, 32))))
        for item_id in "abc"
    ]
    loaded = LoadedModel("tiny-sd", model_ref.entry)

    def flag_the_second(image: Any, device: Any, dtype: Any) -> tuple[Any, list[bool]]:
        # As diffusers' checker does: a flagged image comes back black.
        flags = [row == 1 for row in range(len(image))]
        return torch.where(torch.tensor(flags).view(-1, 1, 1, 1), torch.zeros_like(image), image), flags

    monkeypatch.setattr(loaded.img2img(None), "run_safety_checker", flag_the_second)
    job = harness(
        client, rows, tmp_path / "out", recipe=[plan], model=loaded, defaults=Defaults(size=(32, 32))
    )
    job.run_all()
    results = job.results()
    assert [results[item_id].nsfw for item_id in "abc"] == [False, True, False]
    assert [results[item_id].status for item_id in "ac"] == ["succeeded", "succeeded"]
    report = (job.job_dir / "report.html").read_text()
    assert report.count("flagged by the safety checker") == 1
    flagged = results["b"]
    if on_nsfw == "keep":
        assert flagged.status == "succeeded" and flagged.stages[-1].nsfw
        output = np.asarray(Image.open(job.job_dir / "b" / "s0-img2img.png"))
        assert output.max() == 0, "kept as the pipeline made it: black"
    else:
        assert flagged.status == "failed" and flagged.error is not None
        assert flagged.error.type == "NsfwFlaggedError" and not flagged.outputs
        assert job.store.status("job").failed == 1


def test_local_inputs_are_read_only_under_the_allowed_folders_and_the_jobs_own(
    redis_server: EmbeddedRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    inside = write_image(allowed / "a.png", size=(24, 24))
    outside = write_image(elsewhere / "b.png", size=(24, 24))
    (allowed / "link.png").symlink_to(outside)  # inside by its name, outside by what it is
    rows = [
        Item(id="a", image=str(inside)),
        Item(id="b", image=str(outside)),
        Item(id="c", image=f"file://{outside}"),
        Item(id="d", image=str(allowed / "link.png")),
    ]
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    # Two stages: the second reads the first's output from the job's own folder, which is always allowed.
    job = harness(
        client,
        rows,
        tmp_path / "out",
        recipe=resize_recipe(stages=2),
        settings=Settings(local_input_roots=f"{tmp_path / 'nowhere'}:{allowed}"),
    )
    job.run_all()
    results = job.results()
    assert results["a"].status == "succeeded" and len(results["a"].stages) == 2
    for item_id in "bcd":
        error = results[item_id].error
        assert error is not None and error.type == "InputImageError", item_id
        assert "IMGJOBS_LOCAL_INPUT_ROOTS" in error.message, error.message
    nothing = harness(
        client, rows[:1], tmp_path / "none", job_id="unset", settings=Settings(local_input_roots=None)
    )
    nothing.run_all()
    assert nothing.results()["a"].status == "failed", "unset: no local input at all"
