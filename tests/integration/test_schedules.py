"""Scheduled pipelines: each firing submits only what is new in the source; beat with RedBeat
fires them, and restarting beat repeats nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from jobs.embedded import EmbeddedRedis
from jobstate import keys
from jobstate.store import JobStore
from kits.helpers import write_image
from kits.processes import ROOT, imgjobs

pytestmark = pytest.mark.slow


def schedules_file(tmp_path: Path, every_s: int | None = None) -> Path:
    cadence = f"every_s: {every_s}" if every_s else 'cron: "0 2 * * *"'
    path = tmp_path / "schedules.yaml"
    path.write_text(
        "schedules:\n"
        "  - name: nightly\n"
        f"    {cadence}\n"
        f"    source: {tmp_path / 'incoming'}/*.png\n"
        f"    output: {tmp_path / 'out'}\n"
        "    prompt: a watercolor\n"
        "    defaults: {size: [32, 32]}\n"
        "    stages: [{type: img2img, model: sd15, steps: 4}]\n"
    )
    return path


def job_ids(server: EmbeddedRedis) -> set[str]:
    return {str(job) for job in redis.Redis.from_url(server.url, decode_responses=True).smembers(keys.JOBS)}


def test_run_now_submits_only_new_or_changed_images(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        write_image(tmp_path / "incoming" / f"{name}.png")
    with EmbeddedRedis(tmp_path / "redis") as server:
        env = {"IMGJOBS_BROKER_URL": server.url, "IMGJOBS_SCHEDULES": str(schedules_file(tmp_path))}
        first = imgjobs("schedule", "run-now", "nightly", env=env)
        assert first.returncode == 0, first.stderr
        client = redis.Redis.from_url(server.url, decode_responses=True)
        assert JobStore(client).status(first.stdout.strip()).total == 3

        again = imgjobs("schedule", "run-now", "nightly", env=env)
        assert again.returncode == 0 and again.stdout == "" and "nothing new" in again.stderr

        write_image(tmp_path / "incoming" / "d.png")
        write_image(tmp_path / "incoming" / "a.png", color=(1, 2, 3))  # rewritten: new content
        third = imgjobs("schedule", "run-now", "nightly", env=env)
        assert third.returncode == 0, third.stderr
        assert JobStore(client).status(third.stdout.strip()).total == 2
        assert len(job_ids(server)) == 2

        listed = imgjobs("schedule", "list", env=env)
        (row,) = [line for line in listed.stdout.splitlines() if "nightly" in line]
        # Piped, nothing is cut at 80 columns: the whole source path, the last job, the objects seen.
        assert f"{tmp_path / 'incoming'}/*.png" in row and "cron 0 2 * * * (UTC)" in row
        assert third.stdout.strip() in row and re.search(r"│\s*5\s*│$", row), row  # a, b, c, d, a again
        fired, upcoming = re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row)
        assert fired.startswith(time.strftime("%Y-%m-%d")) and fired < upcoming, "last and next firing"
        jobs = json.loads(imgjobs("jobs", "--json", env=env).stdout)
        assert {job["schedule"] for job in jobs} == {"nightly"}, "each job names the schedule that made it"
        assert imgjobs("schedule", "run-now", "weekly", env=env).stderr.startswith(
            "error: no schedule 'weekly'"
        )


def test_a_cron_beat_would_refuse_stops_list_and_beat_in_one_line(tmp_path: Path) -> None:
    """Checked where the schedules file is read, not only where beat runs it: else `schedule list`
    would pass it and beat would die with a traceback."""
    path = schedules_file(tmp_path)
    path.write_text(path.read_text().replace('"0 2 * * *"', '"0 25 * * *"'))
    expected = (
        f"error: {path}:3: schedule 'nightly': cron: hour '25' of '0 25 * * *' is not valid (0-23): "
        "Invalid end range: 25 > 23."
    )
    with EmbeddedRedis(tmp_path / "redis") as server:
        env = {"IMGJOBS_BROKER_URL": server.url, "IMGJOBS_SCHEDULES": str(path)}
        for command in ("list", "beat"):
            result = imgjobs("schedule", command, env=env, timeout=60)
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert (result.returncode, lines) == (2, [expected]), result.stderr


def test_beat_fires_and_a_restart_repeats_nothing(tmp_path: Path) -> None:
    write_image(tmp_path / "incoming" / "a.png")
    with EmbeddedRedis(tmp_path / "redis") as server:
        env = os.environ | {
            "IMGJOBS_BROKER_URL": server.url,
            "IMGJOBS_SCHEDULES": str(schedules_file(tmp_path, 1)),
        }
        logs = [(tmp_path / f"{name}.log").open("wb") for name in ("worker", "beat", "beat2")]
        worker = subprocess.Popen(
            [sys.executable, "-m", "jobs", "schedule", "worker"],
            env=env,
            cwd=ROOT,
            stdout=logs[0],
            stderr=subprocess.STDOUT,
        )
        beat = subprocess.Popen(
            [sys.executable, "-m", "jobs", "schedule", "beat"],
            env=env,
            cwd=ROOT,
            stdout=logs[1],
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 90
            while not job_ids(server):
                assert time.monotonic() < deadline, (tmp_path / "beat.log").read_text()[-3000:]
                time.sleep(0.5)
            beat.send_signal(signal.SIGTERM)
            beat.wait(30)
            beat = subprocess.Popen(
                [sys.executable, "-m", "jobs", "schedule", "beat"],
                env=env,
                cwd=ROOT,
                stdout=logs[2],
                stderr=subprocess.STDOUT,
            )
            time.sleep(6)  # several 1 s firings after the restart: nothing new, so no job
            assert len(job_ids(server)) == 1
            write_image(tmp_path / "incoming" / "b.png")
            deadline = time.monotonic() + 60
            while len(job_ids(server)) < 2:
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
                time.sleep(0.5)
            client = redis.Redis.from_url(server.url, decode_responses=True)
            assert sorted(JobStore(client).status(job).total for job in job_ids(server)) == [1, 1]
            # RedBeat keeps the schedule and its last run in Redis: a restarted beat carries on from there.
            assert client.zcard(f"{keys.PREFIX}:redbeat::schedule") == 1
            assert client.hexists(f"{keys.PREFIX}:redbeat:nightly", "meta")
        finally:
            for process in (beat, worker):
                process.terminate()
                process.wait(30)
            for log in logs:
                log.close()
