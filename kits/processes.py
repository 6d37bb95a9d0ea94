"""The product's processes as tests and benchmarks run them: `imgjobs worker` processes in a pool that
stops them all (Workers), the CLI in a fresh interpreter (imgjobs), and what the product itself says of
them, never their log lines: a worker is ready once it answers `imgjobs workers` (Celery's remote
control) with its model loaded, and the job-state owner says which chunk runs now, in which delivery.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import redis

from jobs.broker import producer_app, worker_node
from jobs.consumers import LiveWorker, live_workers
from jobs.embedded import LocalWorker
from jobs.registry import Registry
from jobstate.store import JobStore
from schemas.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.02  # a chunk of the tiny model runs for a fraction of a second
ASK_S = 0.5  # how long one ask of the workers waits for those yet to answer


def imgjobs(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "jobs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | (env or {}),
        cwd=ROOT,
        check=False,
    )


def store_of(broker_url: str) -> JobStore:
    return JobStore(redis.Redis.from_url(broker_url, decode_responses=True))


def answering(worker: LocalWorker, found: Sequence[LiveWorker]) -> LiveWorker | None:
    """How `worker` answered `imgjobs workers`, if it did."""
    node = worker_node(worker.model, worker.process.pid).removesuffix("%h")
    return next((live for live in found if live.name.startswith(node)), None)


def ask_workers(broker_url: str, expected: int | None = None) -> list[LiveWorker]:
    """The workers of the broker as they answer `imgjobs workers`: at once when `expected` have."""
    app = producer_app(Settings(), broker_url)
    try:
        return live_workers(app, store_of(broker_url), timeout_s=ASK_S, limit=expected)
    finally:
        app.close()


def wait_ready(broker_url: str, workers: Sequence[LocalWorker], timeout: float = 120) -> None:
    """Until every one of `workers` has its model loaded and takes work: it answers `imgjobs workers`,
    with the device its model runs on."""
    deadline = time.monotonic() + timeout
    while True:
        found = ask_workers(broker_url, len(workers))
        waiting = [w for w in workers if (live := answering(w, found)) is None or live.device is None]
        if not waiting:
            return
        for worker in waiting:
            assert worker.alive(), f"worker exited:\n{worker.log_tail(50)}"
        assert time.monotonic() < deadline, f"worker not ready:\n{waiting[0].log_tail(50)}"
        time.sleep(POLL_S)


def wait_busy(broker_url: str, worker: LocalWorker, workers: int, timeout: float = 120) -> str:
    """The id of a chunk `worker` runs now, as it answers `imgjobs workers`, once it runs one; the
    broker has `workers` workers, whose answers end each ask."""
    deadline = time.monotonic() + timeout
    while True:
        live = answering(worker, ask_workers(broker_url, workers))
        chunks = [task.task for task in live.running if task.stage is not None] if live else []
        if chunks:
            return chunks[0]
        assert time.monotonic() < deadline, f"{worker.log_path.name} ran no chunk in {timeout:.0f}s"


def running_chunk(
    broker_url: str,
    job_id: str,
    delivery: int = 1,
    besides: Collection[str] = (),
    timeout: float = 120,
) -> str:
    """The id of a chunk of the job that runs now in its `delivery`-th delivery (of its first try, as
    JobStore.deliveries counts them), other than `besides`, as the job-state owner has it."""
    store = store_of(broker_url)
    deadline = time.monotonic() + timeout
    while True:
        deliveries = store.deliveries(job_id)
        running = [
            chunk
            for chunk in store.in_flight(job_id)
            if chunk not in besides and deliveries.get(f"{chunk}#0") == delivery
        ]
        if running:
            return running[0]
        assert time.monotonic() < deadline, f"no chunk of {job_id} in delivery {delivery}: {deliveries}"
        time.sleep(POLL_S)


def chunk_items(broker_url: str, job_id: str, chunk_id: str, ids: Sequence[str]) -> list[str]:
    """The items (of `ids`, in manifest order) of a first-stage chunk of the job, by the chunk ids the
    job's metadata gives its parts."""
    meta = store_of(broker_url).meta(job_id)
    part = next(part for part in range(meta.parts) if meta.first_chunk(part).chunk_id == chunk_id)
    return [ids[position] for position in meta.positions(part)]


def pool_process(worker: LocalWorker) -> int:
    """The worker's pool process, which loads the model and runs the chunks."""
    children = subprocess.run(
        ["pgrep", "-P", str(worker.process.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert len(children) == 1, children
    return int(children[0])


class Workers:
    """Starts `imgjobs worker` processes and stops every one of them at teardown. As a deployment
    must, each broker gets a `cpu` worker, which writes jobs' ends (it is started with the first
    worker of another model, with the same environment but its metrics port). Workers started
    elsewhere (in a network namespace) join with `adopt`, to be stopped with the others."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[LocalWorker] = []
        self._brokers: dict[int, str] = {}  # by the worker's process id: the broker it was started on
        self._ready: set[int] = set()  # the process ids of those found ready
        self._ends: set[str] = set()

    def start(
        self, model: str, broker_url: str, registry: Registry, env: dict[str, str] | None = None
    ) -> LocalWorker:
        if broker_url not in self._ends:
            self._ends.add(broker_url)
            if model != "cpu":
                # Its own metrics port, if any, stays the model's worker's.
                shared = {key: value for key, value in (env or {}).items() if key != "IMGJOBS_METRICS_PORT"}
                self.start("cpu", broker_url, registry, shared)
        log_path = self.tmp_path / f"worker-{len(self.started)}.log"
        # Outside pytest (bench/faults.py) no fixture sets the folders workers may read from.
        roots = os.environ.get("IMGJOBS_LOCAL_INPUT_ROOTS") or str(self.tmp_path)
        env = {"IMGJOBS_TORCH_THREADS": "1", "IMGJOBS_LOCAL_INPUT_ROOTS": roots, **(env or {})}
        worker = LocalWorker(registry.resolve(model), broker_url, registry.path, log_path, env=env)
        self.started.append(worker)
        self._brokers[worker.process.pid] = broker_url
        return worker

    def adopt(self, worker: LocalWorker) -> None:
        self.started.append(worker)

    def wait_ready(self, timeout: float = 120) -> None:
        """Until every worker this pool started has its model loaded and takes work (those found ready
        before are not asked again: one may have been stopped since)."""
        waiting = [
            w for w in self.started if w.process.pid in self._brokers and w.process.pid not in self._ready
        ]
        for broker_url in dict.fromkeys(self._brokers[w.process.pid] for w in waiting):
            wait_ready(
                broker_url, [w for w in waiting if self._brokers[w.process.pid] == broker_url], timeout
            )
        self._ready.update(w.process.pid for w in waiting)

    def logs(self) -> str:
        return "\n\n".join(f"--- {w.log_path.name}\n{w.log_tail(60)}" for w in self.started)

    def stop(self) -> None:
        # Signal all first so their warm shutdowns overlap.
        for worker in self.started:
            if worker.alive():
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.started:
            worker.stop()
