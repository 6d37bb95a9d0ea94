"""A job's state through real worker processes on real Redis: an embedded run resumes after a
SIGTERM, after being killed and after losing its Redis, and its state answers `status` and
`failures` after (and `retry`: tests/integration/test_embedded_run.py); a cancel is accounted for
at once and stops a running chunk at its next call; a job's end that cannot be written fails the
job at once, one end more changes nothing, and one being retried says what it retries."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from jobs.embedded import EmbeddedRedis, free_port
from jobs.producer import sender
from jobs.registry import Registry
from jobstate.store import JobStore
from kits.faultproxy import FaultProxy
from kits.faults import upload_inputs
from kits.helpers import write_image, write_job
from kits.metrics import scrape
from kits.processes import ROOT, Workers, imgjobs
from schemas.errors import ImgjobsError
from schemas.messages import JobEnd
from schemas.settings import Settings
from tests.integration.test_reliability import results, wait_finished

pytestmark = pytest.mark.slow

# About a second a chunk of two, on two shared cores: slow enough to stop a run between chunks.
SLOW = {"type": "img2img", "model": "tiny-sd", "strength": 1.0, "steps": 150}


def job_of(
    tmp_path: Path, count: int, stage: dict[str, Any] = SLOW, output: str = "out"
) -> tuple[Path, list[str]]:
    write_image(tmp_path / "in" / "a.png")
    rows = [{"id": f"i{n:02d}", "image": "in/a.png", "seed": n} for n in range(count)]
    return write_job(tmp_path, rows, stage=stage, output=output), [str(row["id"]) for row in rows]


def job_id_of(spec: Path, models_yaml: Path) -> str:
    checked = imgjobs("validate", str(spec), "--models", str(models_yaml))
    assert checked.returncode == 0, checked.stderr
    return checked.stdout.split("job id ")[1].strip()


def embedded_run(spec: Path, models_yaml: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs", "run", str(spec), "--models", str(models_yaml)],
        cwd=ROOT,
        env=os.environ | {"IMGJOBS_CHUNK_SIZE": "2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def status_of(job_id: str) -> dict[str, Any]:
    """`imgjobs status --json` with no broker set: the job's embedded state answers."""
    polled = imgjobs("status", job_id, "--json")
    assert polled.returncode == 0, polled.stderr
    return dict(json.loads(polled.stdout))


def processes_on(broker_url: str) -> list[int]:
    """Processes of this user whose environment or command line names the embedded broker's port."""
    port = broker_url.rsplit(":", 1)[1].split("/")[0]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"127.0.0.1:{port}".encode() in text or f"port {port}".encode() in text:
            found.append(int(entry.name))
    return found


def wait_until(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def succeeded(broker_url: str, job_id: str) -> int:
    try:
        return JobStore(redis.Redis.from_url(broker_url, decode_responses=True)).status(job_id).succeeded
    except ImgjobsError:
        return 0  # not submitted yet


def fingerprints(folder: Path) -> dict[str, tuple[int, int]]:
    """Each output written so far: (inode, mtime), which any rewrite changes."""
    return {
        path.parent.name: (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in folder.glob("*/s0-img2img.png")
    }


def embedded_broker(state: Path, what: str) -> str:
    """The URL of the job's embedded broker, once its run has started it."""
    return str(
        wait_until(
            lambda: (
                (state / "broker.json").exists() and json.loads((state / "broker.json").read_text())["url"]
            ),
            120,
            what,
        )
    )


def test_an_embedded_run_resumes_after_a_sigterm_a_kill_and_the_loss_of_its_redis(
    tmp_path: Path, models_yaml: Path, private_state_dir: Path
) -> None:
    spec, ids = job_of(tmp_path, 12)
    job_id = job_id_of(spec, models_yaml)
    state = private_state_dir / "jobs" / job_id
    stopped_for = 0.0  # at least: from a run's exit to the next run's broker, before its workers resume

    first = embedded_run(spec, models_yaml)
    broker_url = embedded_broker(state, "the embedded broker")
    wait_until(lambda: succeeded(broker_url, job_id) >= 2, 180, "a first chunk")
    assert status_of(job_id)["state"] == "running"  # with no broker set: the running one answers
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    exited = time.time()
    assert first.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted: " in stderr and f"/12 finished; run `imgjobs run {spec}` again to resume" in stderr
    # Its redis-server and workers stop with it, rather than run on, parented to init.
    assert wait_until(lambda: not processes_on(broker_url), 10, "no process left") is True
    after_first = fingerprints(tmp_path / "out" / job_id)
    assert 2 <= len(after_first) < 12

    second = embedded_run(spec, models_yaml)
    broker_url = embedded_broker(state, "the embedded broker again")
    stopped_for += time.time() - exited
    wait_until(lambda: succeeded(broker_url, job_id) >= len(after_first) + 2, 180, "more items")
    second.kill()  # no chance to stop anything: its children go with it, and the next run requeues
    second.communicate(timeout=30)
    exited = time.time()
    assert wait_until(lambda: not processes_on(broker_url), 30, "no process left after a kill") is True

    # Nothing runs it now: it says so, and how to resume it; watching it ends at once, not in success.
    watched = imgjobs("status", job_id, "--watch")
    assert watched.returncode == 1, watched.stderr
    resume = f"run `imgjobs run {spec}` again to resume"
    assert watched.stderr == f"job {job_id}: stopped: nothing runs it now; {resume}\n"
    assert watched.stdout.startswith(f"{job_id}: stopped  total 12")
    (listed,) = json.loads(imgjobs("jobs", "--json").stdout)
    assert listed["state"] == "stopped"

    # Its Redis killed under it: one line, at once, that says what was lost and how to resume.
    lost = embedded_run(spec, models_yaml)
    broker_url = embedded_broker(state, "the embedded broker of the run that loses it")
    stopped_for += time.time() - exited
    store = JobStore(redis.Redis.from_url(broker_url, decode_responses=True))
    wait_until(lambda: store.status(job_id).state.value == "running", 120, "its workers running it")
    os.kill(int((state / "redis" / "redis.pid").read_text()), signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = lost.communicate(timeout=120)
    exited = time.time()
    assert time.monotonic() - killed < 15, "it stops at once, not after its workers' warm shutdown"
    assert lost.returncode == 1 and "Traceback" not in stderr, stderr
    (error,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith(
        f"error: lost the job's embedded Redis (its log: {state / 'redis' / 'redis.log'})"
    )
    assert error.endswith(f"; {resume}"), error
    assert wait_until(lambda: not processes_on(broker_url), 30, "no process left after the loss") is True

    third = embedded_run(spec, models_yaml)
    broker_url = embedded_broker(state, "the embedded broker of the last run")
    stopped_for += time.time() - exited
    stdout, stderr = third.communicate(timeout=300)
    assert third.returncode == 0, stderr
    assert f"worker logs: {state / 'logs'}" in stderr
    final = fingerprints(tmp_path / "out" / job_id)
    assert {item: final[item] for item in after_first} == after_first, "an item finished before ran again"
    assert set(results(tmp_path, job_id)) == set(ids)

    status = status_of(job_id)  # the job's state after the run: no broker configured
    assert (status["state"], status["succeeded"]) == ("succeeded", 12)
    # Its time is its running time: the time between its runs is left out, of the summary's too.
    assert status["stopped_s"] >= stopped_for - 0.5, (status, stopped_for)
    finished, started = (
        datetime.fromisoformat(status[key]).timestamp() for key in ("finished_at", "started_at")
    )
    summary_s = float(re.findall(r"time\s*│\s*([0-9.]+)s", stdout)[0])
    assert summary_s == pytest.approx(finished - started - status["stopped_s"], abs=0.2), stdout
    listed = imgjobs("failures", job_id, "--json")
    assert (listed.returncode, listed.stdout) == (0, "")
    assert imgjobs("status", "no-such-job").returncode == 2


def test_cancel_is_accounted_at_once_and_stops_a_running_chunk_at_its_next_call(
    tmp_path: Path, tiny_sd_dir: Path, workers: Workers
) -> None:
    one_a_call = tmp_path / "models.yaml"
    one_a_call.write_text(
        f"models:\n  tiny-sd:\n    source: {tiny_sd_dir}\n    dtype: float32\n    max_batch: 1\n",
        encoding="utf-8",
    )
    registry = Registry.load(one_a_call)
    spec, ids = job_of(tmp_path, 12)
    with EmbeddedRedis(tmp_path / "redis") as server:
        env = {"IMGJOBS_BROKER_URL": server.url, "IMGJOBS_MODELS": str(one_a_call), "IMGJOBS_CHUNK_SIZE": "4"}
        workers.start("tiny-sd", server.url, registry)
        workers.wait_ready()
        submitted = imgjobs("submit", str(spec), env=env)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        store = JobStore(redis.Redis.from_url(server.url, decode_responses=True))
        wait_until(lambda: store.status(job_id).succeeded >= 1, 180, "a first item")

        # The workers, as they answer Celery's remote control: the tiny-sd one runs a chunk of the job.
        answered = imgjobs("workers", "--json", env=env)
        assert answered.returncode == 0, answered.stderr
        found = {worker["model"]: worker for worker in json.loads(answered.stdout)}
        assert set(found) == {"tiny-sd", "cpu"}, found
        busy, idle = found["tiny-sd"], found["cpu"]
        assert busy["host"] == idle["host"] == socket.gethostname() and busy["device"] == "cpu"
        assert busy["rss_bytes"] > 100 * 2**20 and busy["gpu_bytes"] is None and busy["uptime_s"] > 0
        (task,) = busy["running"]
        assert (task["job_id"], task["stage"], task["items"]) == (job_id, "s0", 4), task
        assert 0 <= task["done"] <= 4 and task["running_s"] >= 0 and idle["running"] == []
        table = imgjobs("workers", env=env)
        assert table.returncode == 0 and f"{task['task']} (" in table.stdout and "idle" in table.stdout

        cancelled = imgjobs("cancel", job_id, env=env)
        assert cancelled.returncode == 0, cancelled.stderr
        at_cancel = store.status(job_id)  # right after: every item not started is accounted for
        assert at_cancel.pending == 0 and at_cancel.state.value == "cancelled"
        assert at_cancel.cancelled == 12 - at_cancel.succeeded - at_cancel.running
        assert "item(s) not started are cancelled" in cancelled.stderr

        status = wait_finished(server, job_id, workers)
        # The running chunk stopped at its next call: at most the call in flight finished after.
        assert status.succeeded <= at_cancel.succeeded + 1, (at_cancel, status)
        assert (status.state.value, status.cancelled) == ("cancelled", 12 - status.succeeded)
        listed = results(tmp_path, job_id)
        assert list(listed) == ids
        reasons = [r["error"]["type"] for r in listed.values() if r["status"] == "failed"]
        assert reasons == ["JobCancelledError"] * status.cancelled

        again = imgjobs("cancel", job_id, env=env)
        assert again.returncode == 0 and "already finished (cancelled); nothing to cancel" in again.stderr
        assert store.status(job_id) == status


def test_a_job_end_that_cannot_be_written_fails_the_job_at_once_and_a_second_end_changes_nothing(
    tmp_path: Path, models_yaml: Path, registry: Registry, workers: Workers
) -> None:
    (tmp_path / "afile").write_text("a file, where the output should be a folder")
    unwritable, _ = job_of(tmp_path / "bad", 2, {"type": "resize"}, output=str(tmp_path / "afile" / "sub"))
    endless, _ = job_of(tmp_path / "endless", 2, {"type": "resize"})
    good, _ = job_of(tmp_path / "good", 3, {"type": "resize"})
    with EmbeddedRedis(tmp_path / "redis") as server:
        env = {"IMGJOBS_BROKER_URL": server.url, "IMGJOBS_MODELS": str(models_yaml)}
        port = free_port()
        workers.start("cpu", server.url, registry, env={"IMGJOBS_METRICS_PORT": str(port)})
        workers.wait_ready()
        # An output no one can write to is refused at submit, in one line: nothing is enqueued. (The
        # warning before it says that a distributed run's workers may not see local inputs.)
        ran = imgjobs("run", str(unwritable), env=env)
        said = [line for line in ran.stderr.splitlines() if not line.startswith("warning: ")]
        assert ran.returncode == 2 and len(said) == 1, ran.stderr
        assert said[0].startswith("error: cannot write "), ran.stderr
        assert "Not a directory" in said[0]
        assert list(JobStore(redis.Redis.from_url(server.url)).job_ids()) == []

        # Its items run, but the job's end cannot be written (results.jsonl is a folder): no retry can
        # help, so the end fails at once and the job ends failed, rather than running for ever.
        job_id = job_id_of(endless, models_yaml)
        (tmp_path / "endless" / "out" / job_id / "results.jsonl").mkdir(parents=True)
        started = time.monotonic()
        ran = imgjobs("run", str(endless), env=env)
        assert ran.returncode == 1, ran.stderr
        assert time.monotonic() - started < 30
        status = json.loads(imgjobs("status", job_id, "--json", env=env).stdout)
        assert (status["state"], status["succeeded"]) == ("failed", 2)
        assert "the job's end could not be written" in status["error"] and "Is a directory" in status["error"]
        pruned = imgjobs("prune", "--older-than", "0s", env=env)
        assert job_id in pruned.stdout.split(), pruned.stderr

        ran = imgjobs("run", str(good), env=env)
        assert ran.returncode == 0, ran.stderr
        job_id = job_id_of(good, models_yaml)
        written = (tmp_path / "good" / "out" / job_id / "results.jsonl").stat()
        send_end = sender(Settings(), server.url)
        meta = JobStore(redis.Redis.from_url(server.url, decode_responses=True)).meta(job_id)
        for _ in range(2):  # an end delivered again, or sent twice: it is claimed once, so nothing happens
            send_end(JobEnd(job_id=job_id, run_id=meta.run_id, round=0))
        time.sleep(2)
        again = (tmp_path / "good" / "out" / job_id / "results.jsonl").stat()
        assert (again.st_ino, again.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
        (ends,) = [
            line for line in scrape(port).splitlines() if line.startswith("imgjobs_job_end_seconds_count ")
        ]
        assert float(ends.split()[1]) == 2.0  # the failed end, and the good job's: one each


def test_a_job_end_being_retried_says_what_it_retries(
    tmp_path: Path, s3_bucket: str, s3_endpoint: str, workers: Workers
) -> None:
    rows = upload_inputs(s3_bucket, 2)
    spec = write_job(tmp_path, rows, stage={"type": "resize", "model": "cpu"}, output=f"s3://{s3_bucket}/out")
    with EmbeddedRedis(tmp_path / "redis") as server, FaultProxy(s3_endpoint) as proxy:
        env = {"IMGJOBS_BROKER_URL": server.url}
        # Every write of results.jsonl refused for a while, and each at its first refusal: the end retries.
        s3 = {"AWS_ENDPOINT_URL": proxy.url, "AWS_MAX_ATTEMPTS": "1"}
        workers.start("cpu", server.url, Registry.load(None), env=s3)
        workers.wait_ready()
        proxy.arm(
            ["ServiceUnavailable"],
            fraction=1.0,
            duration_s=6,
            methods=("PUT",),
            path_contains="results.jsonl",
        )
        submitted = imgjobs("submit", str(spec), env=env)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        watch = subprocess.Popen(
            [sys.executable, "-m", "jobs", "status", job_id, "--watch"],
            cwd=ROOT,
            env=os.environ | env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        store = JobStore(redis.Redis.from_url(server.url, decode_responses=True))
        retrying = wait_until(lambda: store.status(job_id).retrying, 60, "the end's first retry")
        assert retrying.startswith("the job's end (results.jsonl, report.html): StorageError: "), retrying
        assert "results.jsonl" in retrying.split(": ", 2)[2] and " of 8 in " in retrying, retrying
        _, stderr = watch.communicate(timeout=120)
        assert watch.returncode == 0, stderr
        assert "retrying the job's end (results.jsonl, report.html): StorageError: " in stderr
        status = store.status(job_id)
        assert (status.state.value, status.retrying) == ("succeeded", None)
