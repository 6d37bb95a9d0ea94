"""Shared fixtures: a tiny SD checkpoint on disk, a real Redis server, moto's S3 server on loopback,
and real `imgjobs worker` processes (kits/processes.py). Nothing here mocks Redis, Celery or boto3."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from jobs.embedded import EmbeddedRedis
from jobs.registry import Registry
from jobstate.storage import forget_s3_clients
from kits.helpers import moto_server
from kits.processes import Workers


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


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(tmp_path)
    yield pool
    pool.stop()
