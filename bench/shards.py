"""Datasets in shards against one file per item, side by side in one run, on moto's S3 server: the
same resize job (32x32 PNGs through the `cpu` model's resize stage) read from --shards WebDataset
tars and written as WebDataset shards, and read from one object per item and written as one object
per item (results.jsonl and the report in both).

For each, from `imgjobs submit` starting until the job is finished, through one fresh `cpu` worker
process on a fresh embedded Redis:
- items/s;
- S3 requests per item, reads (GET, HEAD) and writes (PUT, POST, DELETE), counted from moto's own
  request log, so every client is counted: the producer's listing and indexing, the workers' reads
  and writes, the job's end;
- Redis bytes per item once the job is finished (used_memory after, minus before submit);
- the worker's peak RSS (VmHWM of its processes, the pool process that runs chunks the largest).

    python bench/shards.py [--items 20000] [--files-items N] [--shards 100] [--skip files|shards]
                           [--work-dir DIR] [--out DIR]

moto answers a request in about 7 ms on the development box (a real S3 in the same region, 10 to 30
ms for a small GET), so the one-file-per-item side is bound by requests here: at 1M items it would
take hours. --files-items runs it at a smaller size beside a larger shards job; the per-item figures
are what compare. Writes shards.json in --out, prints a markdown table and one JSON line last.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import redis
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.embedded import EmbeddedRedis, LocalWorker  # noqa: E402
from jobs.registry import Registry  # noqa: E402
from jobstate.store import JobStore  # noqa: E402
from kits.benches import add_folders, work_dir  # noqa: E402
from kits.helpers import moto_server  # noqa: E402
from kits.processes import wait_ready  # noqa: E402

SIZE = 32
DISTINCT = 256
BUCKET = "imgjobs-bench"
REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*(GET|HEAD|PUT|POST|DELETE) ')
READS, WRITES = ("GET", "HEAD"), ("PUT", "POST", "DELETE")


def pngs() -> list[bytes]:
    images = []
    for index in range(DISTINCT):
        buffer = io.BytesIO()
        Image.new("RGB", (SIZE + 8, SIZE + 8), (index, 40, 90)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


class Requests:
    """moto's request log, counted by method since the last mark."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.log.stat().st_size

    def since_mark(self) -> dict[str, int]:
        counts = dict.fromkeys(READS + WRITES, 0)
        with self.log.open("rb") as handle:
            handle.seek(self.offset)
            for line in handle:
                match = REQUEST.search(line.decode("utf-8", "replace"))
                if match:
                    counts[match.group(1)] += 1
        return counts


def upload_shards(s3: Any, images: list[bytes], items: int, shards: int, work: Path) -> str:
    per_shard = -(-items // shards)
    width = max(5, len(str(shards - 1)))

    def one(shard: int) -> None:
        path = work / f"{shard}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(shard * per_shard, min(items, (shard + 1) * per_shard)):
                for name, data in (
                    (f"i{index}.png", images[index % DISTINCT]),
                    (f"i{index}.txt", b"a cat wizard"),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        s3.upload_file(str(path), BUCKET, f"in-shards/{shard:0{width}d}.tar")
        path.unlink()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(shards)))
    return f"s3://{BUCKET}/in-shards/{{{0:0{width}d}..{shards - 1:0{width}d}}}.tar"


def upload_files(s3: Any, images: list[bytes], items: int, work: Path) -> Path:
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda index: s3.put_object(
                    Bucket=BUCKET, Key=f"in-files/i{index}.png", Body=images[index % DISTINCT]
                ),
                range(items),
            )
        )
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "items.jsonl"
    with manifest.open("w") as out:
        for index in range(items):
            out.write(
                json.dumps(
                    {
                        "id": f"i{index}",
                        "image": f"s3://{BUCKET}/in-files/i{index}.png",
                        "prompt": "a cat wizard",
                    }
                )
                + "\n"
            )
    return manifest


def write_spec(folder: Path, name: str, items: str, sharded: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {
        "version": 1,
        "name": name,
        "output": f"s3://{BUCKET}/out-{name}",
        "items": items,
        "defaults": {"size": [SIZE, SIZE]},
        "stages": [{"type": "resize", "format": "png"}],
    }
    if sharded:
        spec |= {"output_format": "webdataset", "shard_size": 1024}  # the cpu model's chunk size
    path = folder / "job.json"
    path.write_text(json.dumps(spec))
    return path


def peak_rss_mb(worker: LocalWorker) -> float:
    """The largest VmHWM among the worker's processes."""
    peaks = []
    pids, seen = [worker.process.pid], 0
    while seen < len(pids):  # the worker's process tree
        children = Path(f"/proc/{pids[seen]}/task/{pids[seen]}/children")
        pids += [int(pid) for pid in children.read_text().split()] if children.exists() else []
        seen += 1
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        found = re.search(r"VmHWM:\s+(\d+) kB", status)
        if found:
            peaks.append(int(found.group(1)) / 1024)
    return max(peaks, default=0.0)


def run_job(spec: Path, server: EmbeddedRedis, timeout: float = 6 * 3600) -> tuple[str, float]:
    env = os.environ | {"IMGJOBS_BROKER_URL": server.url}
    env.pop("IMGJOBS_CHUNK_SIZE", None)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "jobs", "submit", str(spec)], env=env, capture_output=True, text=True, cwd=ROOT
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    job_id = done.stdout.strip()
    store = JobStore(redis.Redis.from_url(server.url, decode_responses=True))
    deadline = time.monotonic() + timeout
    while (status := store.status(job_id)).finished_at is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out: {status}")
        time.sleep(0.1)
    if status.succeeded != status.total:
        raise RuntimeError(f"not every item succeeded: {status}")
    return job_id, time.perf_counter() - started


def measure(side: str, spec: Path, items: int, root: Path, requests: Requests) -> dict[str, Any]:
    with EmbeddedRedis(root / f"redis-{side}") as server:
        worker = LocalWorker(
            Registry.load(None).resolve("cpu"),
            server.url,
            None,
            root / f"worker-{side}.log",
            env={"IMGJOBS_TORCH_THREADS": "1"},
        )
        with worker:
            wait_ready(server.url, [worker])
            client = redis.Redis.from_url(server.url)
            before = int(client.info("memory")["used_memory"])
            requests.mark()
            job_id, seconds = run_job(spec, server)
            counts = requests.since_mark()
            after = int(client.info("memory")["used_memory"])
            rss = peak_rss_mb(worker)
    reads, writes = sum(counts[m] for m in READS), sum(counts[m] for m in WRITES)
    return {
        "side": side,
        "items": items,
        "job_id": job_id,
        "seconds": round(seconds, 1),
        "items_per_s": round(items / seconds, 1),
        "s3_reads_per_item": round(reads / items, 4),
        "s3_writes_per_item": round(writes / items, 4),
        "s3_requests_per_item": round((reads + writes) / items, 4),
        "s3_requests": counts,
        "redis_bytes_per_item": round((after - before) / items, 3),
        "worker_peak_rss_mb": round(rss, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=20_000, help="items of the shards job")
    parser.add_argument("--files-items", type=int, default=None, help="items of the file-per-item job")
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--skip", default="", help="files or shards")
    add_folders(parser)
    args = parser.parse_args()
    args.work_dir = work_dir(args)
    files_items = args.files_items or args.items
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    rows: list[dict[str, Any]] = []
    credentials = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret"}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imgjobs-shards-", dir=args.work_dir) as tmp:
        root = Path(tmp)
        log = root / "moto.log"
        try:
            with moto_server(log, credentials):
                s3 = boto3.client("s3")
                s3.create_bucket(Bucket=BUCKET)
                images = pngs()
                requests = Requests(log)
                if "files" not in skip:
                    manifest = upload_files(s3, images, files_items, root / "files")
                    spec = write_spec(root / "files", "files", str(manifest), sharded=False)
                    rows.append(measure("one file per item", spec, files_items, root, requests))
                    report(rows, args.out)
                if "shards" not in skip:
                    pattern = upload_shards(s3, images, args.items, args.shards, root)
                    spec = write_spec(root / "shards", "shards", pattern, sharded=True)
                    row = measure("WebDataset shards", spec, args.items, root, requests)
                    rows.append({**row, "input_shards": args.shards})
                    report(rows, args.out)
        except subprocess.TimeoutExpired:
            pass  # moto holding gigabytes can take longer than its helper waits to stop; it was killed


def report(rows: list[dict[str, Any]], out: Path) -> None:
    """shards.json, a markdown table and one JSON line, for the rows measured so far."""
    result: dict[str, Any] = {"cpus": os.cpu_count(), "rows": rows}
    if len(rows) == 2:
        files, shards = rows
        result["requests_per_item_ratio"] = round(
            files["s3_requests_per_item"] / shards["s3_requests_per_item"], 1
        )
        result["items_per_s_ratio"] = round(shards["items_per_s"] / files["items_per_s"], 2)
    (out / "shards.json").write_text(json.dumps(result, indent=2))
    print(
        "| side | items | items/s | S3 reads/item | S3 writes/item | S3 requests/item | Redis bytes/item "
        "| worker peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['side']} | {row['items']} | {row['items_per_s']} | {row['s3_reads_per_item']} | "
            f"{row['s3_writes_per_item']} | {row['s3_requests_per_item']} | {row['redis_bytes_per_item']} | "
            f"{row['worker_peak_rss_mb']} |"
        )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
