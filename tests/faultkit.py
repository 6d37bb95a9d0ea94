"""Fault scenarios with real Redis, real worker processes and moto's S3 server, shared by
tests/integration/test_faults.py (which asserts on them) and bench/faults.py (which tabulates them).

Each scenario runs one small job through one fault and returns a FaultRow. Whatever the fault, it
first checks that every item is accounted for exactly once, in `imgjobs status --json` and in
results.jsonl, and counts:

- lost: submitted items that are not in results.jsonl as succeeded or failed;
- executed twice: items whose output was written again after the item had finished. A Watcher
  polls the job's item states and fingerprints each output (inode and mtime locally, the object's
  version on a versioned S3 bucket) when it first sees the item finished; any later rewrite changes it.

Time to recover is from the end of the fault (Redis back, S3 answering again, the host cut off) until
the job's items are moving again, as the scenario defines it.
"""

from __future__ import annotations

import ctypes
import functools
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import boto3
import redis
from PIL import Image

from jobs.embedded import EmbeddedRedis, LocalWorker, free_port, redis_server_binary, worker_command
from jobs.redrive import failures
from jobs.registry import Registry
from jobstate.bits import bit, ones
from jobstate.results import JobBits
from jobstate.store import JobStore
from schemas.messages import ChunkId, ItemResult, priority_lists
from tests.conftest import ROOT, Workers, imgjobs
from tests.faultproxy import FaultProxy
from tests.helpers import write_image, write_job

T = TypeVar("T")

STAGE = "s0-img2img"
# A few steps at 32x32: a chunk of 2 takes a fraction of a second.
FAST_STAGE = {"type": "img2img", "model": "tiny-sd", "strength": 0.75, "steps": 4}
# Slow enough (about half a second per chunk of 2) that a fault can land while a chunk runs.
SLOW_STAGE = {"type": "img2img", "model": "tiny-sd", "strength": 1.0, "steps": 30}
POLL_S = 0.05


@dataclass
class FaultRow:
    fault: str
    submitted: int
    succeeded: int
    failed: dict[str, int]
    lost: int
    executed_twice: int
    recover_s: float | None
    job_s: float | None
    detail: str = ""
    # False when the job never finished (no results.jsonl): a product bug the bench reports as a row.
    finished: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Lab:
    """What every scenario needs: a scratch folder, the tiny model's registry, a pool of workers
    stopped by the caller, and moto's S3 server on loopback (AWS_* set in os.environ)."""

    root: Path
    models_yaml: Path
    registry: Registry
    workers: Workers
    s3_endpoint: str | None = None

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path


# -- small helpers


def wait_until(condition: Callable[[], T | None], timeout: float, what: str, poll: float = POLL_S) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def log_matches(worker: LocalWorker, pattern: str) -> list[re.Match[str]]:
    try:
        text = worker.log_path.read_text(errors="replace")
    except OSError:
        return []
    return list(re.finditer(pattern, text))


def chunk_items(chunk_id: str, ids: Sequence[str], chunk_size: int = 2) -> list[str]:
    """The items of a first-stage chunk of a job whose items share parameters."""
    part = ChunkId.parse(chunk_id).part
    return list(ids[chunk_size * part : chunk_size * (part + 1)])


def newest_after(worker: LocalWorker, pattern: str, seen: int) -> re.Match[str] | None:
    """The last match of pattern in the worker's log, once there are more than `seen`."""
    found = log_matches(worker, pattern)
    return found[-1] if len(found) > seen else None


CHUNK_START = r"chunk (\S+?): s0-img2img, (\d+) item\(s\), delivery (\d+)"


def image_rows(folder: Path, count: int, prefix: str = "i") -> list[dict[str, Any]]:
    for n in range(count):
        write_image(folder / "in" / f"{n}.png", color=(n * 20 % 256, 90, 160))
    return [
        {"id": f"{prefix}{n:02d}", "image": f"in/{n}.png", "prompt": "x", "seed": n} for n in range(count)
    ]


def submit(
    spec: Path,
    broker_url: str,
    models_yaml: Path,
    chunk_size: int = 2,
    netns: str | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[str, subprocess.CompletedProcess[str]]:
    env = {
        **(env or {}),
        "IMGJOBS_BROKER_URL": broker_url,
        "IMGJOBS_MODELS": str(models_yaml),
        "IMGJOBS_CHUNK_SIZE": str(chunk_size),
    }
    done = cli(["submit", str(spec)], env, netns)
    assert done.returncode == 0, f"submit failed: {done.stderr}"
    return done.stdout.strip(), done


def cli(
    args: Sequence[str], env: Mapping[str, str], netns: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`imgjobs ARGS` in a fresh interpreter, inside netns when given."""
    if netns is None:
        return imgjobs(*args, env=dict(env), timeout=timeout)
    return subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "jobs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | dict(env),
        cwd=ROOT,
        check=False,
    )


# -- network namespaces

CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """Move the calling thread (only) into network namespace `name`; threads it starts follow it."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {name}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def in_netns(name: str | None, fn: Callable[[], T]) -> T:
    """fn() run in a thread of its own inside netns `name` (here when None), so that the sockets it
    opens are that namespace's."""
    if name is None:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            enter_netns(name)
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{name}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


# -- outputs and the watcher


class Outputs(Protocol):
    def fingerprint(self, item_id: str) -> str | None: ...

    def results(self) -> list[dict[str, Any]]: ...


class LocalOutputs:
    def __init__(self, job_root: Path) -> None:
        self.job_root = job_root

    def fingerprint(self, item_id: str) -> str | None:
        try:
            stat = (self.job_root / item_id / f"{STAGE}.png").stat()
        except OSError:
            return None
        return f"{stat.st_ino}:{stat.st_mtime_ns}"

    def results(self) -> list[dict[str, Any]]:
        text = (self.job_root / "results.jsonl").read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines()]


class S3Outputs:
    """Outputs on a versioned bucket: each write of a key makes a new version."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        endpoint: str | None = None,
        credentials: Mapping[str, str] | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = endpoint
        self.credentials = dict(credentials or {})
        self._local = threading.local()

    def _client(self) -> Any:
        # One client per thread: the watcher's lives in the watcher's (maybe namespaced) thread.
        client = getattr(self._local, "client", None)
        if client is None:
            client = s3_client(self.endpoint, self.credentials)
            self._local.client = client
        return client

    def fingerprint(self, item_id: str) -> str | None:
        try:
            head = self._client().head_object(Bucket=self.bucket, Key=f"{self.prefix}/{item_id}/{STAGE}.png")
        except Exception:
            return None
        return str(head.get("VersionId"))

    def results(self) -> list[dict[str, Any]]:
        body = self._client().get_object(Bucket=self.bucket, Key=f"{self.prefix}/results.jsonl")["Body"]
        return [json.loads(line) for line in body.read().decode().splitlines()]


def s3_client(endpoint: str | None = None, credentials: Mapping[str, str] | None = None) -> Any:
    """A client of its own (boto3's default session is not thread-safe); credentials as
    {"aws_access_key_id": ..., "aws_secret_access_key": ..., "region_name": ...}, else the environment's."""
    given = dict(credentials or {})
    session = boto3.session.Session(
        aws_access_key_id=given.get("aws_access_key_id"),
        aws_secret_access_key=given.get("aws_secret_access_key"),
        region_name=given.get("region_name"),
    )
    return session.client("s3", endpoint_url=endpoint)


def versioned_bucket(
    name: str, endpoint: str | None = None, credentials: Mapping[str, str] | None = None
) -> str:
    s3 = s3_client(endpoint, credentials)
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


class Watcher:
    """Polls a job's item states from a thread (inside netns when given): when each item first
    shows as finished, its output's fingerprint, and the count of finished items over time."""

    def __init__(
        self, broker_url: str, job_id: str, ids: Sequence[str], outputs: Outputs, netns: str | None = None
    ) -> None:
        self.broker_url = broker_url
        self.job_id = job_id
        self.ids = list(ids)  # in manifest order: the bitmaps' positions
        self.outputs = outputs
        self.netns = netns
        self.finished: dict[str, float] = {}
        self.fingerprints: dict[str, str | None] = {}
        self.timeline: list[tuple[float, int]] = []
        self.job_finished_at: float | None = None
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        if self.netns:
            enter_netns(self.netns)
        client = redis.Redis.from_url(
            self.broker_url, decode_responses=True, socket_timeout=2, socket_connect_timeout=1
        )
        while not self._stop.is_set():
            try:
                self._poll(client)
            except redis.RedisError:
                self.errors += 1  # the broker is down: that is some scenarios' point
            self._stop.wait(POLL_S)
        with suppress(redis.RedisError):
            self._poll(client)

    def _poll(self, client: redis.Redis) -> None:
        store = JobStore(client)
        meta = store.meta(self.job_id)
        bits = store.bits(meta)
        finished_at = meta.finished_at
        now = time.monotonic()
        with self._lock:
            for position in ones(bits.done, meta.total):
                item_id = self.ids[position]
                if item_id not in self.finished:
                    self.finished[item_id] = now
                    if not bit(bits.failed, position):
                        self.fingerprints[item_id] = self.outputs.fingerprint(item_id)
            if not self.timeline or self.timeline[-1][1] != len(self.finished):
                self.timeline.append((now, len(self.finished)))
            if finished_at and self.job_finished_at is None:
                self.job_finished_at = now

    @property
    def done(self) -> int:
        with self._lock:
            return len(self.finished)

    def wait_finished(self, timeout: float, logs: Callable[[], str]) -> float:
        deadline = time.monotonic() + timeout
        while self.job_finished_at is None:
            if time.monotonic() > deadline:
                done = f"{self.done} item(s) done"
                raise AssertionError(
                    f"job {self.job_id} not finished after {timeout:.0f}s ({done})\n{logs()}"
                )
            time.sleep(POLL_S)
        return self.job_finished_at

    def progress_after(self, moment: float) -> float | None:
        """When the first item finished after `moment`."""
        with self._lock:
            return next((t for t, _ in self.timeline if t > moment), None)

    def finished_before(self, moment: float) -> set[str]:
        with self._lock:
            return {i for i, t in self.finished.items() if t <= moment}

    def all_finished_at(self, item_ids: Sequence[str]) -> float | None:
        with self._lock:
            times = [self.finished.get(i) for i in item_ids]
        return None if None in times else max(t for t in times if t is not None)


@dataclass
class Accounting:
    status: dict[str, Any]
    results: dict[str, dict[str, Any]]
    lost: int
    executed_twice: int
    failed: dict[str, int] = field(default_factory=dict)


def account(
    job_id: str,
    ids: Sequence[str],
    broker_url: str,
    outputs: Outputs,
    watcher: Watcher | None,
    netns: str | None = None,
) -> Accounting:
    """Every item accounted for exactly once, in `imgjobs status --json` and in results.jsonl."""
    polled = cli(["status", job_id, "--json"], {"IMGJOBS_BROKER_URL": broker_url}, netns)
    assert polled.returncode == 0, polled.stderr
    status = json.loads(polled.stdout)
    assert status["total"] == len(ids), status
    assert status["pending"] == status["running"] == 0, status
    assert status["succeeded"] + status["failed"] == status["total"], status
    assert status["state"] in ("succeeded", "failed"), status

    lines = in_netns(netns, outputs.results)
    listed = [line["id"] for line in lines]
    assert len(listed) == len(set(listed)), f"an item is in results.jsonl more than once: {listed}"
    assert set(listed) == set(ids), f"results.jsonl has {sorted(listed)}, submitted {sorted(ids)}"
    results = {line["id"]: line for line in lines}
    finished = [r for r in lines if r["status"] in ("succeeded", "failed")]
    succeeded = sum(r["status"] == "succeeded" for r in lines)
    assert (succeeded, len(finished) - succeeded) == (status["succeeded"], status["failed"]), status
    failed: dict[str, int] = {}
    for result in finished:
        if result["status"] == "failed":
            reason = result["error"]["type"]
            failed[reason] = failed.get(reason, 0) + 1
    lost = len(set(ids) - {r["id"] for r in finished})

    twice = 0
    if watcher is not None:
        watcher.stop()
        for item_id, result in results.items():
            if result["status"] != "succeeded":
                continue
            now = in_netns(netns, functools.partial(outputs.fingerprint, item_id))
            first = watcher.fingerprints.get(item_id)
            twice += first is None or now != first
    return Accounting(status=status, results=results, lost=lost, executed_twice=twice, failed=failed)


def stuck_row(
    fault: str, ids: Sequence[str], broker_url: str, job_id: str, why: str, netns: str | None = None
) -> FaultRow:
    """The row of a job that never finished: its items as Redis has them."""

    def read() -> tuple[JobBits, list[ItemResult]]:
        store = JobStore(redis.Redis.from_url(broker_url, decode_responses=True))
        return store.bits(store.meta(job_id)), list(failures(store, job_id))

    bits, failed_results = in_netns(netns, read)
    failed: dict[str, int] = {}
    for result in failed_results:
        reason = result.error.type if result.error else "?"
        failed[reason] = failed.get(reason, 0) + 1
    stuck = [item_id for position, item_id in enumerate(ids) if not bit(bits.done, position)]
    return FaultRow(
        fault=fault,
        submitted=len(ids),
        succeeded=sum(bit(bits.done, p) and not bit(bits.failed, p) for p in range(len(ids))),
        failed=failed,
        lost=len(stuck),
        executed_twice=0,
        recover_s=None,
        job_s=None,
        detail=f"the job never finished (no results.jsonl): {why}; items never finished: {stuck or 'none'}",
        finished=False,
    )


def unacked(broker_url: str, netns: str | None = None) -> int:
    """Messages kombu still holds as delivered and not acknowledged."""

    def count() -> int:
        return int(redis.Redis.from_url(broker_url).hlen("unacked"))

    return in_netns(netns, count)


def row(
    fault: str, ids: Sequence[str], acc: Accounting, recover_s: float | None, job_s: float | None, detail: str
) -> FaultRow:
    return FaultRow(
        fault=fault,
        submitted=len(ids),
        succeeded=acc.status["succeeded"],
        failed=acc.failed,
        lost=acc.lost,
        executed_twice=acc.executed_twice,
        recover_s=None if recover_s is None else round(recover_s, 1),
        job_s=None if job_s is None else round(job_s, 1),
        detail=detail,
    )


# -- the scenarios


REDIS_RESTART = "Redis killed (-9) mid-chunk, restarted with AOF"


def redis_restart(
    lab: Lab,
    items: int = 8,
    outage_s: float = 3.0,
    env: Mapping[str, str] | None = None,
    timeout: float = 90,
    strict: bool = True,
) -> FaultRow:
    """kill -9 of redis-server (appendonly on) while a worker runs a chunk; restarted on the same
    port and directory after outage_s. strict=False returns a stuck job as a row instead of failing."""
    folder = lab.folder("redis-restart")
    rows = image_rows(folder, items)
    ids = [r["id"] for r in rows]
    spec = write_job(folder, rows, stage=SLOW_STAGE, name="redis-restart")
    port = free_port()
    server = EmbeddedRedis(folder / "redis", appendonly=True, port=port).start()
    watcher: Watcher | None = None
    try:
        worker = lab.workers.start("tiny-sd", server.url, lab.registry, env=dict(env or {}))
        lab.workers.wait_ready()
        submitted = time.monotonic()
        job_id, _ = submit(spec, server.url, lab.models_yaml)
        outputs = LocalOutputs(folder / "out" / job_id)
        watcher = Watcher(server.url, job_id, ids, outputs).start()
        wait_until(lambda: watcher is not None and watcher.done >= 1, 120, "a first finished item")
        seen = len(log_matches(worker, CHUNK_START))
        match = wait_until(lambda: newest_after(worker, CHUNK_START, seen), 60, "the next chunk to start")
        in_flight = chunk_items(match.group(1), ids)
        assert server.process is not None
        server.process.kill()
        server.process.wait()
        time.sleep(outage_s)
        server = EmbeddedRedis(folder / "redis", appendonly=True, port=port).start()
        back = time.monotonic()
        try:
            finished = watcher.wait_finished(timeout, lab.workers.logs)
        except AssertionError:
            if strict:
                raise
            return stuck_row(
                REDIS_RESTART, ids, server.url, job_id, f"not finished {timeout:.0f} s after the restart"
            )
        recovered = watcher.all_finished_at(in_flight)
        acc = account(job_id, ids, server.url, outputs, watcher)
        left = unacked(server.url)
    finally:
        if watcher is not None:
            watcher.stop()
        server.stop()
    return row(
        REDIS_RESTART,
        ids,
        acc,
        None if recovered is None else recovered - back,
        finished - submitted,
        f"{outage_s:.0f} s outage; recovery from the restart until the chunk in flight had finished; "
        f"{left} message(s) left unacked (redelivered after the visibility timeout, then skipped)",
    )


S3_FAULTS = ("InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "GatewayTimeout", "reset")


def upload_inputs(
    bucket: str,
    count: int,
    prefix: str = "i",
    endpoint: str | None = None,
    credentials: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    s3 = s3_client(endpoint, credentials)
    rows = []
    for n in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), (n * 20 % 256, 80, 160)).save(buffer, format="PNG")
        s3.put_object(Bucket=bucket, Key=f"in/{n}.png", Body=buffer.getvalue())
        rows.append(
            {"id": f"{prefix}{n:02d}", "image": f"s3://{bucket}/in/{n}.png", "prompt": "x", "seed": n}
        )
    return rows


def s3_faults(
    lab: Lab,
    *,
    items: int = 12,
    kinds: Sequence[str] = S3_FAULTS,
    fraction: float = 0.5,
    first: int = 0,
    window_s: float = 6.0,
    methods: tuple[str, ...] | None = None,
    path_contains: str | None = None,
    stall_s: float = 65.0,
    name: str = "s3-faults",
    label: str | None = None,
    workers: int = 2,
    timeout: float = 150,
    strict: bool = True,
) -> FaultRow:
    """Workers reach S3 through a FaultProxy that, once the first item has finished, answers a
    fraction (or the first N) of their requests with faults for window_s seconds."""
    assert lab.s3_endpoint, "needs moto's S3 server"
    folder = lab.folder(name)
    bucket = versioned_bucket(f"{name}-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    rows = upload_inputs(bucket, items)
    ids = [r["id"] for r in rows]
    spec = write_job(folder, rows, stage=FAST_STAGE, name=name, output=f"s3://{bucket}/out")
    watcher: Watcher | None = None
    with EmbeddedRedis(folder / "redis") as server, FaultProxy(lab.s3_endpoint, stall_s=stall_s) as proxy:
        pool = [
            lab.workers.start("tiny-sd", server.url, lab.registry, env={"AWS_ENDPOINT_URL": proxy.url})
            for _ in range(workers)
        ]
        lab.workers.wait_ready()
        submitted = time.monotonic()
        job_id, _ = submit(spec, server.url, lab.models_yaml)
        outputs = S3Outputs(bucket, f"out/{job_id}", endpoint=lab.s3_endpoint)
        watcher = Watcher(server.url, job_id, ids, outputs).start()
        try:
            wait_until(lambda: watcher is not None and watcher.done >= 1, 120, "a first finished item")
            proxy.arm(
                kinds,
                first=first,
                fraction=fraction,
                duration_s=window_s,
                methods=methods,
                path_contains=path_contains,
            )
            label = label or f"S3 faults: {fraction:.0%} of requests for {window_s:.0f} s"
            try:
                finished = watcher.wait_finished(timeout, lab.workers.logs)
            except AssertionError:
                if strict:
                    raise
                why = f"{proxy.stats.injected} faults injected; not finished after {timeout:.0f} s"
                return stuck_row(label, ids, server.url, job_id, why)
            stats = proxy.stats
            assert stats.injected > 0 and stats.last_fault_at is not None, stats
            progressed = watcher.progress_after(stats.last_fault_at)
            # The job may end before the next item does: then the end of the job is the recovery.
            recovered = progressed if progressed is not None else finished
            acc = account(job_id, ids, server.url, outputs, watcher)
        finally:
            watcher.stop()
        retries = sum(len(log_matches(w, r"\] retry: ")) for w in pool)
    injected = ", ".join(f"{kind} {count}" for kind, count in sorted(stats.faults.items()))
    return row(
        label,
        ids,
        acc,
        max(0.0, recovered - stats.last_fault_at),
        finished - submitted,
        f"{stats.injected} of {stats.requests} S3 requests faulted ({injected}); {retries} task retries; "
        "recovery from the last fault to the next finished item",
    )


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG header claiming width x height RGB pixels, with a few hundred bytes of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + width * 3) * 4, 9)
    return PNG_MAGIC + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def noise_png(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


MAX_IMAGE_BYTES = 4096


def bad_inputs() -> dict[str, bytes]:
    """One input per way an image can be bad, each under MAX_IMAGE_BYTES unless that is the point."""
    ppm = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(ppm, format="PPM")
    header = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    good = noise_png(24)
    return {
        "corrupt": PNG_MAGIC + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", os.urandom(300)),
        "truncated": good[: len(good) // 2],
        "zero-byte": b"",
        "wrong-magic": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n",
        "format-not-allowed": ppm.getvalue(),
        "oversized": noise_png(64),
        "bomb": bomb_png(),
        # Above IMGJOBS_MAX_IMAGE_PIXELS but under twice it, where Pillow only warns.
        "bomb-near-limit": bomb_png(9000, 9000),
    }


def bad_images(lab: Lab, good: int = 4) -> FaultRow:
    """Bad inputs beside good ones in one job: each bad one fails alone with InputImageError."""
    folder = lab.folder("bad-images")
    rows = image_rows(folder, good, prefix="good")
    bad = bad_inputs()
    for kind, data in bad.items():
        assert kind == "oversized" or len(data) <= MAX_IMAGE_BYTES, kind
        (folder / "in" / f"{kind}.png").write_bytes(data)
        rows.append({"id": kind, "image": f"in/{kind}.png", "prompt": "x"})
    assert len(bad["oversized"]) > MAX_IMAGE_BYTES
    ids = [r["id"] for r in rows]
    spec = write_job(folder, rows, stage=FAST_STAGE, name="bad-images")
    with EmbeddedRedis(folder / "redis") as server:
        lab.workers.start(
            "tiny-sd", server.url, lab.registry, env={"IMGJOBS_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES)}
        )
        lab.workers.wait_ready()
        submitted = time.monotonic()
        job_id, _ = submit(spec, server.url, lab.models_yaml)
        outputs = LocalOutputs(folder / "out" / job_id)
        watcher = Watcher(server.url, job_id, ids, outputs).start()
        finished = watcher.wait_finished(120, lab.workers.logs)
        acc = account(job_id, ids, server.url, outputs, watcher)
    for kind in bad:
        result = acc.results[kind]
        assert result["status"] == "failed", result
        assert result["error"]["type"] == "InputImageError", result
        assert result["outputs"] == {}, result
    for item_id in ids[:good]:
        assert acc.results[item_id]["status"] == "succeeded", acc.results[item_id]
    messages = {kind: acc.results[kind]["error"]["message"] for kind in bad}
    assert "byte limit" in messages["oversized"], messages
    assert all("pixel" in messages[kind] for kind in ("bomb", "bomb-near-limit")), messages
    return row(
        "bad images: " + ", ".join(bad),
        ids,
        acc,
        None,
        finished - submitted,
        "each bad item failed alone with InputImageError; the good ones succeeded",
    )


def malformed_manifests(lab: Lab) -> tuple[FaultRow, dict[str, subprocess.CompletedProcess[str]]]:
    """`imgjobs submit` of each malformed job exits 2 and enqueues nothing at all."""
    folder = lab.folder("manifests")
    write_image(folder / "in" / "a.png")
    good = {"id": "ok", "image": "in/a.png", "prompt": "x"}
    cases: dict[str, Path] = {}

    def job(name: str, lines: list[str], spec_text: str | None = None) -> None:
        case = folder / name
        spec = write_job(case, [], stage=FAST_STAGE, name=name)
        (case / "items.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        shutil.copytree(folder / "in", case / "in", dirs_exist_ok=True)
        if spec_text is not None:
            spec = case / "job.yaml"
            spec.write_text(spec_text, encoding="utf-8")
        cases[name] = spec

    ok = json.dumps(good)
    job("bad-json", [ok, '{"id": "two", "image": "in/a.png"', "not json at all"])
    job("unknown-field", [ok, json.dumps({**good, "id": "two", "colour": "red"})])
    job("duplicate-ids", [ok, json.dumps({**good, "prompt": "again"})])
    job("not-an-object", [ok, json.dumps(["id", "two"])])
    job("bad-id", [ok, json.dumps({**good, "id": "../escape"})])
    job(
        "bad-yaml",
        [ok],
        "version: 1\nname: bad-yaml\noutput: out\nitems: items.jsonl\n"
        "stages:\n  - {type: img2img, model: tiny-sd\n",
    )
    job(
        "bad-spec",
        [ok],
        "version: 1\nname: bad-spec\noutput: out\nitems: items.jsonl\n"
        "stages:\n  - {type: img2img, model: tiny-sd, strength: 7}\n",
    )
    offered = sum(
        len([line for line in (path.parent / "items.jsonl").read_text().splitlines() if line.strip()])
        for path in cases.values()
    )
    with EmbeddedRedis(folder / "redis") as server:
        started = time.monotonic()
        outcomes = {name: submit_raw(spec, server.url, lab.models_yaml) for name, spec in cases.items()}
        elapsed = time.monotonic() - started
        client = redis.Redis.from_url(server.url)
        keys_left = int(client.dbsize())
    for name, done in outcomes.items():
        assert done.returncode == 2, f"{name}: exit {done.returncode}\n{done.stderr}"
        assert done.stdout == "", f"{name}: printed a job id: {done.stdout}"
        assert "error:" in done.stderr and "Traceback" not in done.stderr, f"{name}: {done.stderr}"
    assert keys_left == 0, f"{keys_left} key(s) in Redis after rejected submissions"
    result = FaultRow(
        fault="malformed manifests: " + ", ".join(cases),
        submitted=offered,
        succeeded=0,
        failed={"rejected at submit (exit 2)": offered},
        lost=0,
        executed_twice=0,
        recover_s=None,
        job_s=round(elapsed, 1),
        detail=f"{len(cases)} jobs rejected whole, every problem listed; Redis dbsize 0 after",
    )
    return result, outcomes


def submit_raw(spec: Path, broker_url: str, models_yaml: Path) -> subprocess.CompletedProcess[str]:
    env = {"IMGJOBS_BROKER_URL": broker_url, "IMGJOBS_MODELS": str(models_yaml), "IMGJOBS_CHUNK_SIZE": "2"}
    return cli(["submit", str(spec)], env)


def duplicate_submission(lab: Lab, items: int = 6) -> FaultRow:
    """The same job submitted three times (before, during and after it runs): one job id, every
    item computed once."""
    folder = lab.folder("duplicate")
    rows = image_rows(folder, items)
    ids = [r["id"] for r in rows]
    spec = write_job(folder, rows, stage=SLOW_STAGE, name="duplicate")
    with EmbeddedRedis(folder / "redis") as server:
        job_id, _ = submit(spec, server.url, lab.models_yaml)
        again, second = submit(spec, server.url, lab.models_yaml)  # queued, nothing running yet
        assert again == job_id and "already submitted" in second.stderr, second
        worker = lab.workers.start("tiny-sd", server.url, lab.registry)
        lab.workers.wait_ready()
        submitted = time.monotonic()
        outputs = LocalOutputs(folder / "out" / job_id)
        watcher = Watcher(server.url, job_id, ids, outputs).start()
        wait_until(lambda: watcher.done >= 1, 120, "a first finished item")
        during, third = submit(spec, server.url, lab.models_yaml)  # while it runs
        assert during == job_id and "already submitted" in third.stderr, third
        finished = watcher.wait_finished(120, lab.workers.logs)
        after, fourth = submit(spec, server.url, lab.models_yaml)  # once finished
        assert after == job_id and "already submitted" in fourth.stderr, fourth
        time.sleep(1.0)  # anything wrongly enqueued would start by now
        acc = account(job_id, ids, server.url, outputs, watcher)
        starts = log_matches(worker, CHUNK_START)
        client = redis.Redis.from_url(server.url)
        queued = sum(int(client.llen(name)) for name in priority_lists("imgjobs.tiny-sd"))
    computed = sum(int(m.group(2)) for m in starts)
    assert (computed, len(starts), queued) == (items, items // 2, 0), (computed, len(starts), queued)
    return row(
        "duplicate submission (before, during and after the run)",
        ids,
        acc,
        None,
        finished - submitted,
        f"4 submits, one job id; {len(starts)} chunk runs for {items // 2} chunks, {computed} item runs",
    )


# -- multi-host: Redis, the S3 server and two workers, each in a network namespace of its own


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CI runs as root)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"ijprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


SUBNET = "10.213.0"
NETNS_CREDENTIALS = {
    "aws_access_key_id": "netns-key-id",
    "aws_secret_access_key": "netns-secret",
    "region_name": "us-east-1",
}


class Hosts:
    """Hosts on one private segment: a namespace per host, each with a veth to a bridge that lives
    in a namespace of its own. Nothing is routed anywhere else; the root namespace is not on it."""

    def __init__(self) -> None:
        self.tag = f"ij{os.getpid() % 100000}"
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, tuple[str, str, str]] = {}  # name -> (netns, address, interface)
        self.processes: list[subprocess.Popen[bytes]] = []

    @staticmethod
    def _ip(*args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def __enter__(self) -> Hosts:
        self._ip("netns", "add", self.switch)
        self._ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.switch, "link", "set", "br0", "up")
        return self

    def add(self, name: str, host: int) -> str:
        """A host `name` at SUBNET.host; returns its address."""
        netns, address = f"{self.tag}-{name}", f"{SUBNET}.{host}"
        inside, port = f"{self.tag}{name[:3]}h", f"{self.tag}{name[:3]}s"
        self._ip("netns", "add", netns)
        self._ip("-n", netns, "link", "set", "lo", "up")
        self._ip(
            "-n", netns, "link", "add", inside, "type", "veth", "peer", "name", port, "netns", self.switch
        )
        self._ip("-n", self.switch, "link", "set", port, "master", "br0")
        self._ip("-n", self.switch, "link", "set", port, "up")
        self._ip("-n", netns, "addr", "add", f"{address}/24", "dev", inside)
        self._ip("-n", netns, "link", "set", inside, "up")
        self.hosts[name] = (netns, address, inside)
        return address

    def netns(self, name: str) -> str:
        return self.hosts[name][0]

    def cut(self, name: str) -> None:
        """Take the host off the network: its link goes down, its connections go nowhere."""
        netns, _, inside = self.hosts[name]
        self._ip("-n", netns, "link", "set", inside, "down")

    def spawn(self, name: str, argv: list[str], log: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.netns(name), *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=os.environ | dict(env),
                cwd=ROOT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def __exit__(self, *_: object) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host[0]], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True, check=False)


class NetnsWorker(LocalWorker):
    """`imgjobs worker` on one of the Hosts; stopped with the other workers of the pool."""

    def __init__(
        self,
        hosts: Hosts,
        name: str,
        lab: Lab,
        broker_url: str,
        env: Mapping[str, str],
        model: str = "tiny-sd",
    ) -> None:
        self.model = lab.registry.resolve(model)
        self.log_path = lab.workers.tmp_path / f"worker-{len(lab.workers.started)}-{name}-{model}.log"
        self._log = self.log_path.open("ab")
        command = worker_command(model, lab.registry.path)
        full_env = {"IMGJOBS_TORCH_THREADS": "1", **env, "IMGJOBS_BROKER_URL": broker_url}
        self.process = hosts.spawn(name, command, self.log_path, full_env)
        lab.workers.started.append(self)


def wait_port(netns: str, address: str, port: int, what: str, process: subprocess.Popen[bytes]) -> None:
    def reachable() -> bool:
        import socket

        assert process.poll() is None, f"{what} exited"
        try:
            socket.create_connection((address, port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_until(lambda: in_netns(netns, reachable), 30, what, poll=0.1)


def multi_host(lab: Lab, items: int = 12, time_limit_s: int = 10, timeout: float = 180) -> FaultRow:
    """Redis, S3 and two workers on four hosts; one worker host is cut off while it runs a chunk.
    Its chunk comes back once Redis' visibility timeout (twice IMGJOBS_TASK_TIME_LIMIT_S) has passed
    and the other worker runs it."""
    folder = lab.folder("multi-host")
    with Hosts() as hosts:
        redis_ip, s3_ip = hosts.add("redis", 1), hosts.add("s3", 2)
        hosts.add("w1", 11)
        hosts.add("w2", 12)
        (folder / "redis").mkdir(exist_ok=True)
        conf = folder / "redis" / "redis.conf"
        conf.write_text(
            f'port 6379\nbind {redis_ip}\ndir "{folder / "redis"}"\nsave ""\nappendonly no\n',
            encoding="utf-8",
        )
        redis_process = hosts.spawn("redis", [redis_server_binary(), str(conf)], folder / "redis.log", {})
        moto = hosts.spawn(
            "s3", [sys.executable, "-m", "moto.server", "-H", s3_ip, "-p", "5000"], folder / "moto.log", {}
        )
        wait_port(hosts.netns("redis"), redis_ip, 6379, "redis-server", redis_process)
        wait_port(hosts.netns("s3"), s3_ip, 5000, "the S3 server", moto)
        broker_url, endpoint = f"redis://{redis_ip}:6379/0", f"http://{s3_ip}:5000"
        aws = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": NETNS_CREDENTIALS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": NETNS_CREDENTIALS["aws_secret_access_key"],
            "AWS_DEFAULT_REGION": NETNS_CREDENTIALS["region_name"],
        }
        bucket = "multi-host"
        s3_ns = hosts.netns("s3")
        in_netns(s3_ns, lambda: versioned_bucket(bucket, endpoint, NETNS_CREDENTIALS))
        rows = in_netns(
            s3_ns, lambda: upload_inputs(bucket, items, endpoint=endpoint, credentials=NETNS_CREDENTIALS)
        )
        ids = [r["id"] for r in rows]
        spec = write_job(folder, rows, stage=SLOW_STAGE, name="multi-host", output=f"s3://{bucket}/out")

        env = {**aws, "IMGJOBS_TASK_TIME_LIMIT_S": str(time_limit_s)}
        lost_worker = NetnsWorker(hosts, "w1", lab, broker_url, env)
        survivor = NetnsWorker(hosts, "w2", lab, broker_url, env)
        NetnsWorker(hosts, "w2", lab, broker_url, env, model="cpu")  # writes the job's end
        lab.workers.wait_ready()
        redis_ns = hosts.netns("redis")
        submitted = time.monotonic()
        # The producer writes the job's item parts to S3 too.
        job_id, _ = submit(spec, broker_url, lab.models_yaml, netns=redis_ns, env=aws)
        outputs = S3Outputs(bucket, f"out/{job_id}", endpoint, NETNS_CREDENTIALS)
        watcher = Watcher(broker_url, job_id, ids, outputs, netns=redis_ns).start()
        try:
            # Mid-job: cut w1 off the moment it starts a chunk. (Waiting for its second chunk was racy:
            # w2 could take every remaining chunk first.)
            match = wait_until(
                lambda: newest_after(lost_worker, CHUNK_START, 0), 120, "w1 to start a chunk", 0.01
            )
            hosts.cut("w1")
            cut_at = time.monotonic()
            chunk_id = match.group(1)
            lost = chunk_items(chunk_id, ids)
            finished = watcher.wait_finished(timeout, lab.workers.logs)
            recovered = watcher.all_finished_at(lost)
            acc = account(job_id, ids, broker_url, outputs, watcher, netns=redis_ns)
        finally:
            watcher.stop()
            if lost_worker.alive():
                os.killpg(lost_worker.process.pid, 9)  # cut off: a warm shutdown would only wait
                lost_worker.process.wait()
        rerun = [m for m in log_matches(survivor, CHUNK_START) if m.group(1) == chunk_id]
        assert rerun, f"w2 never ran the lost chunk {chunk_id}\n{lab.workers.logs()}"
    assert recovered is not None
    return row(
        "worker host cut off mid-chunk (netns, link down)",
        ids,
        acc,
        recovered - cut_at,
        finished - submitted,
        f"lost chunk c{ChunkId.parse(chunk_id).part} ({', '.join(lost)}) rerun by the other host "
        f"(delivery {rerun[-1].group(3)}); visibility timeout {2 * time_limit_s} s; "
        "recovery from the cut until the lost chunk's items finished",
    )


# -- worker deaths (tests/integration/test_reliability.py tests these; here they are measured)


def pool_process(worker: LocalWorker) -> int:
    children = subprocess.run(
        ["pgrep", "-P", str(worker.process.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert len(children) == 1, children
    return int(children[0])


def worker_death(lab: Lab, how: str, items: int = 8) -> FaultRow:
    """how: "sigkill" (the pool process, mid-chunk), "sigterm" (the worker, mid-chunk; a second worker
    takes the rest) or "poison" (the pool process killed at each delivery of one chunk)."""
    folder = lab.folder(f"worker-{how}")
    rows = image_rows(folder, items)
    ids = [r["id"] for r in rows]
    spec = write_job(folder, rows, stage=SLOW_STAGE, name=f"worker-{how}")
    env = {"IMGJOBS_MAX_DELIVERIES": "2"} if how == "poison" else {}
    with EmbeddedRedis(folder / "redis") as server:
        worker = lab.workers.start("tiny-sd", server.url, lab.registry, env=env)
        lab.workers.wait_ready()
        submitted = time.monotonic()
        job_id, _ = submit(spec, server.url, lab.models_yaml)
        outputs = LocalOutputs(folder / "out" / job_id)
        watcher = Watcher(server.url, job_id, ids, outputs).start()
        wait_until(lambda: watcher.done >= 1, 120, "a first finished item")
        seen = len(log_matches(worker, CHUNK_START))
        match = wait_until(lambda: newest_after(worker, CHUNK_START, seen), 60, "the next chunk")
        struck_items = chunk_items(match.group(1), ids)
        if how == "sigterm":
            worker.process.send_signal(15)
            struck = time.monotonic()
            worker.process.wait(120)  # warm shutdown: the chunk in hand completes first
            lab.workers.start("tiny-sd", server.url, lab.registry)
        else:
            os.kill(pool_process(worker), 9)
            struck = time.monotonic()
            if how == "poison":
                again = rf"chunk {re.escape(match.group(1))}: s0-img2img, \d+ item\(s\), delivery 2"
                wait_until(lambda: log_matches(worker, again), 120, "the second delivery")
                os.kill(pool_process(worker), 9)
                struck = time.monotonic()
        finished = watcher.wait_finished(120, lab.workers.logs)
        if how == "sigterm":  # the struck chunk finished before the worker stopped: when did work resume?
            rest = [i for i in ids if i not in struck_items and i not in watcher.finished_before(struck)]
            recovered = min((watcher.finished[i] for i in rest if i in watcher.finished), default=None)
        else:
            recovered = watcher.all_finished_at(struck_items)
        acc = account(job_id, ids, server.url, outputs, watcher)
    label, detail = {
        "sigkill": (
            "worker pool process SIGKILLed mid-chunk",
            "chunk redelivered to the restarted pool process; recovery until its items had finished",
        ),
        "sigterm": (
            "worker SIGTERMed mid-chunk",
            "warm shutdown finished the chunk; recovery until a new worker finished the next item",
        ),
        "poison": (
            "poison chunk: its worker killed at every delivery",
            "dead-lettered after IMGJOBS_MAX_DELIVERIES=2 (items failed with PoisonChunkError); "
            "recovery from the second kill until then",
        ),
    }[how]
    return row(
        label,
        ids,
        acc,
        None if recovered is None else recovered - struck,
        finished - submitted,
        detail,
    )
