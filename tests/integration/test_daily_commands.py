"""The commands a team runs every day, against real Redis and real worker processes: the job list,
status times, logs, a dry-run estimate from the rates workers recorded, and chosen retries."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import pytest
import redis

from jobs.embedded import EmbeddedRedis
from jobs.registry import Registry
from jobstate.store import JobStore
from kits.helpers import write_image, write_job
from kits.processes import Workers, imgjobs

pytestmark = pytest.mark.slow


def wait_finished(client: redis.Redis, job_id: str, workers: Workers) -> None:
    deadline = time.monotonic() + 180
    while JobStore(client).status(job_id).finished_at is None:
        assert time.monotonic() < deadline, workers.logs()
        time.sleep(0.2)


def results(folder: Path, job_id: str) -> dict[str, dict[str, Any]]:
    lines = (folder / "out" / job_id / "results.jsonl").read_text().splitlines()
    return {row["id"]: row for row in map(json.loads, lines)}


def test_list_status_logs_estimate_and_chosen_retry(
    tmp_path: Path, models_yaml: Path, registry: Registry, workers: Workers
) -> None:
    rows = [{"id": f"i{n}", "image": "in/a.png", "prompt": "x", "seed": n} for n in range(3)]
    rows.append({"id": "late", "image": "in/late.png", "prompt": "x"})
    write_image(tmp_path / "in" / "a.png")
    spec = write_job(tmp_path, rows, name="nightly-cats")
    with EmbeddedRedis(tmp_path / "redis") as server:
        env = {
            "IMGJOBS_BROKER_URL": server.url,
            "IMGJOBS_MODELS": str(models_yaml),
            "IMGJOBS_CHUNK_SIZE": "2",
        }
        client = redis.Redis.from_url(server.url, decode_responses=True)

        assert imgjobs("--version").stdout == f"imgjobs {package_version('imgjobs')}\n"
        planned = imgjobs("submit", str(spec), "--dry-run", env=env)
        assert planned.returncode == 0, planned.stderr
        assert "no rate recorded for tiny-sd at img2img:32x32" in planned.stdout
        # 2 parts; each item runs int(4 steps * 0.75) = 3 denoising steps, 6 UNet evaluations with guidance.
        found = re.search(
            r"s0-img2img\s*│\s*tiny-sd\s*│\s*2\s*│\s*2\s*│\s*12\s*│\s*24\s*│\s*unknown", planned.stdout
        )
        assert found, planned.stdout
        assert client.dbsize() == 0 and not (tmp_path / "out").exists(), "a dry run writes nothing"

        submitted = imgjobs("submit", str(spec), env=env)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        workers.start("tiny-sd", server.url, registry)
        workers.start("cpu", server.url, registry)
        wait_finished(client, job_id, workers)

        status = json.loads(imgjobs("status", job_id, "--json", env=env).stdout)
        assert status["state"] == "failed" and (status["succeeded"], status["failed"]) == (3, 1)
        submitted_at = datetime.fromisoformat(status["submitted_at"])
        assert submitted_at.tzinfo is not None and abs(submitted_at.timestamp() - time.time()) < 600
        assert datetime.fromisoformat(status["finished_at"]) >= datetime.fromisoformat(status["started_at"])
        assert status["items_per_s"] > 0 and status["eta_s"] is None, "a finished job has no ETA"

        listed = json.loads(imgjobs("jobs", "--json", env=env).stdout)
        (entry,) = listed
        assert {key: entry[key] for key in ("job_id", "name", "state", "total", "succeeded", "failed")} == {
            "job_id": job_id,
            "name": "nightly-cats",
            "state": "failed",
            "total": 4,
            "succeeded": 3,
            "failed": 1,
        }
        assert (entry["pending"], entry["running"], entry["schedule"]) == (0, 0, None)
        assert datetime.fromisoformat(entry["finished_at"]) >= datetime.fromisoformat(entry["submitted_at"])

        def chosen(*flags: str) -> list[str]:
            return [job["job_id"] for job in json.loads(imgjobs("jobs", "--json", *flags, env=env).stdout)]

        assert chosen("--state", "failed", "--name", "nightly-*", "--since", "1h") == [job_id]
        assert chosen("--state", "succeeded") == chosen("--name", "daily-*") == []
        assert chosen("--since", "2999-01-01") == []
        table = imgjobs("jobs", env=env)
        assert table.returncode == 0 and job_id in table.stdout and "nightly-cats" in table.stdout
        bad_since = imgjobs("jobs", "--since", "yesterday", env=env)
        assert bad_since.returncode == 2 and bad_since.stderr.startswith("error: --since: 'yesterday'")

        by_name = imgjobs("status", "nightly-cats", env=env)
        assert by_name.returncode == 2
        assert by_name.stderr == f"error: no job 'nightly-cats' on this broker; did you mean {job_id!r}?\n"

        logged = imgjobs("logs", job_id, env=env)
        assert logged.returncode == 0, logged.stderr
        assert "InputImageError" in logged.stdout and "late" in logged.stdout and "late.png" in logged.stdout

        # The workers have recorded what tiny-sd took at this shape: the estimate uses it.
        planned = imgjobs("submit", str(spec), "--dry-run", env=env)
        assert planned.returncode == 0, planned.stderr
        assert "rates of 3 item(s) that tiny-sd's workers ran at img2img:32x32" in planned.stdout
        assert "tiny-sd: " in planned.stdout and "worker-seconds" in planned.stdout
        assert chosen() == [job_id], "a dry run submits nothing"

        unknown = imgjobs("retry", job_id, "--ids", "late,i0", env=env)
        assert unknown.returncode == 2 and "--ids: i0: not among job" in unknown.stderr
        misspelt = imgjobs("retry", job_id, "--set", "stepz=3", env=env)
        assert misspelt.returncode == 2 and "did you mean 'steps'?" in misspelt.stderr
        out_of_range = imgjobs("retry", job_id, "--set", "strength=7", env=env)
        assert out_of_range.returncode == 2 and out_of_range.stderr.startswith("error: --set strength=7:")

        write_image(tmp_path / "in" / "late.png")  # the missing input arrives
        (tmp_path / "ids.txt").write_text("# to run again\nlate\n")
        before = results(tmp_path, job_id)
        retried = imgjobs(
            "retry", job_id, "--ids-from", str(tmp_path / "ids.txt"), "--set", "steps=2", env=env
        )
        assert retried.returncode == 0 and "1 failed item(s) enqueued again" in retried.stderr
        wait_finished(client, job_id, workers)
        after = results(tmp_path, job_id)
        assert after["late"]["status"] == "succeeded"
        assert after["late"]["overrides"] == {"steps": 2} and after["late"]["params"]["steps"] == 2
        assert after["late"]["stages"][0]["params"]["steps"] == 2
        assert after["i0"] == before["i0"], "items not chosen stay as they were"
        assert after["i0"]["params"]["steps"] == 4 and after["i0"]["overrides"] is None
