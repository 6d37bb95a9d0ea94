"""Bulk item sources: Parquet manifests and jobs built from a listing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.manifest import validate_job
from jobs.registry import Registry
from jobs.sources import item_id_for, list_images, write_listing_job
from jobstate.storage import forget_s3_clients, s3_client, s3_clients_built
from kits.helpers import validated_parts, write_image, write_job
from schemas.errors import ConfigError, SpecError

REGISTRY = Registry.load(None)


def test_parquet_items_stream_with_row_numbers(tmp_path: Path) -> None:
    spec = write_job(tmp_path, [], model="sd15")
    data = json.loads(spec.read_text())
    data["items"] = "items.parquet"
    spec.write_text(json.dumps(data))
    rows: dict[str, list[object]] = {
        "id": ["a", "b", "c"],
        "image": ["a.png", "b.png", None],
        "prompt": ["x", None, "z"],
        "seed": [1, 2, 3],
    }
    pq.write_table(pa.table(rows), tmp_path / "items.parquet", row_group_size=2)
    with pytest.raises(SpecError) as caught:
        validate_job(spec, REGISTRY)
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path / 'items.parquet'}:3: image: required unless the first stage is text2img"
    ]
    rows["image"][2] = "c.png"
    pq.write_table(pa.table(rows), tmp_path / "items.parquet", row_group_size=2)
    job, parts = validated_parts(spec, REGISTRY)
    assert job.total == 3
    assert [(item.id, item.prompt, item.seed) for part in parts for item in part] == [
        ("a", "x", 1),
        ("b", None, 2),
        ("c", "z", 3),
    ]


def test_unreadable_parquet_is_a_problem(tmp_path: Path) -> None:
    spec = write_job(tmp_path, [], model="sd15")
    data = json.loads(spec.read_text())
    data["items"] = "items.parquet"
    spec.write_text(json.dumps(data))
    (tmp_path / "items.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SpecError, match="not a readable Parquet file"):
        validate_job(spec, REGISTRY)


def test_local_listing_becomes_a_job(tmp_path: Path) -> None:
    for name in ("b.png", "a.png", "sub/a.png", "notes.txt"):
        write_image(tmp_path / "in" / name) if name.endswith(".png") else (tmp_path / "in" / name).write_text(
            "x"
        )
    found = list(list_images(str(tmp_path / "in" / "**" / "*")))
    assert found == [str(tmp_path / "in" / n) for n in ("a.png", "b.png", "sub/a.png")]
    spec = {
        "version": 1,
        "name": "listing",
        "output": str(tmp_path / "out"),
        "stages": [{"type": "img2img", "model": "sd15"}],
    }
    path, count = write_listing_job(tmp_path / "job", str(tmp_path / "in" / "**" / "*.png"), spec, "a prompt")
    job = validate_job(path, REGISTRY)
    assert count == job.total == 3
    items = [json.loads(line) for line in (tmp_path / "job" / "items.jsonl").read_text().splitlines()]
    assert [item["id"] for item in items] == ["a", "b", "a-2"]
    assert {item["prompt"] for item in items} == {"a prompt"}

    # `submit --from` writes the job into a new temporary folder each time: the same listing with the
    # same flags is still the same job, as a manifest is.
    again, _ = write_listing_job(tmp_path / "other", str(tmp_path / "in" / "**" / "*.png"), spec, "a prompt")
    assert validate_job(again, REGISTRY).job_id == job.job_id
    changed, _ = write_listing_job(tmp_path / "third", str(tmp_path / "in" / "**" / "*.png"), spec, "other")
    assert validate_job(changed, REGISTRY).job_id != job.job_id


def test_a_listing_that_would_list_its_own_output_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a schedule's is: each submit of it would take the last one's outputs for new images."""
    write_image(tmp_path / "in" / "a.png")
    monkeypatch.chdir(tmp_path)
    spec = {"version": 1, "name": "listing", "stages": [{"type": "img2img", "model": "sd15"}]}
    for pattern, output in (
        ("in/**/*.png", tmp_path / "in" / "out"),
        ("in/*/*.png", tmp_path / "in" / "out"),
    ):
        with pytest.raises(ConfigError, match=r"would list what the job writes under --output .*in/out"):
            write_listing_job(tmp_path / "job", pattern, {**spec, "output": str(output)}, None)
    # Beside the listing, or where no pattern level reaches, is fine.
    for pattern, output in (("in/**/*.png", tmp_path / "out"), ("in/*.png", tmp_path / "in" / "out")):
        write_listing_job(tmp_path / "job", pattern, {**spec, "output": str(output)}, None)
    with pytest.raises(ConfigError, match="would list what the job writes"):
        write_listing_job(tmp_path / "job", "s3://b/in/**/*.png", {**spec, "output": "s3://b/in/out"}, None)


def test_listing_with_no_match_and_odd_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="matches no image"):
        write_listing_job(tmp_path / "job", str(tmp_path / "*.png"), {}, None)
    taken: set[str] = set()
    assert item_id_for("s3://b/in/My Photo (1).JPG", taken) == "My-Photo-1"
    assert item_id_for("s3://b/other/My Photo (1).JPG", taken) == "My-Photo-1-2"
    assert item_id_for("s3://b/in/...png", taken) == "item"


def test_listed_file_names_always_give_valid_item_ids(tmp_path: Path) -> None:
    names = ["_DSC0001.JPG", "photo..final.png", "dataset.png", "results.jsonl.png", "-x.png", "a.png"]
    for name in names:
        write_image(tmp_path / "in" / name)
    spec = {"version": 1, "name": "listing", "output": str(tmp_path / "out"), "stages": [{"type": "resize"}]}
    path, count = write_listing_job(tmp_path / "job", str(tmp_path / "in" / "*"), spec, None)
    _job, parts = validated_parts(path, REGISTRY)  # a SpecError for the first four names before
    ids = sorted(item.id for part in parts for item in part)
    assert (count, ids) == (6, sorted(["DSC0001", "photo.final", "dataset-2", "results.jsonl-2", "x", "a"]))


TREE = ("a.png", "b.jpg", "notes.txt", ".hidden.png", "sub/deep.png", "sub/x/y.png", ".cache/c.png")


def put_tree(bucket: str, root: Path) -> None:
    """The same files in the bucket under in/ and on disk under root/in/ (listing reads no pixels)."""
    s3 = boto3.client("s3")
    for name in TREE:
        (root / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "in" / name).write_bytes(name.encode())
        s3.put_object(Bucket=bucket, Key=f"in/{name}", Body=name.encode())


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("in/*.png", ["a.png"]),
        ("in/*", ["a.png", "b.jpg"]),
        ("in/*/*.png", ["sub/deep.png"]),
        ("in/**/*.png", ["a.png", "sub/deep.png", "sub/x/y.png"]),
        ("in/**", ["a.png", "b.jpg", "sub/deep.png", "sub/x/y.png"]),
        ("in/s?b/**/y.png", ["sub/x/y.png"]),
        ("in/[ab].*", ["a.png", "b.jpg"]),
        ("in/.*.png", [".hidden.png"]),
        ("in/.cache/*.png", [".cache/c.png"]),
    ],
)
def test_a_pattern_means_the_same_on_s3_and_local_files(
    tmp_path: Path, s3_bucket: str, pattern: str, expected: list[str]
) -> None:
    """`*` stays within one level on S3 as it does in a local glob; `**` crosses levels."""
    put_tree(s3_bucket, tmp_path)
    on_s3 = list(list_images(f"s3://{s3_bucket}/{pattern}"))
    local = list(list_images(f"{tmp_path}/{pattern}"))
    assert on_s3 == [f"s3://{s3_bucket}/in/{name}" for name in expected]
    assert local == [str(tmp_path.resolve() / "in" / name) for name in expected]


@pytest.fixture
def fresh_s3_client() -> Iterator[None]:
    """storage's client built anew for the test, and again after it, as the environment changes."""
    forget_s3_clients()
    yield
    forget_s3_clients()


def test_s3_listings_use_the_storage_client(s3_bucket: str, fresh_s3_client: None) -> None:
    """Its standard retries, timeouts and checksum settings, not a plain client's legacy retries."""
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="in/a.png", Body=b"x")
    assert list(list_images(f"s3://{s3_bucket}/in/*.png")) == [f"s3://{s3_bucket}/in/a.png"]
    assert s3_clients_built() == 1


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("s3:///in/*.png", "needs a bucket"),
        ("file:///in/*.png", "a listing is s3://bucket/prefix/"),
        ("in/a**/*.png", r"`\*\*` must be a whole path level"),
    ],
)
def test_a_bad_listing_pattern_is_one_error(tmp_path: Path, pattern: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        write_listing_job(tmp_path / "job", pattern, {}, None)


def test_the_storage_client_retries_in_standard_mode_as_often_as_the_operator_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_s3_client: None
) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    assert retries() == {"mode": "standard", "total_max_attempts": 9}
    forget_s3_clients()
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert retries() == {"mode": "standard", "total_max_attempts": 2}


def retries() -> object:
    """The retry settings botocore computed for storage's client (not in the Config stubs)."""
    return vars(s3_client().meta.config)["retries"]
