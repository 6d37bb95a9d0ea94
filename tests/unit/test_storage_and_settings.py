"""Local storage, key containment, settings from the environment, and the dependency floors that the
storage and broker code need."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

import botocore
import pytest
from celery import Celery
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from jobstate import storage
from jobstate.connection import connect_redis
from jobstate.storage import LocalStorage, S3Storage, check_key, open_storage
from schemas.errors import ConfigError, StorageError, StorageRefusedError
from schemas.settings import Settings, celery_config, redact_url

ROOT = Path(__file__).resolve().parents[2]

# What the code relies on, and the first release that has it, each checked against that release's own
# code: a floor in pyproject.toml below one of these installs a library that fails at run time.
NEEDED_RELEASES = [
    ("botocore", "1.36.0", "Config(request_checksum_calculation=, response_checksum_validation=) in storage"),
    ("boto3", "1.36.0", "the boto3 release that requires botocore 1.36"),
    ("boto3", "1.28.0", "AWS_ENDPOINT_URL read from the environment (the deployments set it)"),
]


def test_local_storage_round_trip(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path), "job-1")
    assert isinstance(storage, LocalStorage)
    uri = storage.put("item/s0-img2img.png", b"png", "image/png")
    assert uri == str(tmp_path / "job-1" / "item" / "s0-img2img.png")
    assert storage.get("item/s0-img2img.png") == b"png" and storage.exists("item/s0-img2img.png")
    assert not storage.exists("item/other.png")
    assert [p.name for p in (tmp_path / "job-1" / "item").iterdir()] == [
        "s0-img2img.png"
    ]  # no temp file left


def test_local_files_follow_the_umask_and_list_by_folder(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path), "job")
    previous = os.umask(0o027)
    try:
        storage.put("a/one.png", b"1", "image/png")
        source = tmp_path / "source.txt"
        source.write_text("x")
        storage.put_file("results.jsonl", source, "application/x-ndjson")
    finally:
        os.umask(previous)
    # As any file the user writes: mkstemp's files would be 0600 whatever the umask.
    assert stat.S_IMODE((tmp_path / "job" / "a" / "one.png").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "job" / "results.jsonl").stat().st_mode) == 0o640
    storage.put("a/two.png", b"2", "image/png")
    assert storage.list("a") == ["a/one.png", "a/two.png"] and storage.list("nothing/here") == []


def test_a_path_through_a_file_is_refused_for_good(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    storage = open_storage(str(tmp_path / "afile" / "sub"), "job")
    with pytest.raises(StorageRefusedError, match="Not a directory") as caught:
        storage.put("a/one.png", b"1", "image/png")
    assert not caught.value.retryable


def test_s3_storage_is_rooted_at_the_job_prefix() -> None:
    storage = open_storage("s3://bucket/some/prefix/", "job-1")
    assert isinstance(storage, S3Storage)
    assert storage.uri("a/b.png") == "s3://bucket/some/prefix/job-1/a/b.png"
    assert open_storage("s3://bucket", "job-2").uri("x") == "s3://bucket/job-2/x"


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/abs", "a//b", "a\\b", "a\x00b", "", ".", "a/./b"])
def test_keys_cannot_escape_the_job_prefix(key: str) -> None:
    with pytest.raises(StorageError, match="refusing storage key"):
        check_key(key)


def test_job_id_cannot_escape_the_output(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        open_storage(str(tmp_path), "../elsewhere")


def test_env_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGJOBS_CHUNK_SIZE", "0")
    with pytest.raises(ConfigError, match="IMGJOBS_CHUNK_SIZE: Input should be greater than or equal to 1"):
        Settings.from_env()


def test_redacted_urls_hide_passwords_only() -> None:
    assert redact_url("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("rediss://user:pw@host/1") == "rediss://user:***@host/1"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
    # Unencoded '/', '?' or '#' in a password end urlsplit's netloc early; still nothing shows.
    assert redact_url("redis://:s3cr/et@host/0") == "redis://:***@host/0"
    assert redact_url("redis://u:a?b#c@host/0") == "redis://u:***@host/0"
    assert redact_url("redis://token@host/0") == "redis://***@host/0"


def test_a_malformed_broker_url_is_one_clear_error_without_its_password() -> None:
    with pytest.raises(ConfigError, match=r"IMGJOBS_BROKER_URL redis://:\*\*\*@h/0 is not a valid") as caught:
        connect_redis("redis://:s3cr/et@h/0")
    assert "s3cr" not in str(caught.value)


def test_celery_config_is_json_only_and_at_least_once() -> None:
    settings = Settings(task_time_limit_s=100)
    config = celery_config(settings, "redis://h/0")
    assert config["accept_content"] == ["json"] and config["task_serializer"] == "json"
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    assert config["broker_transport_options"]["visibility_timeout"] > config["task_time_limit"]


def test_a_stray_celery_broker_url_does_not_redirect_our_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    # Celery's own broker_url prefers the environment's CELERY_BROKER_URL to the configuration.
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://theirs.invalid:6379/0")
    app = Celery("test")
    app.conf.update(celery_config(Settings(), "redis://ours.invalid:6379/0"))
    for connection in (app.connection_for_write(), app.connection_for_read(), app.connection()):
        assert connection.hostname == "ours.invalid", connection.as_uri()


def test_the_worker_app_falls_back_to_celerys_broker_variable_and_ours_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from schemas.settings import worker_broker_url

    ours, theirs = "redis://ours.invalid:6379/0", "redis://theirs.invalid:6379/0"
    assert worker_broker_url(Settings(broker_url=None), {"CELERY_BROKER_URL": theirs}) == theirs
    assert worker_broker_url(Settings(broker_url=ours), {"CELERY_BROKER_URL": theirs}) == ours
    assert worker_broker_url(Settings(broker_url=ours), {}) == ours
    with pytest.raises(ConfigError, match=r"IMGJOBS_BROKER_URL .*CELERY_BROKER_URL"):
        worker_broker_url(Settings(broker_url=None), {})
    # The imgjobs commands read only their own variable, whose absence means an embedded run.
    monkeypatch.delenv("IMGJOBS_BROKER_URL", raising=False)
    monkeypatch.setenv("CELERY_BROKER_URL", theirs)
    assert Settings.from_env().broker_url is None


def declared_floors() -> dict[str, Version]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    floors: dict[str, Version] = {}
    for dependency in dependencies:
        requirement = Requirement(dependency)
        lows = [Version(s.version) for s in requirement.specifier if s.operator in {">=", "==", "~="}]
        if lows:
            floors[canonicalize_name(requirement.name)] = max(lows)
    return floors


def test_dependency_floors_cover_what_the_code_uses() -> None:
    floors = declared_floors()
    for distribution, needed, feature in NEEDED_RELEASES:
        floor = floors[distribution]
        assert floor >= Version(needed), f"{distribution}>={floor}, but {feature} needs {needed}"
    # The botocore installed here accepts the client configuration that storage builds.
    # Any: botocore-stubs know these two only as arguments of Config, not as its attributes.
    config: Any = storage.s3_client().meta.config
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert Version(botocore.__version__) >= floors["botocore"]


def test_a_changed_s3_environment_gets_a_client_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client cached from an earlier environment (other keys, another endpoint) is never reused."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    first = storage.s3_client()
    assert first.meta.endpoint_url == "http://127.0.0.1:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    assert storage.s3_client().meta.endpoint_url == "http://127.0.0.1:2"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert storage.s3_client() is first
