"""The producer against a real Redis, no workers: the manifest validated and written as parts in one
pass, the parts published to the job's storage and one small chunk per part queued; a submission that
dies part-way resumes without losing or repeating a part; what goes over the broker reads back as
the same chunk."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import TypeAdapter

from jobs import plan, producer
from jobs.embedded import EmbeddedRedis
from jobs.manifest import ValidatedJob, validate_job
from jobs.registry import Registry
from jobstate import keys
from jobstate.meta import chunk_size_for
from jobstate.parts import JobParts
from jobstate.storage import open_storage
from jobstate.store import JobStore
from kits.helpers import local_model, stage_plan, write_job
from schemas.errors import BrokerUnavailableError, SpecError
from schemas.job import PARAM_OVERRIDES, Defaults, Item, StageSpec, resolve_params
from schemas.messages import Chunk, StagePlan, WorkerModel, priority_lists
from schemas.registry import BUILTIN_MODELS, ModelEntry, ResolvedModel
from schemas.settings import Settings

REGISTRY = Registry.load(None)
QUEUE = "imgjobs.cpu"
NORMAL = priority_lists(QUEUE)[1]  # where a job of the default priority queues its chunks


def resize_job(folder: Path, count: int, chunk_size: int | None = 4) -> ValidatedJob:
    rows = [{"id": f"i{n:03d}", "image": f"s3://bucket/in/{n}.png", "seed": n} for n in range(count)]
    spec = write_job(folder, rows, stage={"type": "resize"}, output=str(folder / "out"))
    return validate_job(spec, REGISTRY, folder / "parts", chunk_size)


def queued(client: redis.Redis) -> list[dict[str, Any]]:
    """The task arguments of every chunk waiting on the cpu queue, from kombu's Redis envelope."""
    bodies = [json.loads(base64.b64decode(json.loads(raw)["body"])) for raw in client.lrange(NORMAL, 0, -1)]
    return [body[0][0] for body in bodies]


def part_ids(job: ValidatedJob, server: EmbeddedRedis) -> list[list[str]]:
    meta = JobStore(redis.Redis.from_url(server.url, decode_responses=True)).meta(job.job_id)
    parts = JobParts(open_storage(meta.output, meta.job_id), meta.run_id)
    return [[item.id for item in parts.items(part)] for part in range(meta.parts)]


def test_submit_publishes_the_parts_and_queues_one_small_chunk_each(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    job = resize_job(tmp_path, 50)
    submitted = producer.submit(job, Settings(), redis_server.url)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    ids = [f"i{n:03d}" for n in range(50)]
    assert (submitted.chunks, submitted.resumed, submitted.already_submitted) == (13, False, False)
    assert part_ids(job, redis_server) == [ids[start : start + 4] for start in range(0, 50, 4)]
    chunks = [Chunk.model_validate(args) for args in reversed(queued(client))]  # kombu pushes on the left
    assert [chunk.part for chunk in chunks] == list(range(13))  # taken in part order
    assert all(chunk.chunk_id == f"{job.job_id}:s0:c{chunk.part}" for chunk in chunks)
    assert max(len(raw) for raw in client.lrange(NORMAL, 0, -1)) < 1500  # a name, never the items
    meta = JobStore(client).meta(job.job_id)
    assert (meta.parts_sent, meta.enqueued_at is not None, meta.total) == (13, True, 50)
    again = producer.submit(job, Settings(), redis_server.url)
    assert again.already_submitted and client.llen(NORMAL) == 13


def test_nothing_is_written_for_a_manifest_that_does_not_validate(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [
        {"id": "a", "image": "s3://b/a.png"},
        {"id": "b", "image": "s3://b/b.png", "steps": 0},
    ]
    spec = write_job(tmp_path, rows, stage={"type": "resize"}, output=str(tmp_path / "out"))
    with pytest.raises(SpecError, match="steps"), producer.prepared(spec, REGISTRY, Settings()) as _job:
        pass
    assert not (tmp_path / "out").exists()


def test_a_submission_that_died_part_way_resumes_without_losing_or_repeating(
    tmp_path: Path, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = resize_job(tmp_path, 40, chunk_size=2)
    sent: list[int] = []
    send = producer.send_chunks

    def dies_at_the_third_batch(app: Any, meta: Any, chunks: list[Chunk]) -> None:
        if len(sent) == 2:
            raise BrokerUnavailableError("the producer's machine went away")
        sent.append(len(chunks))
        send(app, meta, chunks)

    with monkeypatch.context() as patch:
        patch.setattr(producer, "send_chunks", dies_at_the_third_batch)
        with pytest.raises(BrokerUnavailableError, match="went away"):
            producer.submit(job, Settings(), redis_server.url)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert sent == [1, 2]  # batches grow from one chunk
    meta = JobStore(client).meta(job.job_id)
    assert (meta.parts_sent, meta.enqueued_at) == (3, None)

    resumed = producer.submit(job, Settings(), redis_server.url)
    assert resumed.resumed and not resumed.already_submitted and resumed.chunks == 17
    assert sorted(Chunk.model_validate(args).part for args in queued(client)) == list(range(20))
    assert JobStore(client).meta(job.job_id).enqueued_at is not None
    assert [ids for part in part_ids(job, redis_server) for ids in part] == [f"i{n:03d}" for n in range(40)]


def test_a_chunk_reads_back_the_same_from_its_task_arguments() -> None:
    chunk = Chunk(
        job_id="job",
        run_id="0123456789abcdef",
        chunk_id="job:s0:c7/s1.0a1b2c3d4e5f",
        part=7,
        stage_index=1,
        epoch=2,
        round=1,
        slots=base64.b64encode(b"\xf0").decode(),
        handover_part="_imgjobs/0123456789abcdef/carry/p0000007/s1.0a1b2c3d4e5f.jsonl",
    )
    (args,) = chunk.task_args()
    sent: dict[str, Any] = json.loads(json.dumps(args))  # what crosses the broker
    assert Chunk.model_validate(sent) == chunk
    assert "null" not in json.dumps(sent)  # unset fields are left out, not sent as null
    first = chunk.model_copy(
        update={"stage_index": 0, "epoch": 0, "round": 0, "slots": None, "handover_part": None}
    )
    assert set(first.task_args()[0]) == {"job_id", "run_id", "chunk_id", "part", "stage_index"}
    assert chunk.task_repr() == "<job:s0:c7/s1.0a1b2c3d4e5f>"


@pytest.mark.parametrize(
    "stage",
    [
        {"type": "img2img", "model": "sd15"},
        {"type": "upscale", "model": "sd15"},
        {"type": "text2img", "model": "sd15"},
        {"type": "resize"},
    ],
)
def test_only_same_named_item_fields_change_a_stages_parameters(stage: dict[str, str]) -> None:
    """Parameters are resolved once per distinct set of an item's overrides (at validation and in the
    chunk runner); that is right only while no other item field affects resolve_params."""
    spec = TypeAdapter(StageSpec).validate_python(stage)
    defaults = Defaults(size=(64, 64), strength=0.6)
    plain = Item(id="a", image="a.png")
    others = {
        "id": "b",
        "image": "b.png",
        "control_image": "c.png",
        "prompt": "p",
        "negative_prompt": "n",
        "seed": 9,
        "sample": {"shard": "s3://b/0.tar", "member": "k.jpg", "offset": 512, "size": 9},
        "key": "k/1",
        "metadata": {"url": "https://example.com/k"},
    }
    assert set(others) == set(Item.model_fields) - set(PARAM_OVERRIDES)
    assert resolve_params(plain.model_copy(update=others), spec, defaults) == resolve_params(
        plain, spec, defaults
    )


def test_two_submits_of_one_job_at_once_create_it_once(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    job = resize_job(tmp_path, 3000, chunk_size=8)
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: producer.submit(job, Settings(), redis_server.url), range(2)))
    # One created it; the other resumed it, or found it submitted already.
    assert sorted(run.resumed or run.already_submitted for run in runs) == [False, True]
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert client.smembers(keys.JOBS) == {job.job_id}
    assert set(Chunk.model_validate(args).part for args in queued(client)) == set(range(375))
    assert sum(len(ids) for ids in part_ids(job, redis_server)) == 3000


def test_model_entries_with_every_option_read_back_from_every_message(tiny_sd_dir: Path) -> None:
    """A worker reads its model from `imgjobs worker`'s JSON, and a job's meta carries its stages'
    models: an entry must validate again exactly as it was written."""
    entry = ModelEntry(source=str(tiny_sd_dir), dtype="bfloat16", static_batch=16, compile=True, warmup=True)
    assert entry.batch_size == 16
    assert ModelEntry.model_validate_json(entry.model_dump_json()) == entry
    worker = WorkerModel(name="tiny-sd", entry=entry)
    assert WorkerModel.model_validate_json(worker.model_dump_json()) == worker
    planned = stage_plan({"type": "img2img"}, ResolvedModel(name="tiny-sd", entry=entry))
    assert StagePlan.model_validate(json.loads(json.dumps(planned.model_dump(mode="json")))) == planned
    with pytest.raises(ValueError, match="static_batch sets the batch size"):
        ModelEntry(source="x", static_batch=16, max_batch=8)


def test_local_image_paths_become_the_same_absolute_paths_resolve_gives(tmp_path: Path) -> None:
    """Paths are made absolute lexically (no system call per item); where ".." follows a symbolic
    link, where lexical and real paths part, the file system decides."""
    (tmp_path / "real" / "in").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "link").symlink_to(tmp_path / "real" / "in")
    items_dir = (tmp_path / "data").resolve()
    for relative in ["a.png", "./in/a.png", "in//a.png", "link/../a.png", "link/a.png"]:
        made = plan.normalized(Item(id="x", image=relative), items_dir).image
        assert made is not None and Path(made).is_absolute()
        # the same file as resolve() names (which also follows a final link, as opening it does)
        assert Path(made).resolve() == (items_dir / relative).resolve(), relative
    assert plan.normalized(Item(id="x", image="link/../a.png"), items_dir).image == str(
        tmp_path.resolve() / "real" / "a.png"
    )
    assert plan.normalized(Item(id="x", image="./in/a.png"), items_dir).image == str(
        items_dir / "in" / "a.png"
    )
    assert plan.normalized(Item(id="x", image="/abs/a.png"), items_dir).image == "/abs/a.png"
    assert plan.normalized(Item(id="x", image="s3://b/k.png"), items_dir).image == "s3://b/k.png"


def test_parts_keep_manifest_lines_that_need_no_change(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [
        {"id": "remote", "image": "s3://b/a.png", "prompt": "kept as written"},
        {"id": "local", "image": "in/b.png", "seed": 3},
    ]
    spec = write_job(tmp_path, rows, stage={"type": "resize"})
    job = validate_job(spec, REGISTRY, tmp_path / "parts", 2)
    assert job.parts is not None and job.parts.parts == 1
    lines = (tmp_path / "parts" / plan.PartWriter.name(0)).read_text().splitlines()
    assert lines[0] == json.dumps(rows[0])  # byte for byte
    assert Item.model_validate_json(lines[1]) == Item(
        id="local", image=str(tmp_path.resolve() / "in" / "b.png"), seed=3
    )


def test_a_job_is_chunked_by_its_models_chunk_size_unless_the_setting_overrides(tmp_path: Path) -> None:
    assert resize_job(tmp_path / "a", 50, chunk_size=None).chunk_size == 1024  # the built-in cpu model
    # Only the stages' models matter here, whatever the stages are.
    resize = stage_plan({"type": "img2img"}, ResolvedModel(name="cpu", entry=BUILTIN_MODELS["cpu"]))
    small = stage_plan({"type": "img2img"}, local_model("small", tmp_path, chunk_size=16), index=1)
    plain = stage_plan({"type": "img2img"}, local_model("plain", tmp_path), index=1)
    assert chunk_size_for([resize], None) == 1024
    assert chunk_size_for([resize, small], None) == 16  # a part's items go through both together
    assert chunk_size_for([resize, plain], None) == 64  # the default for a model that sets none
    assert chunk_size_for([resize, small], 5) == 5  # IMGJOBS_CHUNK_SIZE wins
    assert producer._batches(range(3, 20)) == [
        range(3, 4),
        range(4, 6),
        range(6, 10),
        range(10, 18),
        range(18, 20),
    ]
