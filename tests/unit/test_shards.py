"""Input shards indexed at submit and read back with ranged reads; the output shard's lease."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import jobstate.storage
import workers.samples
from jobs.embedded import EmbeddedRedis
from jobs.shards import index_parquet, index_tar, item_id, shard_uris
from jobstate.layout import shard_name
from jobstate.store import JobStore
from schemas.errors import ConfigError, InputImageError, InputShardError
from schemas.job import Sample, SampleFields
from schemas.settings import Settings
from workers.samples import SampleReader


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_brace_ranges_and_patterns_name_shards_in_order(tmp_path: Path) -> None:
    for name in ("a-1.tar", "a-2.tar", "b.parquet", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert shard_uris("{00008..00011}.tar", tmp_path) == [
        str(tmp_path / f"{n:05d}.tar") for n in range(8, 12)
    ]
    assert shard_uris("a-*.tar", tmp_path) == [str(tmp_path / "a-1.tar"), str(tmp_path / "a-2.tar")]
    assert shard_uris("s3://b/x/{0..1}.tar", tmp_path) == ["s3://b/x/0.tar", "s3://b/x/1.tar"]
    with pytest.raises(ConfigError, match="matches no"):
        shard_uris("c-*.tar", tmp_path)


def test_sample_keys_become_ids_or_derive_them_deterministically() -> None:
    assert item_id("000123456") == "000123456"
    derived = item_id("train/cat.v2")
    assert derived == item_id("train/cat.v2") and derived.startswith("train-cat-v2-") and "." not in derived
    assert item_id("results.jsonl") != "results.jsonl"
    assert item_id("a/b") != item_id("a_b")


def test_a_tar_is_indexed_by_member_offsets_that_read_back_its_bytes(tmp_path: Path) -> None:
    image = bytes(range(256)) * 5
    path = write_tar(
        tmp_path / "00000.tar",
        [
            ("k1.jpg", image),
            ("k1.txt", b" a fox "),
            ("k1.json", json.dumps({"url": "u1", "caption": "ignored"}).encode()),
            ("k2.png", b"second"),
            ("k2.cls", b"7"),
            ("k3.txt", b"no image"),
        ],
    )
    index = index_tar(str(path), SampleFields())
    assert index.error is None
    first, second, third = index.rows
    assert (first["id"], first["prompt"], first["metadata"]) == (
        "k1",
        "a fox",
        {"url": "u1", "caption": "ignored"},
    )
    sample = Sample.model_validate(first["sample"])
    with path.open("rb") as handle:
        handle.seek(sample.offset or 0)
        assert handle.read(sample.size or 0) == image
    assert second["metadata"] == {"cls": "7"} and "prompt" not in second
    assert "no image member" in third["sample"]["error"]

    captions = index_tar(str(path), SampleFields(caption="json.url"))
    assert captions.rows[0]["prompt"] == "u1"


def test_a_truncated_tar_keeps_the_samples_before_its_cut_and_says_why(tmp_path: Path) -> None:
    whole = write_tar(tmp_path / "whole.tar", [(f"k{i}.jpg", b"x" * 3000) for i in range(3)]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[:5000])
    index = index_tar(str(tmp_path / "cut.tar"), SampleFields())
    assert [row["id"] for row in index.rows] == ["k0"]
    assert index.error == "not a readable tar: truncated (it ends inside a member)"
    assert index_tar(str(tmp_path / "absent.tar"), SampleFields()).error == "No such file or directory"


def test_parquet_rows_are_indexed_by_row_group_without_their_images(tmp_path: Path) -> None:
    table = pa.table(
        {
            "image": [{"bytes": f"img{i}".encode(), "path": None} for i in range(5)],
            "caption": [f"c{i}" for i in range(5)],
            "key": [f"k/{i}" for i in range(5)],
            "score": [0.5] * 5,
        }
    )
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    index = index_parquet(str(tmp_path / "d.parquet"), SampleFields())
    assert index.error is None
    assert [(r["sample"]["row_group"], r["sample"]["row"]) for r in index.rows] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (2, 0),
    ]
    assert (index.rows[3]["key"], index.rows[3]["prompt"], index.rows[3]["metadata"]) == (
        "k/3",
        "c3",
        {"score": 0.5},
    )
    samples = [Sample.model_validate(row["sample"]) for row in index.rows]
    reader = SampleReader(samples, Settings(), None)
    assert [reader.read(sample) for sample in samples] == [f"img{i}".encode() for i in range(5)]
    assert index_parquet(str(tmp_path / "d.parquet"), SampleFields(image="caption")).error is not None


def test_a_chunk_reads_nearby_members_in_one_ranged_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    members = [(f"k{i:03d}.jpg", bytes([i]) * 700) for i in range(50)]
    path = write_tar(tmp_path / "s.tar", members)
    samples = [Sample.model_validate(row["sample"]) for row in index_tar(str(path), SampleFields()).rows]
    reads: list[tuple[int, int]] = []
    real = jobstate.storage.read_range

    def counted(uri: str, start: int, stop: int, version: str | None) -> bytes:
        reads.append((start, stop))
        return real(uri, start, stop, version)

    monkeypatch.setattr(workers.samples, "read_range", counted)
    reader = SampleReader(samples, Settings(), None)
    assert [reader.read(sample) for sample in samples] == [data for _, data in members]
    assert len(reads) == 1
    monkeypatch.setattr(workers.samples, "SPAN_BYTES", 10_000)
    reads.clear()
    reader = SampleReader(samples, Settings(), None)
    assert [reader.read(sample) for sample in samples] == [data for _, data in members]
    assert len(reads) == 8  # spans of at most 10,000 bytes: 7 members (1,536 bytes with their headers)

    limited = SampleReader(samples[:1], Settings(max_image_bytes=1024), None)
    with pytest.raises(InputImageError, match="larger than the 1024-byte limit"):
        limited.read(samples[0].model_copy(update={"size": 2048}))


def test_a_shard_changed_or_cut_since_submit_fails_its_items(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "s.tar", [("k0.jpg", b"a" * 2000), ("k1.jpg", b"b" * 2000)])
    samples = [Sample.model_validate(row["sample"]) for row in index_tar(str(path), SampleFields()).rows]
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(InputShardError, match="changed since it was indexed"):
        SampleReader(samples, Settings(), None).read(samples[0])
    unversioned = [sample.model_copy(update={"version": None}) for sample in samples]
    with pytest.raises(InputShardError, match="truncated"):
        SampleReader(unversioned, Settings(), None).read(unversioned[1])


def test_writers_of_one_shard_take_turns(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis") as server:
        import redis

        store = JobStore(redis.Redis.from_url(server.url, decode_responses=True))
        assert store.take_shard("job", 3, "first", ttl_s=30)
        assert not store.take_shard("job", 3, "second", ttl_s=30)
        assert store.take_shard("job", 4, "second", ttl_s=30)  # another shard
        assert store.keep_shard("job", 3, "first", ttl_s=30)
        assert not store.drop_shard("job", 3, "second")
        assert store.drop_shard("job", 3, "first")
        assert store.take_shard("job", 3, "second", ttl_s=0.05)
        import time

        time.sleep(0.1)  # a writer that died: its lease lapses
        assert not store.keep_shard("job", 3, "second", ttl_s=30)
        assert store.take_shard("job", 3, "third", ttl_s=30)


def test_shard_names_sort_in_part_order() -> None:
    assert [shard_name(part, 12) for part in (0, 11)] == ["00000", "00011"]
    assert shard_name(7, 200_000) == "000007"
