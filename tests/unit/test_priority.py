"""Job priorities against a real Redis, no worker processes: every chunk (first stage, handover,
retry) is sent at its job's priority into the Redis list kombu keeps for it, `--priority` overrides
the spec's without changing the job id, and the queue-depth metric counts every priority's list."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
import typer
from typer.testing import CliRunner

from jobs import cli, redrive
from jobs.broker import producer_app
from jobs.embedded import EmbeddedRedis
from jobs.manifest import ValidatedJob
from jobs.metrics import BrokerCollector
from jobs.producer import prepared, send_chunks, submit
from jobs.registry import Registry
from jobstate.store import JobStore
from kits.helpers import write_image, write_job
from schemas.job import Priority
from schemas.messages import PRIORITY_STEPS, RUN_CHUNK_TASK, Chunk, JobEnd, priority_lists
from schemas.registry import BUILTIN_MODELS
from schemas.settings import Settings
from workers.chunk import WorkerContext, process_chunk
from workers.job_end import EndContext, end_job
from workers.models import LoadedModel

REGISTRY = Registry.load(None)
QUEUE = "imgjobs.cpu"
LEVELS: tuple[Priority, ...] = ("high", "normal", "low")  # the order workers take them in
RESIZE: dict[str, object] = {"type": "resize", "size": [16, 16]}


def priority_job(
    folder: Path, priority: Priority | None, count: int = 2, stages: int = 1, images: bool = True
) -> Path:
    """A resize job of `count` items (with their inputs unless `images` is false), at `priority`
    (the spec says none when None)."""
    if images:
        write_image(folder / "in" / "a.png")
    rows = [{"id": f"i{n}", "image": "in/a.png" if images else f"in/{n}.png"} for n in range(count)]
    spec = write_job(folder, rows, stage=RESIZE, output=str(folder / "out"), name=folder.name)
    data = json.loads(spec.read_text())
    data["stages"] = [RESIZE] * stages
    if priority is not None:
        data["priority"] = priority
    spec.write_text(json.dumps(data))
    return spec


def submitted(spec: Path, server: EmbeddedRedis, chunk_size: int = 1) -> ValidatedJob:
    settings = Settings(chunk_size=chunk_size)
    with prepared(spec, REGISTRY, settings) as job:
        submit(job, settings, server.url)
    return job


def waiting(client: redis.Redis, queue: str = QUEUE) -> dict[Priority, list[dict[str, Any]]]:
    """The task arguments of every message waiting in each priority's list of `queue`, oldest first."""
    found: dict[Priority, list[dict[str, Any]]] = {}
    for level, name in zip(LEVELS, priority_lists(queue), strict=True):
        raws = reversed(client.lrange(name, 0, -1))  # kombu pushes on the left and pops on the right
        found[level] = [json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0] for raw in raws]
    return found


def every_list(client: redis.Redis) -> set[str]:
    return {str(name) for name in client.scan_iter(match="imgjobs.*", _type="list")}


def test_the_lists_are_those_celery_sends_each_priority_to(redis_server: EmbeddedRedis) -> None:
    app = producer_app(Settings(), redis_server.url)
    for level in LEVELS:
        app.send_task("imgjobs.nothing", args=[level], queue=QUEUE, priority=PRIORITY_STEPS[level])
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert every_list(client) == set(priority_lists(QUEUE))
    assert [len(found) for found in waiting(client).values()] == [1, 1, 1]
    assert priority_lists(QUEUE)[0] == QUEUE  # high: the list a message without a priority goes to


def test_submit_sends_each_job_s_chunks_at_its_priority(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    jobs = {level: submitted(priority_job(tmp_path / level, level), redis_server) for level in LEVELS}
    default = submitted(priority_job(tmp_path / "unsaid", None), redis_server)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    found = waiting(client)
    for level, job in jobs.items():
        assert [args["chunk_id"] for args in found[level] if args["job_id"] == job.job_id] == [
            f"{job.job_id}:s0:c0",
            f"{job.job_id}:s0:c1",
        ], level
    assert [args["job_id"] for args in found["normal"]].count(default.job_id) == 2  # the spec's default
    assert all("priority" not in args for level in LEVELS for args in found[level])  # not an argument


def test_priority_overrides_the_spec_s_on_submit_and_run_and_keeps_the_job_id(
    tmp_path: Path, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = priority_job(tmp_path / "job", "high")
    with prepared(spec, REGISTRY, Settings()) as as_written:
        job_id = as_written.job_id
    monkeypatch.setenv("IMGJOBS_BROKER_URL", redis_server.url)
    monkeypatch.setenv("IMGJOBS_CHUNK_SIZE", "1")
    done = CliRunner().invoke(cli.app, ["submit", str(spec), "--priority", "low"])
    assert done.exit_code == 0, done.output
    assert done.stdout.strip().splitlines()[-1] == job_id
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert JobStore(client).meta(job_id).spec.priority == "low"
    assert [len(found) for found in waiting(client).values()] == [0, 0, 2]

    bad = CliRunner().invoke(cli.app, ["submit", str(spec), "--priority", "urgent"])
    assert bad.exit_code == 2 and "urgent" in bad.output

    given: list[Priority] = []

    def stop_at_submit(job: ValidatedJob, *_: object) -> None:
        given.append(job.spec.priority)
        raise typer.Exit(9)

    monkeypatch.setattr(cli, "submit_job", stop_at_submit)
    ran = CliRunner().invoke(cli.app, ["run", str(spec), "--priority", "normal"])
    assert (ran.exit_code, given) == (9, ["normal"]), ran.output
    ran = CliRunner().invoke(cli.app, ["run", str(spec)])
    assert (ran.exit_code, given[1:]) == (9, ["high"]), ran.output  # no option: the spec's


def ctx_sending_to(server: EmbeddedRedis, store: JobStore) -> WorkerContext:
    """The chunk code's context as a worker has it, with Celery's real send for the next stages."""
    app = producer_app(Settings(), server.url)
    return WorkerContext(
        model=LoadedModel("cpu", BUILTIN_MODELS["cpu"]),
        settings=Settings(),
        store=store,
        send_chunk=lambda chunk, queue, priority: app.send_task(
            RUN_CHUNK_TASK, **chunk.send_options(queue, priority)
        ),
        send_end=lambda end: None,
    )


def test_a_handover_goes_at_the_job_s_priority(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    store = JobStore(client)
    job = submitted(priority_job(tmp_path / "low", "low", count=2, stages=2), redis_server, chunk_size=2)
    client.delete(*priority_lists(QUEUE))  # run here, by the workers' own code, instead of by a worker
    # As a worker gets it: the priority is the message's, not an argument, so the chunk says normal.
    (args,) = Chunk.model_validate(store.meta(job.job_id).first_chunk(0).task_args()[0]).task_args()
    process_chunk(Chunk.model_validate(args), ctx_sending_to(redis_server, store))
    found = waiting(client)
    assert [(a["stage_index"], a["job_id"]) for a in found["low"]] == [(1, job.job_id)]
    assert found["high"] == found["normal"] == []


def test_a_retry_goes_at_the_job_s_priority(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    store = JobStore(client)
    job = submitted(priority_job(tmp_path / "low", "low", count=2, images=False), redis_server, chunk_size=2)
    client.delete(*priority_lists(QUEUE))
    ends: list[JobEnd] = []
    ctx = ctx_sending_to(redis_server, store)
    process_chunk(store.meta(job.job_id).first_chunk(0), replace(ctx, send_end=ends.append))
    for end in ends:
        end_job(end, EndContext(store, Settings()), token="t")
    assert store.status(job.job_id).failed == 2  # no inputs

    app = producer_app(Settings(), redis_server.url)
    sent = redrive.retry(
        store, job.job_id, None, lambda meta, chunks: send_chunks(app, meta, chunks), ends.append
    )
    assert sent == 2
    found = waiting(client)
    assert [a["chunk_id"] for a in found["low"]] == [f"{job.job_id}:r1:s0:c0"]
    assert found["high"] == found["normal"] == []


def test_queue_depth_counts_every_priority_s_list(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    for level, count in zip(LEVELS, (1, 2, 3), strict=True):
        submitted(priority_job(tmp_path / level, level, count=count), redis_server)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert every_list(client) == set(priority_lists(QUEUE))
    (depth, _items) = BrokerCollector(client).collect()
    assert [(sample.labels, sample.value) for sample in depth.samples] == [({"queue": QUEUE}, 6.0)]
