"""Faults and redrive with real worker processes on real Redis: every item ends succeeded or failed,
exactly once, whatever happens to the workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from jobs.embedded import EmbeddedRedis
from jobs.registry import Registry
from jobstate.store import JobStore
from kits.helpers import write_image, write_job
from kits.processes import Workers, imgjobs, pool_process, running_chunk
from schemas.progress import JobStatus

pytestmark = pytest.mark.slow

# Slow enough per chunk (about a second) that a test can kill a worker in the middle of one.
SLOW_STAGE = {"type": "img2img", "model": "tiny-sd", "strength": 1.0, "steps": 150}


def submit(spec: Path, server: EmbeddedRedis, models_yaml: Path, chunk_size: int = 2) -> str:
    env = {
        "IMGJOBS_BROKER_URL": server.url,
        "IMGJOBS_MODELS": str(models_yaml),
        "IMGJOBS_CHUNK_SIZE": str(chunk_size),
    }
    submitted = imgjobs("submit", str(spec), env=env)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip()


def wait_finished(server: EmbeddedRedis, job_id: str, workers: Workers, timeout: float = 180) -> JobStatus:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    deadline = time.monotonic() + timeout
    while (status := JobStore(client).status(job_id)).finished_at is None:
        assert time.monotonic() < deadline, workers.logs()
        time.sleep(0.2)
    assert status.pending == status.running == 0 and status.succeeded + status.failed == status.total
    return status


def results(folder: Path, job_id: str) -> dict[str, dict[str, Any]]:
    lines = (folder / "out" / job_id / "results.jsonl").read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    assert len({r["id"] for r in parsed}) == len(parsed), "each item is in results.jsonl once"
    return {r["id"]: r for r in parsed}


def cli(server: EmbeddedRedis, *args: str) -> subprocess.CompletedProcess[str]:
    return imgjobs(*args, env={"IMGJOBS_BROKER_URL": server.url})


def test_cancel_drops_queued_work_and_retry_runs_it(
    tmp_path: Path, models_yaml: Path, registry: Registry, workers: Workers
) -> None:
    rows = [{"id": f"i{n}", "image": f"in/{n}.png", "prompt": "x"} for n in range(6)]
    for n in range(6):
        write_image(tmp_path / "in" / f"{n}.png")
    spec = write_job(tmp_path, rows)
    with EmbeddedRedis(tmp_path / "redis") as server:
        job_id = submit(spec, server, models_yaml)
        cancelled = cli(server, "cancel", job_id)
        assert cancelled.returncode == 0, cancelled.stderr
        workers.start("tiny-sd", server.url, registry)
        status = wait_finished(server, job_id, workers)
        assert (status.state.value, status.failed) == ("cancelled", 6)
        assert {r["error"]["type"] for r in results(tmp_path, job_id).values()} == {"JobCancelledError"}

        listed = cli(server, "failures", job_id, "--json")
        assert sorted(json.loads(line)["id"] for line in listed.stdout.splitlines()) == sorted(
            r["id"] for r in rows
        )
        retried = cli(server, "retry", job_id, "--reason", "JobCancelledError")
        assert retried.returncode == 0 and "6 failed item(s) enqueued again" in retried.stderr
        status = wait_finished(server, job_id, workers)
        assert (status.state.value, status.succeeded) == ("succeeded", 6)
        assert all(r["status"] == "succeeded" for r in results(tmp_path, job_id).values())


def test_retry_reruns_only_failed_items(
    tmp_path: Path, models_yaml: Path, registry: Registry, workers: Workers
) -> None:
    rows = [{"id": "ok", "image": "in/ok.png"}, {"id": "late", "image": "in/late.png"}]
    write_image(tmp_path / "in" / "ok.png")
    spec = write_job(tmp_path, rows)
    with EmbeddedRedis(tmp_path / "redis") as server:
        workers.start("tiny-sd", server.url, registry)
        job_id = submit(spec, server, models_yaml)
        assert wait_finished(server, job_id, workers).state.value == "failed"
        first = results(tmp_path, job_id)
        assert first["late"]["error"]["type"] == "InputImageError"
        kept = Path(first["ok"]["outputs"]["s0-img2img"]).stat().st_mtime_ns

        write_image(tmp_path / "in" / "late.png")  # the missing input arrives
        assert "1 failed item(s)" in cli(server, "retry", job_id).stderr
        assert wait_finished(server, job_id, workers).state.value == "succeeded"
        assert {r["status"] for r in results(tmp_path, job_id).values()} == {"succeeded"}
        assert Path(first["ok"]["outputs"]["s0-img2img"]).stat().st_mtime_ns == kept, "ok was not run again"
        assert cli(server, "failures", job_id, "--json").stdout == ""


def test_pool_process_killed_mid_chunk_loses_nothing(
    tmp_path: Path, models_yaml: Path, registry: Registry, workers: Workers
) -> None:
    rows = [{"id": f"i{n}", "image": "in/a.png", "seed": n} for n in range(6)]
    write_image(tmp_path / "in" / "a.png")
    spec = write_job(tmp_path, rows, stage=SLOW_STAGE)
    with EmbeddedRedis(tmp_path / "redis") as server:
        worker = workers.start("tiny-sd", server.url, registry)
        workers.wait_ready()
        job_id = submit(spec, server, models_yaml)
        started = running_chunk(server.url, job_id)
        os.kill(pool_process(worker), signal.SIGKILL)
        assert running_chunk(server.url, job_id, delivery=2) == started  # requeued at once, and run again
        status = wait_finished(server, job_id, workers)
        assert (status.succeeded, status.failed) == (6, 0), workers.logs()
        assert set(results(tmp_path, job_id)) == {r["id"] for r in rows}


def test_chunk_that_keeps_killing_its_worker_is_dead_lettered(
    tmp_path: Path, models_yaml: Path, registry: Registry, workers: Workers
) -> None:
    rows = [{"id": "p1", "image": "in/a.png"}, {"id": "p2", "image": "in/a.png"}]
    write_image(tmp_path / "in" / "a.png")
    spec = write_job(tmp_path, rows, stage=SLOW_STAGE)
    with EmbeddedRedis(tmp_path / "redis") as server:
        worker = workers.start("tiny-sd", server.url, registry, env={"IMGJOBS_MAX_DELIVERIES": "2"})
        workers.wait_ready()
        job_id = submit(spec, server, models_yaml)
        for delivery in (1, 2):
            running_chunk(server.url, job_id, delivery)
            os.kill(pool_process(worker), signal.SIGKILL)
        status = wait_finished(server, job_id, workers)
        assert (status.state.value, status.failed) == ("failed", 2)
        for result in results(tmp_path, job_id).values():
            assert (
                result["error"]["type"] == "PoisonChunkError"
                and "delivered 3 times" in result["error"]["message"]
            )


def test_sigterm_mid_chunk_finishes_that_chunk_and_requeues_the_rest(
    tmp_path: Path, models_yaml: Path, registry: Registry, workers: Workers
) -> None:
    rows = [{"id": f"i{n}", "image": "in/a.png", "seed": n} for n in range(6)]
    write_image(tmp_path / "in" / "a.png")
    spec = write_job(tmp_path, rows, stage=SLOW_STAGE)
    with EmbeddedRedis(tmp_path / "redis") as server:
        first = workers.start("tiny-sd", server.url, registry)
        workers.wait_ready()
        job_id = submit(spec, server, models_yaml)
        running_chunk(server.url, job_id)
        first.process.send_signal(signal.SIGTERM)
        first.process.wait(120)  # warm shutdown: the chunk in hand completes first
        client = redis.Redis.from_url(server.url, decode_responses=True)
        stopped = JobStore(client).status(job_id)
        assert (stopped.succeeded, stopped.failed, stopped.running, stopped.pending) == (2, 0, 0, 4), (
            workers.logs()
        )

        workers.start("tiny-sd", server.url, registry)
        status = wait_finished(server, job_id, workers)
        assert (status.succeeded, status.failed) == (6, 0)
        assert set(results(tmp_path, job_id)) == {r["id"] for r in rows}
