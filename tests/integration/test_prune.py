"""`imgjobs prune` on a real Redis with a real worker: only jobs finished before the cutoff go, every
one of their keys with them; unfinished jobs stay; a late chunk of a pruned job is dropped; and the
same job submitted again runs again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from jobs.broker import producer_app
from jobs.embedded import EmbeddedRedis
from jobs.producer import prepared, send_chunks, submit
from jobs.registry import Registry
from jobs.scheduler import PRUNE_ENTRY, PRUNE_TASK, load_schedules, make_app
from jobstate import keys
from jobstate.meta import JobMeta
from jobstate.store import JobStore
from kits.helpers import write_image, write_job
from kits.processes import Workers, imgjobs
from schemas.errors import ConfigError
from schemas.messages import priority_lists
from schemas.registry import QUEUE_PREFIX
from schemas.settings import Settings
from tests.integration.test_reliability import wait_finished

pytestmark = pytest.mark.slow

RESIZE = {"type": "resize", "format": "png"}


def submitted(folder: Path, name: str, server: EmbeddedRedis) -> str:
    write_image(folder / "in" / "a.png")
    rows = [{"id": f"{name}-{n}", "image": "in/a.png"} for n in range(3)]
    with prepared(write_job(folder, rows, stage=RESIZE, name=name), Registry.load(None), Settings()) as job:
        return submit(job, Settings(), server.url).job_id


def drained(client: redis.Redis, timeout: float = 60) -> None:
    """Every chunk sent was taken and acknowledged by a worker."""
    deadline = time.monotonic() + timeout
    while sum(client.llen(name) for name in priority_lists(f"{QUEUE_PREFIX}cpu")) or client.hlen("unacked"):
        assert time.monotonic() < deadline, "the worker did not take the chunk"
        time.sleep(0.05)


def keys_of(client: redis.Redis, job_id: str) -> list[str]:
    return sorted(str(key) for key in client.scan_iter(match=f"{keys.PREFIX}:job:{job_id}:*"))


def test_prune_deletes_only_jobs_finished_before_the_cutoff(tmp_path: Path, workers: Workers) -> None:
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        store = JobStore(client)
        # Submitted before any worker runs: it stays unfinished, however old.
        waiting = submitted(tmp_path / "waiting", "waiting", server)
        client.delete(*priority_lists(f"{QUEUE_PREFIX}cpu"))  # its queued chunk: this job never finishes
        workers.start("cpu", server.url, Registry.load(None))
        old = submitted(tmp_path / "old", "old", server)
        wait_finished(server, old, workers)
        old_meta: JobMeta = store.meta(old)
        time.sleep(0.05)
        cutoff = time.time()
        time.sleep(0.05)
        recent = submitted(tmp_path / "recent", "recent", server)
        wait_finished(server, recent, workers)
        before = {job: keys_of(client, job) for job in (old, recent, waiting)}
        # What is left of a finished job: its meta, its counts and a bit per item.
        assert [key.rsplit(":", 1)[1] for key in before[old]] == ["counts", "done", "meta"]

        assert [job.job_id for job in store.prune(cutoff, dry_run=True)] == [old]
        assert keys_of(client, old) == before[old]
        pruned = store.prune(cutoff)
        assert [(job.job_id, job.name) for job in pruned] == [(old, "old")]
        assert keys_of(client, old) == []
        assert client.smembers(keys.JOBS) == {recent, waiting}
        assert {job: keys_of(client, job) for job in (recent, waiting)} == {
            job: before[job] for job in (recent, waiting)
        }

        # A chunk of the pruned job delivered late (a redelivery) is dropped, and writes nothing.
        results = (tmp_path / "old" / "out" / old / "results.jsonl").read_text()
        send_chunks(producer_app(Settings(), server.url), old_meta, [old_meta.first_chunk(0)])
        drained(client)
        assert keys_of(client, old) == []
        assert (tmp_path / "old" / "out" / old / "results.jsonl").read_text() == results

        # Submitting it again is a new run under the same id: it runs again from scratch.
        assert submitted(tmp_path / "old", "old", server) == old
        assert wait_finished(server, old, workers).succeeded == 3
        assert store.meta(old).run_id != old_meta.run_id

        # The cutoff now passes every finished job; the unfinished one stays whatever its age.
        assert sorted(job.job_id for job in store.prune(time.time() + 1)) == sorted([old, recent])
        assert client.smembers(keys.JOBS) == {waiting}
        assert store.status(waiting).state.value == "pending"


def test_cli_and_beat_prune(tmp_path: Path, workers: Workers) -> None:
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        workers.start("cpu", server.url, Registry.load(None))
        job_id = submitted(tmp_path / "a", "a", server)
        wait_finished(server, job_id, workers)
        env = {"IMGJOBS_BROKER_URL": server.url}
        kept = imgjobs("prune", "--older-than", "1d", env=env)
        assert (kept.returncode, kept.stdout) == (0, ""), kept.stderr
        assert "deleted 0 job(s)" in kept.stderr
        listed = imgjobs("prune", "--older-than", "0s", "--dry-run", env=env)
        assert (listed.returncode, listed.stdout.split()) == (0, [job_id])
        assert "would delete 1 job(s)" in listed.stderr
        deleted = imgjobs("prune", "--older-than", "0s", env=env)
        assert (deleted.returncode, deleted.stdout.split()) == (0, [job_id])
        gone = imgjobs("status", job_id, env=env)
        assert gone.returncode == 2 and f"no job {job_id!r}" in gone.stderr
        bad = imgjobs("prune", "--older-than", "3 weeks", env=env)
        assert bad.returncode == 2
        assert bad.stderr.startswith("error: --older-than: '3 weeks' is not a duration"), bad.stderr

        # Beat's hourly entry, from the schedules file; its task reads the file at each run.
        job_id = submitted(tmp_path / "b", "b", server)
        wait_finished(server, job_id, workers)
        schedules = tmp_path / "schedules.yaml"
        schedules.write_text("keep_finished_jobs_for: 1h\nschedules: []\n")
        settings = Settings(broker_url=server.url, schedules=schedules)
        app = make_app(settings)
        entry = app.conf.beat_schedule[PRUNE_ENTRY]
        assert (entry["task"], entry["schedule"].total_seconds()) == (PRUNE_TASK, 3600)
        prune_task = app.tasks[PRUNE_TASK]
        assert prune_task() == 0  # finished under an hour ago
        schedules.write_text("keep_finished_jobs_for: 0s\nschedules: []\n")  # read at each run
        assert prune_task() == 1
        assert client.smembers(keys.JOBS) == set()
        schedules.write_text("schedules: []\n")
        assert PRUNE_ENTRY not in make_app(settings).conf.beat_schedule
        assert prune_task() == 0


@pytest.mark.parametrize("value", ["30", "1w", "-1d", "d"])
def test_a_bad_retention_is_named(tmp_path: Path, value: str) -> None:
    schedules = tmp_path / "schedules.yaml"
    schedules.write_text(f"keep_finished_jobs_for: '{value}'\nschedules: []\n")
    with pytest.raises(ConfigError, match=rf"keep_finished_jobs_for: .*{value!r} is not a duration"):
        load_schedules(Settings(schedules=schedules))
