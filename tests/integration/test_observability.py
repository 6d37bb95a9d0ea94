"""What operators see: worker and broker metrics in Prometheus format, JSON logs with job, chunk and
item ids, per-stage progress in `status --json`, and Flower on the same broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from jobs.embedded import EmbeddedRedis, free_port
from jobs.registry import Registry
from kits.helpers import write_image, write_job
from kits.metrics import sample, scrape
from kits.processes import ROOT, Workers, imgjobs

pytestmark = pytest.mark.slow


def test_metrics_logs_and_stage_progress(
    tmp_path: Path, models_yaml: Path, registry: Registry, workers: Workers
) -> None:
    write_image(tmp_path / "in" / "a.png")
    rows = [{"id": f"i{n}", "image": "in/a.png"} for n in range(3)] + [{"id": "gone", "image": "in/gone.png"}]
    # Longer than the tokenizer takes (the tiny one makes a token of each character): diffusers logs the
    # part it cuts off, which must come out as one bounded JSON line like every other.
    rows[0]["prompt"] = "a lighthouse at dawn, " * 400
    spec = write_job(tmp_path, rows)
    data = json.loads(spec.read_text())
    data["stages"].append({"type": "resize", "size": [16, 16], "format": "webp"})
    spec.write_text(json.dumps(data))
    with EmbeddedRedis(tmp_path / "redis") as server:
        env = {
            "IMGJOBS_BROKER_URL": server.url,
            "IMGJOBS_MODELS": str(models_yaml),
            "IMGJOBS_CHUNK_SIZE": "2",
        }
        submitted = imgjobs("submit", str(spec), env=env)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()

        exporter_port = free_port()
        exporter = subprocess.Popen(
            [sys.executable, "-m", "jobs", "metrics", "--port", str(exporter_port)],
            env=os.environ | env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            broker = scrape(exporter_port)
            assert sample(broker, "imgjobs_queue_depth", queue="imgjobs.tiny-sd") == 2.0  # no worker yet
            assert sample(broker, "imgjobs_job_items", job_id=job_id, state="pending") == 4.0
        finally:
            exporter.terminate()
            exporter.wait(10)

        metrics_port = free_port()
        sd = workers.start("tiny-sd", server.url, registry, env={"IMGJOBS_METRICS_PORT": str(metrics_port)})
        workers.start("cpu", server.url, registry)
        deadline = time.monotonic() + 180
        while (status := json.loads(imgjobs("status", job_id, "--json", env=env).stdout))[
            "finished_at"
        ] is None:
            assert time.monotonic() < deadline, workers.logs()
            time.sleep(0.3)
        assert status["stages"] == [{"name": "s0-img2img", "done": 3}, {"name": "s1-resize", "done": 3}]
        assert (status["succeeded"], status["failed"]) == (3, 1)

        worker_metrics = scrape(metrics_port)
        labels = {"model": "tiny-sd", "stage": "s0-img2img"}
        assert sample(worker_metrics, "imgjobs_items_total", **labels, status="handed_over") == 3.0
        assert sample(worker_metrics, "imgjobs_items_total", **labels, status="failed") == 1.0
        assert sample(worker_metrics, "imgjobs_failures_total", **labels, reason="InputImageError") == 1.0
        assert sample(worker_metrics, "imgjobs_stage_seconds_count", **labels) == 4.0
        assert sample(worker_metrics, "imgjobs_chunks_total", **labels) == 2.0
        assert sample(worker_metrics, "imgjobs_chunk_retries_total") == 0.0
        assert sample(worker_metrics, "imgjobs_busy_seconds_total", model="tiny-sd") > 0
        assert 0 < sample(worker_metrics, "imgjobs_duty_cycle", model="tiny-sd") <= 1
        unet_s = sample(worker_metrics, "imgjobs_unet_seconds_total", model="tiny-sd")
        assert 0 < unet_s < sample(worker_metrics, "imgjobs_busy_seconds_total", model="tiny-sd")
        assert 0 < sample(worker_metrics, "imgjobs_unet_share", model="tiny-sd") <= 1

        lines = sd.log_path.read_text().splitlines()
        raw = [line for line in lines if not line.startswith("{")]
        assert lines and not raw, raw[:5]
        assert max(map(len, lines)) < 6000, "a message is bounded, whatever a library logs"
        records = [json.loads(line) for line in lines]
        assert all({"asctime", "level", "name", "message"} <= set(r) for r in records)
        cut = [r for r in records if r["name"].startswith("diffusers") and "truncated" in r["message"]]
        assert cut and cut[0]["message"].endswith("more characters)"), "diffusers' own warning, as JSON"
        results = [json.loads(line) for line in (tmp_path / "out" / job_id / "results.jsonl").open()]
        assert [r["stages"][0]["prompt_truncated"] for r in results] == [True, False, False, False]
        chunk_lines = [
            r for r in records if r.get("job_id") == job_id and r.get("chunk_id", "").startswith(job_id)
        ]
        assert chunk_lines, "lines logged while a chunk runs carry its job and chunk ids"
        done = [r for r in chunk_lines if "unet_share" in r]  # each chunk's last line
        assert done and all(0 < r["unet_share"] < r["duty_cycle"] <= 1 for r in done), done
        failure = next(r for r in records if r.get("item_id") == "gone")
        assert failure["reason"] == "InputImageError" and failure["job_id"] == job_id


def test_flower_runs_against_the_broker(tmp_path: Path) -> None:
    port = free_port()
    with EmbeddedRedis(tmp_path / "redis") as server:
        flower = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                f"--broker={server.url}",
                "flower",
                f"--port={port}",
                "--address=127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/healthcheck", timeout=5
                    ) as response:
                        assert response.read() == b"OK"
                        break
                except OSError:
                    assert flower.poll() is None, flower.stderr.read().decode() if flower.stderr else ""
                    assert time.monotonic() < deadline, "flower did not answer"
                    time.sleep(0.3)
        finally:
            flower.terminate()
            flower.wait(10)
