"""The producer against a real Redis, no workers: items recorded and chunks queued in one streamed,
pipelined pass; a submission that dies part-way resumes without losing or repeating an item; what goes
over the broker reads back as the same chunk."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import TypeAdapter

from jobs import plan, producer
from jobs.embedded import EmbeddedRedis
from jobs.manifest import ParamsResolver, ValidatedJob, iter_items, validate_job
from jobs.registry import Registry
from schemas import keys
from schemas.job import Defaults, Item, ResolvedParams, StageSpec, resolve_params
from schemas.messages import Chunk, WorkerModel
from schemas.registry import BUILTIN_MODELS, ModelEntry, ResolvedModel
from schemas.settings import Settings
from tests.helpers import local_model, stage_plan, write_job

REGISTRY = Registry.load(None)
QUEUE = "imgjobs.cpu"


def resize_job(folder: Path, count: int) -> ValidatedJob:
    rows = [{"id": f"i{n:03d}", "image": f"s3://bucket/in/{n}.png", "seed": n} for n in range(count)]
    return validate_job(write_job(folder, rows, stage={"type": "resize"}), REGISTRY)


def queued_items(client: redis.Redis) -> list[str]:
    """The item ids of every chunk waiting on the cpu queue, decoded from kombu's Redis envelope."""
    ids = []
    for raw in client.lrange(QUEUE, 0, -1):
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        ids += [member["item"]["id"] for member in body[0][0]["items"]]
    return ids


def test_submit_records_every_item_in_order_and_queues_each_once(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    job = resize_job(tmp_path, 50)
    submitted = producer.submit(job, Settings(chunk_size=4), redis_server.url)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    ids = [f"i{n:03d}" for n in range(50)]
    assert (submitted.chunks, submitted.resumed, submitted.already_submitted) == (13, False, False)
    assert client.lrange(keys.job_order(job.job_id), 0, -1) == ids
    assert client.hgetall(keys.job_items(job.job_id)) == dict.fromkeys(ids, "pending")
    assert client.hgetall(keys.job_counts(job.job_id)) == {"pending": "50"}
    assert sorted(queued_items(client)) == ids
    assert client.hexists(keys.job_meta(job.job_id), "enqueued_at")
    again = producer.submit(job, Settings(chunk_size=4), redis_server.url)
    assert again.already_submitted and client.llen(QUEUE) == 13


def test_a_submission_that_died_part_way_resumes_without_losing_or_repeating(
    tmp_path: Path, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = resize_job(tmp_path, 40)
    ids = [f"i{n:03d}" for n in range(40)]

    def dies_after_17(job: ValidatedJob) -> Iterator[tuple[Item, ResolvedParams]]:
        for number, pair in enumerate(iter_items(job)):
            if number == 17:
                raise RuntimeError("the producer's machine went away")
            yield pair

    with monkeypatch.context() as patch:
        patch.setattr(plan, "iter_items", dies_after_17)
        with pytest.raises(RuntimeError, match="went away"):
            producer.submit(job, Settings(chunk_size=2), redis_server.url)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    sent_before = queued_items(client)
    recorded = client.hgetall(keys.job_items(job.job_id))
    assert sent_before and set(sent_before) <= set(recorded)  # no chunk left before its items were recorded
    assert not client.hexists(keys.job_meta(job.job_id), "enqueued_at")
    # A worker finished one of the queued items meanwhile: the resumed submission must keep it.
    move = client.register_script(keys.TRANSITION_SCRIPT)
    finished = sent_before[0]
    move(
        keys=[keys.job_items(job.job_id), keys.job_counts(job.job_id), keys.job_results(job.job_id)],
        args=keys.transition_args(["pending"], [(finished, "succeeded", "{}")]),
    )

    resumed = producer.submit(job, Settings(chunk_size=2), redis_server.url)
    assert resumed.resumed and not resumed.already_submitted
    assert client.lrange(keys.job_order(job.job_id), 0, -1) == ids
    states = client.hgetall(keys.job_items(job.job_id))
    assert states == {**dict.fromkeys(ids, "pending"), finished: "succeeded"}
    assert client.hgetall(keys.job_counts(job.job_id)) == {"pending": "39", "succeeded": "1"}
    assert set(queued_items(client)) == set(ids)  # repeats are skipped by workers (items finished)
    assert client.hexists(keys.job_meta(job.job_id), "enqueued_at")


def test_a_chunk_reads_back_the_same_from_its_task_arguments(tiny_sd_dir: Path) -> None:
    tiny = local_model("tiny-sd", tiny_sd_dir, max_batch=2)
    recipe = [
        stage_plan(
            {"type": "img2img", "strength": 0.5, "prompt_syntax": "compel"},
            tiny,
            handover="latent",
            save=("image", "latent"),
        ),
        stage_plan(
            {"type": "resize", "format": "jpeg", "resize": "pad"},
            ResolvedModel(name="cpu", entry=BUILTIN_MODELS["cpu"]),
            index=1,
        ),
    ]
    chunk = Chunk.model_validate(
        {
            "job_id": "job",
            "chunk_id": "job:s0:c0/s1.0",
            "output": "s3://bucket/out",
            "stage_index": 1,
            "recipe": recipe,
            "defaults": {"prompt": "a cat", "size": [32, 32]},
            "params": {"size": [32, 32], "resize": "pad"},
            "items": [
                {
                    "item": {"id": "a", "image": "s3://bucket/a.png", "seed": 3, "negative_prompt": "blurry"},
                    "input": {"kind": "latent", "uri": "s3://bucket/out/job/a/s0-img2img.safetensors"},
                    "outputs": {"s0-img2img": "s3://bucket/out/job/a/s0-img2img.png"},
                    "stages": [{"name": "s0-img2img", "model": "tiny-sd", "params": {"size": [32, 32]}}],
                }
            ],
            "dataset": True,
        }
    )
    (args,) = chunk.task_args()
    sent: dict[str, Any] = json.loads(json.dumps(args))  # what crosses the broker
    assert Chunk.model_validate(sent) == chunk
    assert "null" not in json.dumps(sent)  # unset fields are left out, not sent as null
    assert "a cat" not in chunk.task_repr() and "job:s0:c0/s1.0" in chunk.task_repr()


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
    """ParamsResolver shares one resolution among items equal in the fields of ResolvedParams; it is
    right only while no other item field affects resolve_params."""
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
    }
    assert set(others) == set(Item.model_fields) - set(ParamsResolver.OVERRIDES)
    assert resolve_params(plain.model_copy(update=others), spec, defaults) == resolve_params(
        plain, spec, defaults
    )


def test_two_submits_of_one_job_at_once_record_each_item_once(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    job = resize_job(tmp_path, 3000)
    ids = [f"i{n:03d}" for n in range(3000)]
    with ThreadPoolExecutor(2) as pool:
        runs = list(
            pool.map(lambda _: producer.submit(job, Settings(chunk_size=8), redis_server.url), range(2))
        )
    assert sorted(run.resumed for run in runs) == [False, True]  # one created it, the other resumed
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert client.lrange(keys.job_order(job.job_id), 0, -1) == ids
    assert client.hgetall(keys.job_counts(job.job_id)) == {"pending": "3000"}
    assert client.hlen(keys.job_items(job.job_id)) == 3000


def test_model_entries_with_every_option_read_back_from_every_message(tiny_sd_dir: Path) -> None:
    """A worker reads its model from `imgjobs worker`'s JSON, and each chunk carries its stages' models:
    an entry must validate again exactly as it was written."""
    entry = ModelEntry(source=str(tiny_sd_dir), dtype="bfloat16", static_batch=16, compile=True, warmup=True)
    assert entry.batch_size == 16
    assert ModelEntry.model_validate_json(entry.model_dump_json()) == entry
    worker = WorkerModel(name="tiny-sd", entry=entry)
    assert WorkerModel.model_validate_json(worker.model_dump_json()) == worker
    plan = stage_plan({"type": "img2img"}, ResolvedModel(name="tiny-sd", entry=entry))
    chunk = Chunk(
        job_id="job",
        chunk_id="job:s0:c0",
        output="out",
        stage_index=0,
        recipe=[plan],
        defaults=Defaults(),
        params=ResolvedParams(size=(64, 64)),
        items=[{"item": {"id": "a", "image": "a.png"}, "input": {"kind": "image", "uri": "a.png"}}],
    )
    assert Chunk.model_validate(json.loads(json.dumps(chunk.task_args()[0]))) == chunk
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
        made = plan.first_stage_item(Item(id="x", image=relative), items_dir).item.image
        assert made is not None and Path(made).is_absolute()
        # the same file as resolve() names (which also follows a final link, as opening it does)
        assert Path(made).resolve() == (items_dir / relative).resolve(), relative
    assert plan.first_stage_item(Item(id="x", image="link/../a.png"), items_dir).item.image == str(
        tmp_path.resolve() / "real" / "a.png"
    )
    assert plan.first_stage_item(Item(id="x", image="./in/a.png"), items_dir).item.image == str(
        items_dir / "in" / "a.png"
    )
    assert plan.first_stage_item(Item(id="x", image="/abs/a.png"), items_dir).item.image == "/abs/a.png"
    assert plan.first_stage_item(Item(id="x", image="s3://b/k.png"), items_dir).item.image == "s3://b/k.png"


def test_a_job_is_chunked_by_its_models_chunk_size_unless_the_setting_overrides(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    job = resize_job(tmp_path, 50)  # the built-in cpu model: 1024 items a chunk
    assert producer.submit(job, Settings(chunk_size=None), redis_server.url).chunks == 1
    # Only the stages' models matter here, whatever the stages are.
    resize = stage_plan({"type": "img2img"}, ResolvedModel(name="cpu", entry=BUILTIN_MODELS["cpu"]))
    small = stage_plan({"type": "img2img"}, local_model("small", tmp_path, chunk_size=16), index=1)
    plain = stage_plan({"type": "img2img"}, local_model("plain", tmp_path), index=1)
    assert plan.chunk_size_for([resize], None) == 1024
    assert plan.chunk_size_for([resize, small], None) == 16  # a chunk carries its items through both
    assert plan.chunk_size_for([resize, plain], None) == 64  # the default for a model that sets none
    assert plan.chunk_size_for([resize, small], 5) == 5  # IMGJOBS_CHUNK_SIZE wins


def test_a_send_batch_is_bounded_in_items_as_well_as_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks are held until their batch is published: large chunks make smaller batches."""
    monkeypatch.setattr(producer, "SEND_BATCH_ITEMS", 10)
    chunks = list(plan.plan_chunks(resize_job(tmp_path, 50), 4))
    batches = [[len(chunk.items) for chunk in batch] for batch in producer._send_batches(chunks)]
    assert batches == [[4], [4, 4], [4, 4, 4], [4, 4, 4], [4, 4, 4], [2]]  # 12 items reach 10
