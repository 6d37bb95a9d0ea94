"""The fault-injection suite: one small job through each fault, with real Redis, real worker
processes and moto's S3 server. Every test ends with each item accounted for exactly once in
results.jsonl and in `imgjobs status` (kits/faults.py does the counting); bench/faults.py runs the
same scenarios and tabulates them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import IncompleteReadError

from jobs.registry import Registry
from kits.faultproxy import KINDS, FaultProxy
from kits.faults import (
    FaultRow,
    Lab,
    bad_images,
    duplicate_submission,
    malformed_manifests,
    multi_host,
    netns_unavailable,
    redis_restart,
    s3_faults,
)
from kits.processes import Workers

slow = pytest.mark.slow


@pytest.fixture
def lab(tmp_path: Path, models_yaml: Path, registry: Registry, workers: Workers) -> Iterator[Lab]:
    yield Lab(root=tmp_path, models_yaml=models_yaml, registry=registry, workers=workers)


def assert_clean(row: FaultRow) -> None:
    print(row)
    assert row.lost == 0, row
    assert row.executed_twice == 0, row


@slow
def test_redis_killed_and_restarted_mid_job(lab: Lab) -> None:
    row = redis_restart(lab)
    assert_clean(row)
    assert (row.succeeded, row.failed) == (row.submitted, {}), row


@slow
def test_s3_errors_and_throttling_for_a_while(lab: Lab, s3_endpoint: str) -> None:
    lab.s3_endpoint = s3_endpoint
    row = s3_faults(lab)
    assert_clean(row)
    assert (row.succeeded, row.failed) == (row.submitted, {}), row


@slow
def test_bad_images_fail_alone(lab: Lab) -> None:
    row = bad_images(lab)
    assert_clean(row)
    assert row.failed == {"InputImageError": row.submitted - row.succeeded} and row.succeeded == 4, row


@slow
def test_malformed_manifests_enqueue_nothing(lab: Lab) -> None:
    row, outcomes = malformed_manifests(lab)
    print(row)
    stderr = {name: done.stderr for name, done in outcomes.items()}
    assert "items.jsonl:2:" in stderr["bad-json"] and "items.jsonl:3:" in stderr["bad-json"], stderr
    assert "colour" in stderr["unknown-field"], stderr
    assert "duplicate id 'ok', first on line 1" in stderr["duplicate-ids"], stderr
    assert "job.yaml:" in stderr["bad-yaml"] and "not valid YAML" in stderr["bad-yaml"], stderr
    assert "strength" in stderr["bad-spec"], stderr


@slow
def test_duplicate_submission_computes_each_item_once(lab: Lab) -> None:
    row = duplicate_submission(lab)
    assert_clean(row)
    assert (row.succeeded, row.failed) == (row.submitted, {}), row


@slow
def test_worker_host_cut_off_mid_job(lab: Lab) -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"multi-host test needs network namespaces: {reason}")
    row = multi_host(lab)
    assert_clean(row)
    assert (row.succeeded, row.failed) == (row.submitted, {}), row


def test_fault_proxy_answers_like_a_struggling_s3(s3_bucket: str, s3_endpoint: str) -> None:
    """The proxy itself: each fault once, then a normal answer; boto3 (standard retries) gets through
    every one of them, the stall as a real client read timeout."""
    config = Config(
        retries={"mode": "standard", "max_attempts": 10},
        read_timeout=1,
        connect_timeout=1,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    with FaultProxy(s3_endpoint, stall_s=2) as proxy:
        s3 = boto3.session.Session().client("s3", endpoint_url=proxy.url, config=config)
        kinds = [kind for kind in KINDS if kind != "truncate"]
        proxy.arm(kinds, first=len(kinds))
        s3.put_object(Bucket=s3_bucket, Key="k", Body=b"x" * 1000)
        assert proxy.stats.faults == dict.fromkeys(kinds, 1) and not proxy.armed
        assert s3.head_object(Bucket=s3_bucket, Key="k")["ContentLength"] == 1000  # HEAD keeps the length
        assert proxy.stats.recovered_at is not None

        proxy.arm(["truncate"], first=1)
        body = s3.get_object(Bucket=s3_bucket, Key="k")["Body"]
        with pytest.raises(IncompleteReadError):
            while body.read(256):
                pass
        assert s3.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"x" * 1000
