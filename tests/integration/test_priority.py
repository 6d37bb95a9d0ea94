"""Job priorities through a real worker process on a real Redis: jobs queued while no worker runs
are taken high first, then normal, then low, whatever order they were submitted in; and a worker
hands a job's items to the next stage's queue at the job's priority."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import redis

from jobs.embedded import EmbeddedRedis
from jobs.producer import prepared, submit
from jobs.registry import Registry
from jobstate.store import JobStore
from kits.helpers import write_image, write_job
from kits.processes import Workers
from schemas.job import Priority
from schemas.messages import priority_lists
from schemas.progress import JobStatus
from schemas.settings import Settings
from tests.integration.test_job_state import wait_until
from tests.integration.test_reliability import wait_finished

pytestmark = pytest.mark.slow

RESIZE: dict[str, object] = {"type": "resize", "size": [16, 16]}
LEVELS: tuple[Priority, ...] = ("high", "normal", "low")  # the order workers take them in


def submitted(
    folder: Path, priority: Priority, stages: list[dict[str, object]], registry: Registry, url: str
) -> str:
    """A job of three items, one chunk each, at `priority`; returns its id."""
    write_image(folder / "in" / "a.png")
    rows = [{"id": f"i{n}", "image": "in/a.png"} for n in range(3)]
    spec = write_job(folder, rows, stage=RESIZE, output=str(folder / "out"), name=folder.name)
    data = json.loads(spec.read_text())
    data.update(stages=stages, priority=priority)
    spec.write_text(json.dumps(data))
    settings = Settings(chunk_size=1)
    with prepared(spec, registry, settings) as job:
        return submit(job, settings, url).job_id


def written_ns(folder: Path, job_id: str) -> list[int]:
    """When each of the job's outputs was written, in nanoseconds."""
    return sorted(path.stat().st_mtime_ns for path in (folder / "out" / job_id).glob("*/s0-resize.png"))


def test_a_worker_takes_high_chunks_first_then_normal_then_low(tmp_path: Path, workers: Workers) -> None:
    registry = Registry.load(None)
    with EmbeddedRedis(tmp_path / "redis") as server:
        # Queued while no worker runs, in the order a worker without priorities would take them.
        submit_order: tuple[Priority, ...] = ("low", "normal", "high")
        ids = {
            level: submitted(tmp_path / level, level, [RESIZE], registry, server.url)
            for level in submit_order
        }
        workers.start("cpu", server.url, registry)
        statuses: dict[Priority, JobStatus] = {
            level: wait_finished(server, job_id, workers) for level, job_id in ids.items()
        }
    assert all(status.succeeded == 3 for status in statuses.values()), workers.logs()
    started = [statuses[level].started_at or 0.0 for level in LEVELS]
    assert started == sorted(started), started
    # Every output of a job was written before the first of the next priority's.
    writes = [written_ns(tmp_path / level, ids[level]) for level in LEVELS]
    assert [len(times) for times in writes] == [3, 3, 3]
    assert writes[0][-1] < writes[1][0] and writes[1][-1] < writes[2][0], writes


def test_a_worker_hands_items_over_at_the_job_s_priority(
    tmp_path: Path, registry: Registry, workers: Workers
) -> None:
    # The second stage's model has no worker here: its chunks stay in its queue's lists.
    stages: list[dict[str, object]] = [RESIZE, {"type": "img2img", "model": "tiny-sd", "steps": 4}]
    with EmbeddedRedis(tmp_path / "redis") as server:
        ids = {level: submitted(tmp_path / level, level, stages, registry, server.url) for level in LEVELS}
        workers.start("cpu", server.url, registry)
        client = redis.Redis.from_url(server.url, decode_responses=True)
        store = JobStore(client)
        wait_until(
            lambda: all(store.status(job_id).stages[0].done == 3 for job_id in ids.values()),
            180,
            "the first stage of every job",
        )
        waiting = {
            level: [
                json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]
                for raw in client.lrange(name, 0, -1)
            ]
            for level, name in zip(LEVELS, priority_lists("imgjobs.tiny-sd"), strict=True)
        }
    for level in LEVELS:
        assert (
            sorted((args["job_id"], args["stage_index"]) for args in waiting[level]) == [(ids[level], 1)] * 3
        ), (
            level,
            waiting,
            workers.logs(),
        )
