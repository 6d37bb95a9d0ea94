"""imgjobs' own overhead on the CPU, against the embedded Redis and a real worker process.

1. End to end with the near-zero-cost `resize` stage: items/s with chunks of --chunk-size (default:
   the `cpu` model's chunk_size, 1024), against the same job sent as one Celery task per item
   (chunk size 1). The chunked job runs before and after the per-item one and its rate is the mean
   of the two, so a machine that slows down or speeds up during the run moves both sides alike. The
   overhead per item is the end-to-end time per item minus what the stage's own work costs
   in-process (read, decode, fit, encode, write; measured before and after, the mean).
2. The producer: validate and enqueue --producer-items items with `imgjobs submit`, no workers
   attached (it writes the items as parts into the job's local output, and queues a chunk per part);
   its rate and peak RSS.

    python bench/overhead.py [--items 10000] [--producer-items 1000000] [--chunk-size N] [--out DIR]
                             [--work-dir DIR]

Both end-to-end runs are timed from `imgjobs submit` starting (about a second of imports) until the job
is marked finished (results.jsonl and report.html written), through one `cpu` worker process. The
producer runs at the `cpu` model's chunk size.

Inputs, outputs and Redis live in --work-dir: by default /dev/shm where there is one (RAM-backed),
else the system's temporary folder. The `resize` stage is meant to cost next to nothing, so that the
ratio shows imgjobs' own costs; but each item creates a folder and a file, which on a disk costs 0.2
to 1.2 ms an item on the development box (it varies fourfold from minute to minute), against about
0.03 ms in RAM. Both runs pay that alike; `--work-dir /tmp` measures with the disk.

Writes overhead.json in --out, prints a markdown table, and prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.embedded import EmbeddedRedis, LocalWorker  # noqa: E402
from jobs.registry import Registry  # noqa: E402
from jobstate.storage import open_storage  # noqa: E402
from jobstate.store import JobStore  # noqa: E402
from kits.benches import add_folders, print_measures, work_dir  # noqa: E402
from schemas.settings import Settings  # noqa: E402
from workers.imageio import encode_image, load_input  # noqa: E402

SIZE = 32


def write_inputs(folder: Path, count: int) -> list[dict[str, Any]]:
    (folder / "in").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        path = folder / "in" / f"{index}.png"
        Image.new("RGB", (SIZE, SIZE), (index % 256, 40, 90)).save(path)
        rows.append({"id": f"i{index}", "image": f"in/{index}.png"})
    return rows


def write_job(folder: Path, rows: list[dict[str, Any]], name: str) -> Path:
    (folder / "items.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {
        "version": 1,
        "name": name,
        "output": "out",
        "items": "items.jsonl",
        "defaults": {"size": [SIZE, SIZE]},
        "stages": [{"type": "resize", "format": "png"}],
    }
    path = folder / "job.json"
    path.write_text(json.dumps(spec))
    return path


def stage_work_ms(folder: Path, rows: list[dict[str, Any]], name: str) -> float:
    """The resize stage's own work per item, in-process: read, decode, fit, encode, write."""
    settings = Settings()
    storage = open_storage(str(folder / "inline-out"), name)
    started = time.perf_counter()
    for row in rows:
        image = load_input(str(folder / row["image"]), (SIZE, SIZE), settings)
        storage.put(f"{row['id']}/s0-resize.png", encode_image(image), "image/png")
    return (time.perf_counter() - started) * 1000 / len(rows)


def run_job(folder: Path, server: EmbeddedRedis, chunk_size: int | None) -> float:
    """items/s from submit until the job is finished, through one `cpu` worker process; chunk_size
    None leaves it to the model's registry entry."""
    env = os.environ | {"IMGJOBS_BROKER_URL": server.url}
    env.pop("IMGJOBS_CHUNK_SIZE", None)
    if chunk_size is not None:
        env["IMGJOBS_CHUNK_SIZE"] = str(chunk_size)
    started = time.perf_counter()
    submitted = subprocess.run(
        [sys.executable, "-m", "jobs", "submit", str(folder / "job.json")],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    job_id = submitted.stdout.strip()
    client = redis.Redis.from_url(server.url, decode_responses=True)
    while (status := JobStore(client).status(job_id)).finished_at is None:
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    assert status.succeeded == status.total, status
    return status.total / elapsed


def producer(folder: Path, server: EmbeddedRedis, count: int) -> tuple[float, float]:
    """(items/s, peak RSS in MB) of `imgjobs submit` for count items, no workers attached."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "items.jsonl").open("w") as items:
        for index in range(count):
            items.write(f'{{"id": "p{index}", "image": "s3://bucket/in/{index}.png", "seed": {index}}}\n')
    spec = {
        "version": 1,
        "name": "producer",
        "output": str(folder / "out"),  # submit writes the items there, as parts
        "items": "items.jsonl",
        "defaults": {"size": [512, 512]},
        "stages": [{"type": "resize"}],
    }
    (folder / "job.json").write_text(json.dumps(spec))
    measure = (
        "import resource, runpy, sys; sys.argv = ['imgjobs', 'submit', sys.argv[1]]\n"
        "try:\n    runpy.run_module('jobs', run_name='__main__')\n"
        "finally:\n    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    env = os.environ | {"IMGJOBS_BROKER_URL": server.url}
    env.pop("IMGJOBS_CHUNK_SIZE", None)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", measure, str(folder / "job.json")],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    peak_kb = int(done.stderr.strip().splitlines()[-1])
    return count / elapsed, peak_kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--producer-items", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the cpu model's chunk_size")
    add_folders(parser)
    args = parser.parse_args()
    args.work_dir = work_dir(args)

    with tempfile.TemporaryDirectory(prefix="imgjobs-bench-", dir=args.work_dir) as tmp:
        root = Path(tmp)
        rows = write_inputs(root / "engine", args.items)
        with EmbeddedRedis(root / "redis") as server:
            cpu = Registry.load(None).resolve("cpu")
            chunk_size = args.chunk_size or cpu.entry.items_per_chunk
            with LocalWorker(
                cpu,
                server.url,
                None,
                root / "worker.log",
                env={"IMGJOBS_TORCH_THREADS": "1", "IMGJOBS_LOCAL_INPUT_ROOTS": str(root)},
            ):
                write_job(root / "engine", rows[:8], "warm-up")  # the worker starts and loads before timing
                run_job(root / "engine", server, args.chunk_size)
                work_before = stage_work_ms(root / "engine", rows, "before")
                write_job(root / "engine", rows, "chunked-before")
                chunked_before = run_job(root / "engine", server, args.chunk_size)
                write_job(root / "engine", rows, "per-item")
                per_item = run_job(root / "engine", server, 1)
                write_job(root / "engine", rows, "chunked-after")
                chunked_after = run_job(root / "engine", server, args.chunk_size)
                work_after = stage_work_ms(root / "engine", rows, "after")
            producer_rate, producer_rss = producer(root / "producer", server, args.producer_items)

    chunked, work_ms = (chunked_before + chunked_after) / 2, (work_before + work_after) / 2
    result = {
        "items": args.items,
        "chunk_size": chunk_size,
        "work_dir": str(args.work_dir or tempfile.gettempdir()),
        "items_per_s": round(chunked, 1),
        "items_per_s_before_after": [round(chunked_before, 1), round(chunked_after, 1)],
        "baseline_items_per_s": round(per_item, 1),
        "ratio": round(chunked / per_item, 2),
        "stage_work_ms_per_item": round(work_ms, 3),
        "stage_work_ms_before_after": [round(work_before, 3), round(work_after, 3)],
        "overhead_ms_per_item": round(1000 / chunked - work_ms, 3),
        "producer_items": args.producer_items,
        "producer_items_per_s": round(producer_rate, 1),
        "producer_peak_rss_mb": round(producer_rss, 1),
        "cpus": os.cpu_count(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(result, indent=2))
    print_measures(result)


if __name__ == "__main__":
    main()
