"""A job built from an S3 listing, run by a real worker, written as a dataset that Hugging Face
`datasets` loads with its imagefolder builder."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import boto3
import pytest
import redis
from datasets import load_dataset
from PIL import Image

from jobs.embedded import EmbeddedRedis
from jobs.registry import Registry
from jobstate.store import JobStore
from kits.processes import Workers, imgjobs

pytestmark = pytest.mark.slow


def test_submit_from_an_s3_listing_into_an_imagefolder_dataset(
    tmp_path: Path, s3_bucket: str, models_yaml: Path, registry: Registry, workers: Workers
) -> None:
    s3 = boto3.client("s3")
    for index in range(5):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), (index * 40, 90, 10)).save(buffer, format="PNG")
        s3.put_object(Bucket=s3_bucket, Key=f"in/photo {index}.png", Body=buffer.getvalue())
    s3.put_object(Bucket=s3_bucket, Key="in/readme.txt", Body=b"not an image")
    s3.put_object(Bucket=s3_bucket, Key="elsewhere/x.png", Body=b"outside the pattern")

    with EmbeddedRedis(tmp_path / "redis") as server:
        env = {"IMGJOBS_BROKER_URL": server.url, "IMGJOBS_MODELS": str(models_yaml)}
        listing = [
            "submit",
            "--from",
            f"s3://{s3_bucket}/in/*.png",
            "--model",
            "tiny-sd",
            "--prompt",
            "a watercolor",
            "--output",
            str(tmp_path / "out"),
            "--name",
            "nightly",
            "--size",
            "32x32",
            "--param",
            "steps=4",
            "--param",
            "strength=0.5",
            "--param",
            'prompt_template="{prompt}, ink"',
            "--dataset",
        ]
        submitted = imgjobs(*listing, env=env)
        assert submitted.returncode == 0, submitted.stderr
        assert "5 image(s)" in submitted.stderr
        job_id = submitted.stdout.strip()
        # The same listing with the same flags is the same job, as a manifest is, although each submit
        # writes it into a new temporary folder.
        again = imgjobs(*listing, env=env)
        assert again.returncode == 0 and again.stdout.strip() == job_id, again.stderr
        assert f"job {job_id} was already submitted" in again.stderr
        workers.start("tiny-sd", server.url, registry)
        client = redis.Redis.from_url(server.url, decode_responses=True)
        deadline = time.monotonic() + 180
        while (status := JobStore(client).status(job_id)).finished_at is None:
            assert time.monotonic() < deadline, workers.logs()
            time.sleep(0.2)
        assert status.succeeded == 5

    job_dir = tmp_path / "out" / job_id
    results = [json.loads(line) for line in (job_dir / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in results) == [f"photo-{i}" for i in range(5)]
    assert {r["params"]["steps"] for r in results} == {4}

    dataset = load_dataset("imagefolder", data_dir=str(job_dir / "dataset"), split="train")
    assert len(dataset) == 5
    assert {"image", "id", "prompt", "prompt_used", "seed", "model", "source"} <= set(dataset.column_names)
    row = dataset.sort("id")[0]
    assert (row["id"], row["prompt"], row["model"]) == ("photo-0", "a watercolor", "tiny-sd")
    # The item's prompt, and the one the stage ran with after its template.
    assert row["prompt_used"] == "a watercolor, ink"
    assert {(r["prompt"], r["stages"][0]["prompt"]) for r in results} == {
        ("a watercolor", "a watercolor, ink")
    }
    assert row["source"] == f"s3://{s3_bucket}/in/photo 0.png"
    assert row["image"].size == (32, 32)
