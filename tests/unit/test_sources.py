"""Bulk item sources: Parquet manifests and jobs built from a listing."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.manifest import validate_job
from jobs.registry import Registry
from jobs.sources import item_id_for, list_images, write_listing_job
from schemas.errors import ConfigError, SpecError
from tests.helpers import validated_parts, write_image, write_job

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
