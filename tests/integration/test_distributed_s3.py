"""Distributed mode end to end: `imgjobs submit` of a 24-item job with inputs and outputs on the S3
server, two real worker processes on real Redis, `imgjobs status` checked during and after."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import boto3
import pytest
import redis
from PIL import Image

from jobs.embedded import EmbeddedRedis, free_port
from jobs.registry import Registry
from kits.helpers import write_job
from kits.metrics import scrape, total
from kits.processes import Workers, imgjobs

pytestmark = pytest.mark.slow

REDIS_PASSWORD = "redis-pass-do-not-leak"
ITEMS = 24
BAD = {"0005": "missing", "0017": "corrupt"}


def upload_inputs(bucket: str) -> list[dict[str, object]]:
    s3 = boto3.client("s3")
    rows = []
    for index in range(ITEMS):
        item_id = f"{index:04d}"
        key = f"inputs/{item_id}.png"
        if BAD.get(item_id) == "corrupt":
            s3.put_object(Bucket=bucket, Key=key, Body=b"\x89PNG\r\n\x1a\nnot really")
        elif item_id not in BAD:
            buffer = io.BytesIO()
            Image.new("RGB", (48, 40), (index * 10 % 256, 80, 160)).save(buffer, format="PNG")
            s3.put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
        rows.append(
            {"id": item_id, "image": f"s3://{bucket}/{key}", "prompt": f"prompt {index}", "seed": index}
        )
    return rows


def test_submit_two_workers_s3_and_status(
    tmp_path: Path, s3_bucket: str, models_yaml: Path, registry: Registry, workers: Workers
) -> None:
    rows = upload_inputs(s3_bucket)
    # 30 denoising steps an item, not 3: long enough a run that polls a second apart (the CLI's start)
    # see it under way; at 3 steps two workers finish the 24 items between two polls.
    stage = {"type": "img2img", "model": "tiny-sd", "strength": 0.75, "guidance_scale": 7.5, "steps": 40}
    spec = write_job(tmp_path / "job", rows, output=f"s3://{s3_bucket}/results", name="s3-job", stage=stage)
    env = {"IMGJOBS_MODELS": str(models_yaml), "IMGJOBS_CHUNK_SIZE": "2"}

    with EmbeddedRedis(tmp_path / "redis", password=REDIS_PASSWORD) as server:
        env["IMGJOBS_BROKER_URL"] = server.url
        ports = [free_port() for _ in range(2)]
        for port in ports:
            workers.start("tiny-sd", server.url, registry, env={"IMGJOBS_METRICS_PORT": str(port)})
        workers.wait_ready()

        submitted = imgjobs("submit", str(spec), env=env)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        assert job_id.startswith("s3-job-")

        seen = []
        deadline = time.monotonic() + 240
        while True:
            polled = imgjobs("status", job_id, "--json", env=env)
            assert polled.returncode == 0, polled.stderr
            status = json.loads(polled.stdout)
            seen.append(status)
            counts = [status[k] for k in ("pending", "running", "succeeded", "failed")]
            assert status["total"] == ITEMS and sum(counts) == ITEMS, status
            if status["state"] in ("succeeded", "failed"):
                break
            assert status["state"] in ("pending", "running"), status
            assert time.monotonic() < deadline, workers.logs()
            time.sleep(0.2)

        assert any(s["state"] == "running" and s["succeeded"] + s["failed"] < ITEMS for s in seen), seen
        done = [s["succeeded"] + s["failed"] for s in seen]
        assert done == sorted(done), "finished counts never go down"
        final = seen[-1]
        assert (final["state"], final["succeeded"], final["failed"]) == ("failed", ITEMS - 2, 2)
        assert (final["pending"], final["running"]) == (0, 0)

        # Both workers of the model took chunks from the shared queue (the cpu worker takes the job's end),
        # and between them ran each item once.
        ran = [total(scrape(port), "imgjobs_items_total", model="tiny-sd") for port in ports]
        assert all(count > 0 for count in ran) and sum(ran) == ITEMS, (ran, workers.logs())

        s3 = boto3.client("s3")
        body = s3.get_object(Bucket=s3_bucket, Key=f"results/{job_id}/results.jsonl")["Body"].read().decode()
        results = [json.loads(line) for line in body.splitlines()]
        assert [r["id"] for r in results] == [f"{i:04d}" for i in range(ITEMS)]
        for result in results:
            if result["id"] in BAD:
                assert result["status"] == "failed" and result["error"]["type"] == "InputImageError", result
                continue
            assert result["status"] == "succeeded" and result["error"] is None
            uri = result["outputs"]["s0-img2img"]
            assert uri == f"s3://{s3_bucket}/results/{job_id}/{result['id']}/s0-img2img.png"
            png = s3.get_object(Bucket=s3_bucket, Key=uri.removeprefix(f"s3://{s3_bucket}/"))["Body"].read()
            assert Image.open(io.BytesIO(png)).size == (32, 32)
            assert result["seed"] == int(result["id"]) and result["model"] == "tiny-sd"
            assert set(result["timings"]) == {"fetch_s", "infer_s", "write_s"}

        # Credentials appear nowhere we write: results, the job's parts, Redis, worker logs.
        dump = body + workers.logs()
        s3 = boto3.client("s3")
        listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"results/{job_id}/_imgjobs/")
        parts = [obj["Key"] for obj in listed.get("Contents", [])]
        assert any(key.endswith("/items/p0000000.jsonl") for key in parts), parts
        for key in parts:
            dump += s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read().decode()
        client = redis.Redis.from_url(server.url)
        for key in client.scan_iter("imgjobs:*"):
            kind = client.type(key)
            value = (
                client.hgetall(key)
                if kind == b"hash"
                else client.lrange(key, 0, -1)
                if kind == b"list"
                else client.smembers(key)
                if kind == b"set"
                else client.get(key)  # a bitmap
            )
            dump += repr(value)
        for secret in (REDIS_PASSWORD, "testing-secret-do-not-leak"):
            assert secret not in dump

        again = imgjobs("submit", str(spec), env=env)
        assert again.returncode == 0 and again.stdout.strip() == job_id
        assert "already submitted" in again.stderr
