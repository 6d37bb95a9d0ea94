"""Shared fixtures: a tiny SD checkpoint on disk, a real Redis server, moto's S3 server on loopback,
and real `imgjobs worker` processes. Nothing here mocks Redis, Celery or boto3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from jobs.embedded import EmbeddedRedis, LocalWorker
from jobs.registry import Registry
from jobstate.storage import forget_s3_clients
from tests.helpers import moto_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def private_compile_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Compiled code from tests stays in the test's temporary folder, worker processes included."""
    os.environ["IMGJOBS_COMPILE_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))


@pytest.fixture(autouse=True)
def private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Embedded runs keep their state in the test's own folder: never the user's, and no test finds
    another's job there (the same job id would resume it)."""
    state = tmp_path / "imgjobs-state"
    monkeypatch.setenv("IMGJOBS_STATE_DIR", str(state))
    return state


@pytest.fixture(autouse=True)
def local_inputs_of_the_test(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers, in this process and in worker processes, read local inputs under this session's
    temporary folders, as an operator's IMGJOBS_LOCAL_INPUT_ROOTS would allow a shared volume."""
    monkeypatch.setenv("IMGJOBS_LOCAL_INPUT_ROOTS", str(tmp_path_factory.getbasetemp()))


@pytest.fixture(autouse=True)
def no_listener_outlives_its_test() -> Iterator[None]:
    """The process's event hub starts each test with the listeners it had, and ends it with none: a
    listener a test subscribed and never took off (or the compile watch a model subscribed) sees no
    other test's events."""
    from workers.events import emit

    yield
    emit.reset()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """Two cores shared by the test process and worker processes: torch's spinning thread pool makes
    tiny models several times slower when threads outnumber free cores."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.tiny_models import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def models_yaml(tiny_sd_dir: Path) -> Path:
    path = tiny_sd_dir.parent / "models.yaml"
    path.write_text(f"models:\n  tiny-sd:\n    source: {tiny_sd_dir}\n    dtype: float32\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def registry(models_yaml: Path) -> Registry:
    return Registry.load(models_yaml)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def without_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No credentials anywhere boto3 looks, and no instance metadata service to ask; S3 clients
    are built anew for the test, and again after it."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    forget_s3_clients()
    yield
    forget_s3_clients()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto in server mode on a loopback port; every boto3 client here and in workers points at it."""
    credentials = {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-leak",
    }
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log", credentials) as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    name: str = "t-" + str(request.node.name).lower().replace("_", "-")[:40] + f"-{os.getpid()}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


class Workers:
    """Starts `imgjobs worker` processes and stops every one of them at teardown. As a deployment
    must, each broker gets a `cpu` worker, which writes jobs' ends (it is started with the first
    worker of another model, with the same environment but its metrics port)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[LocalWorker] = []
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
        return worker

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for worker in self.started:
            while " ready." not in worker.log_tail(200):
                assert worker.alive(), f"worker exited:\n{worker.log_tail(50)}"
                assert time.monotonic() < deadline, f"worker not ready:\n{worker.log_tail(50)}"
                time.sleep(0.2)

    def logs(self) -> str:
        return "\n\n".join(f"--- {w.log_path.name}\n{w.log_tail(60)}" for w in self.started)

    def stop(self) -> None:
        # Signal all first so their warm shutdowns overlap.
        for worker in self.started:
            if worker.alive():
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.started:
            worker.stop()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(tmp_path)
    yield pool
    pool.stop()


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
