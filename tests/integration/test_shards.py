"""Datasets in shards against moto's S3 server, with real Redis and real `cpu` workers: WebDataset in
and out (a corrupt member, a truncated shard, a shard gone at run time and a retry of its two
items), Parquet in and Hugging Face Parquet out, and a worker killed mid-shard. Each ends with every
item accounted for exactly once: in `status`, in results.jsonl and in the output shards' indexes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from PIL import Image

from jobs.embedded import EmbeddedRedis
from jobs.registry import Registry
from jobstate.store import JobStore
from kits.processes import Workers, imgjobs
from schemas.progress import JobStatus

pytestmark = pytest.mark.slow


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def tar_shard(samples: list[tuple[str, bytes, str]]) -> bytes:
    """A WebDataset shard: {key}.jpg, {key}.txt and {key}.json for each (key, image, caption)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, image, caption in samples:
            for name, data in (
                (f"{key}.jpg", image),
                (f"{key}.txt", caption.encode()),
                (f"{key}.json", json.dumps({"url": f"https://example.com/{key}", "score": 0.5}).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_spec(folder: Path, **fields: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"version": 1, "name": "shards", "defaults": {"size": [32, 32]}, "stages": [{"type": "resize"}]}
    path = folder / "job.json"
    path.write_text(json.dumps({**spec, **fields}), encoding="utf-8")
    return path


def run_until_finished(
    server: EmbeddedRedis, job_id: str, workers: Workers, timeout: float = 120
) -> JobStatus:
    store = JobStore(redis.Redis.from_url(server.url, decode_responses=True))
    deadline = time.monotonic() + timeout
    while (status := store.status(job_id)).finished_at is None:
        assert time.monotonic() < deadline, workers.logs()
        time.sleep(0.1)
    return status


def results(s3: Any, bucket: str, job_id: str) -> dict[str, dict[str, Any]]:
    body = s3.get_object(Bucket=bucket, Key=f"out/{job_id}/results.jsonl")["Body"].read().decode()
    lines = [json.loads(line) for line in body.splitlines()]
    assert len({line["id"] for line in lines}) == len(lines), "an item is in results.jsonl more than once"
    return {line["id"]: line for line in lines}


def shard_files(s3: Any, bucket: str, job_id: str) -> dict[str, bytes]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"out/{job_id}/shards/").get("Contents", [])
    return {
        entry["Key"].rsplit("/", 1)[1]: s3.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
        for entry in listed
    }


def accounted_once(
    status: JobStatus, rows: dict[str, dict[str, Any]], index_rows: list[dict[str, Any]]
) -> None:
    """Every item once in status, results.jsonl and the shards' indexes, with the same outcome."""
    assert status.pending == status.running == 0
    assert status.succeeded + status.failed == status.total == len(rows)
    assert sum(row["status"] == "succeeded" for row in rows.values()) == status.succeeded
    ids = [row["id"] for row in index_rows]
    assert sorted(ids) == sorted(rows), "each item is in exactly one shard index, once"
    for row in index_rows:
        assert (row["status"] == "success") == (rows[row["id"]]["status"] == "succeeded"), row


def test_webdataset_in_webdataset_out(
    tmp_path: Path, s3_bucket: str, registry: Registry, workers: Workers
) -> None:
    s3 = boto3.client("s3")
    good = [(f"a{index:03d}", png((index * 50, 20, 90)), f"a red fox {index}") for index in range(4)]
    good[2] = ("a002", b"\xff\xd8 not really a jpeg", "a corrupt member")
    s3.put_object(Bucket=s3_bucket, Key="in/00000.tar", Body=tar_shard(good))
    gone = tar_shard(
        [(f"b{index:03d}", png((10, index * 80, 40)), f"a blue jay {index}") for index in range(2)]
    )
    s3.put_object(Bucket=s3_bucket, Key="in/00001.tar", Body=gone)
    cut = tar_shard(
        [(f"c{index:03d}", png((90, 90, index * 60)), f"a grey owl {index}") for index in range(3)]
    )
    s3.put_object(Bucket=s3_bucket, Key="in/00002.tar", Body=cut[: len(cut) - 1200])  # cut in its last member
    spec = write_spec(
        tmp_path,
        output=f"s3://{s3_bucket}/out",
        items=f"s3://{s3_bucket}/in/{{00000..00002}}.tar",
        output_format="webdataset",
        shard_size=4,
    )

    checked = imgjobs("validate", str(spec))
    assert checked.returncode == 2
    assert checked.stderr.strip().splitlines() == [
        f"error: s3://{s3_bucket}/in/00002.tar: not a readable tar: truncated (it ends inside a member)"
    ]

    with EmbeddedRedis(tmp_path / "redis") as server:
        env = {"IMGJOBS_BROKER_URL": server.url}
        submitted = imgjobs("submit", str(spec), env=env)
        assert submitted.returncode == 0, submitted.stderr
        assert "00002.tar: not a readable tar: truncated" in submitted.stderr
        job_id = submitted.stdout.strip()
        s3.delete_object(Bucket=s3_bucket, Key="in/00001.tar")  # unreadable when the worker gets to it
        workers.start("cpu", server.url, registry)
        status = run_until_finished(server, job_id, workers)
        rows = results(s3, s3_bucket, job_id)
        assert status.total == 8  # 4 + 2 + the 2 samples of the truncated shard read before its cut
        reasons = {item_id: (row["error"] or {}).get("type") for item_id, row in rows.items()}
        assert reasons == {
            "a000": None, "a001": None, "a002": "InputImageError", "a003": None,
            "b000": "InputShardError", "b001": "InputShardError",
            "c000": "InputShardError", "c001": "InputShardError",
        }  # fmt: skip
        assert rows["b000"]["error"]["message"] == f"s3://{s3_bucket}/in/00001.tar: no such shard"
        assert "truncated" in rows["c000"]["error"]["message"]
        assert rows["a000"]["prompt"] == "a red fox 0"
        assert (
            rows["a000"]["outputs"]["s0-resize"] == f"s3://{s3_bucket}/out/{job_id}/shards/00000.tar#a000.png"
        )
        first = shard_files(s3, s3_bucket, job_id)
        assert sorted(first) == [
            f"0000{s}{suffix}" for s in (0, 1) for suffix in (".parquet", ".tar", "_stats.json")
        ]
        first_etag = s3.head_object(Bucket=s3_bucket, Key=f"out/{job_id}/shards/00000.tar")["ETag"]

        # The shard is back: a retry of its two items rewrites the one output shard that holds them.
        s3.put_object(Bucket=s3_bucket, Key="in/00001.tar", Body=gone)
        retried = imgjobs("retry", job_id, "--ids", "b000,b001", env=env)
        assert retried.returncode == 0, retried.stderr
        status = run_until_finished(server, job_id, workers)

    rows = results(s3, s3_bucket, job_id)
    assert rows["b000"]["status"] == rows["b001"]["status"] == "succeeded"
    files = shard_files(s3, s3_bucket, job_id)
    assert files["00000.tar"] == first["00000.tar"] and files["00000_stats.json"] == first["00000_stats.json"]
    assert s3.head_object(Bucket=s3_bucket, Key=f"out/{job_id}/shards/00000.tar")["ETag"] == first_etag
    index_rows = [
        row
        for name in ("00000", "00001")
        for row in pq.read_table(io.BytesIO(files[f"{name}.parquet"])).to_pylist()
    ]
    accounted_once(status, rows, index_rows)
    assert {row["id"]: row["error_type"] for row in index_rows if row["status"] != "success"} == {
        "a002": "InputImageError", "c000": "InputShardError", "c001": "InputShardError"
    }  # fmt: skip
    stats = json.loads(files["00001_stats.json"])
    assert (stats["count"], stats["successes"], stats["status_dict"]) == (
        4,
        2,
        {"success": 2, "InputShardError": 2},
    )

    # The output is a WebDataset: each successful sample's image, caption and record under its key.
    with tarfile.open(fileobj=io.BytesIO(files["00001.tar"])) as tar:
        names = tar.getnames()
        assert names == ["b000.png", "b000.txt", "b000.json", "b001.png", "b001.txt", "b001.json"]
        record = json.loads(tar.extractfile("b001.json").read())  # type: ignore[union-attr]
        assert Image.open(io.BytesIO(tar.extractfile("b001.png").read())).size == (32, 32)  # type: ignore[union-attr]
    assert record["caption"] == "a blue jay 1" and record["seed"] == 0
    assert record["params"] == {"size": [32, 32], "resize": "crop"}
    assert record["metadata"] == {"url": "https://example.com/b001", "score": 0.5}
    with tarfile.open(fileobj=io.BytesIO(files["00000.tar"])) as tar:
        assert [name for name in tar.getnames() if name.endswith(".png")] == [
            "a000.png",
            "a001.png",
            "a003.png",
        ]


def test_parquet_in_hugging_face_parquet_out(
    tmp_path: Path, s3_bucket: str, registry: Registry, workers: Workers
) -> None:
    from datasets import load_dataset

    s3 = boto3.client("s3")
    images = [{"bytes": png((index * 40, 100, 30), (48, 40)), "path": f"{index}.png"} for index in range(6)]
    images[4] = {"bytes": b"not an image at all", "path": "4.png"}  # a corrupt row
    table = pa.table(
        {
            "image": images,
            "text": [f"a watercolor {index}" for index in range(6)],
            "key": [f"k/{index}" for index in range(6)],  # not a valid item id: ids are derived
            "license": ["cc-by"] * 6,
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=4)
    s3.put_object(Bucket=s3_bucket, Key="in/train-00000.parquet", Body=buffer.getvalue())
    spec = write_spec(
        tmp_path,
        output=f"s3://{s3_bucket}/out",
        items=f"s3://{s3_bucket}/in/train-*.parquet",
        output_format="parquet",
        shard_size=4,
    )
    with EmbeddedRedis(tmp_path / "redis") as server:
        submitted = imgjobs("submit", str(spec), env={"IMGJOBS_BROKER_URL": server.url})
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        workers.start("cpu", server.url, registry)
        status = run_until_finished(server, job_id, workers)

    rows = results(s3, s3_bucket, job_id)
    by_key = {row["key"]: row for row in rows.values()}
    assert sorted(by_key) == [f"k/{index}" for index in range(6)]
    assert by_key["k/4"]["error"]["type"] == "InputImageError"
    files = shard_files(s3, s3_bucket, job_id)
    assert sorted(files) == ["00000.parquet", "00000_stats.json", "00001.parquet", "00001_stats.json"]
    local = []
    for name in ("00000.parquet", "00001.parquet"):
        (tmp_path / name).write_bytes(files[name])
        local.append(str(tmp_path / name))
    dataset = load_dataset("parquet", data_files=local, split="train")
    assert dataset.features["image"].__class__.__name__ == "Image"
    index_rows = [{name: row[name] for name in ("id", "status")} for row in dataset]
    accounted_once(status, rows, index_rows)
    loaded = {row["key"]: row for row in dataset}
    assert loaded["k/0"]["image"].size == (32, 32)
    assert loaded["k/0"]["caption"] == "a watercolor 0"
    assert json.loads(loaded["k/0"]["metadata"]) == {"license": "cc-by"}
    assert loaded["k/4"]["image"] is None and loaded["k/4"]["error_type"] == "InputImageError"


def test_a_worker_killed_mid_shard(
    tmp_path: Path, s3_bucket: str, registry: Registry, workers: Workers
) -> None:
    s3 = boto3.client("s3")
    big = png((200, 120, 40), (1600, 1600))  # slow enough to resize that the shard takes seconds
    samples = [(f"s{index:03d}", big, f"sample {index}") for index in range(40)]
    s3.put_object(Bucket=s3_bucket, Key="in/00000.tar", Body=tar_shard(samples))
    spec = write_spec(
        tmp_path,
        output=f"s3://{s3_bucket}/out",
        items=f"s3://{s3_bucket}/in/00000.tar",
        output_format="webdataset",
        shard_size=40,
    )
    with EmbeddedRedis(tmp_path / "redis") as server:
        submitted = imgjobs("submit", str(spec), env={"IMGJOBS_BROKER_URL": server.url})
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        worker = workers.start("cpu", server.url, registry)
        store = JobStore(redis.Redis.from_url(server.url, decode_responses=True))
        deadline = time.monotonic() + 120
        while not store.in_flight(job_id):
            assert time.monotonic() < deadline, workers.logs()
            time.sleep(0.02)
        time.sleep(0.5)
        pool = subprocess.run(
            ["pgrep", "-P", str(worker.process.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(pool) == 1, pool
        assert store.status(job_id).done == 0
        stats_key = f"out/{job_id}/shards/00000_stats.json"
        assert "Contents" not in s3.list_objects_v2(Bucket=s3_bucket, Prefix=stats_key)
        os.kill(int(pool[0]), signal.SIGKILL)  # before its shard is published: nothing is recorded
        status = run_until_finished(server, job_id, workers)

    rows = results(s3, s3_bucket, job_id)
    assert status.succeeded == 40
    files = shard_files(s3, s3_bucket, job_id)
    index_rows = pq.read_table(io.BytesIO(files["00000.parquet"])).to_pylist()
    accounted_once(status, rows, index_rows)
    with tarfile.open(fileobj=io.BytesIO(files["00000.tar"])) as tar:
        names = tar.getnames()
    assert names == [f"s{index:03d}.{ext}" for index in range(40) for ext in ("png", "txt", "json")]
    assert json.loads(files["00000_stats.json"])["successes"] == 40
