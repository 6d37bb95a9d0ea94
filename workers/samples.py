"""Reading a chunk's inputs that live in input shards (jobs/shards.py indexed them at submit): never
whole shards, and not one request per item either.

The chunk's samples are planned together before its first call: a tar's members that lie close
together are read as one span, one ranged read (S3: a GET with a Range and If-Match on the ETag
seen at submit; locally a seek), of at most SPAN_BYTES; a Parquet sample's row group is read once,
its image column only (pyarrow reads the column chunk's byte range). A span is read when its first
item is loaded and dropped once its last item has taken its bytes, so a worker holds a few spans at a
time, not the chunk.

A member over the byte limit fails before any read; a shard gone, rewritten or shorter than its index
since submit fails the items read from it (InputShardError), each with the shard's reason; a read
that may pass (StorageError) leaves the item to the chunk's retry, as any input.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobstate.storage import SHARD_CHANGED, RangedFile, read_range, shard_size_and_version
from schemas.errors import InputImageError, InputShardError
from schemas.job import Sample
from schemas.settings import LocalRoots, Settings

SPAN_BYTES = 16 * 2**20  # at most this much of a tar is read at once
GAP_BYTES = 256 * 2**10  # members this close are read together: cheaper than another request


@dataclass
class _Span:
    """Bytes one read brings: a tar's range [start, stop), or a Parquet row group's image column."""

    shard: str
    version: str | None
    start: int = 0
    stop: int = 0
    row_group: int | None = None
    column: str | None = None
    users: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    data: Any = None
    error: Exception | None = None


def _tar_key(sample: Sample) -> tuple[str, int]:
    return sample.shard, sample.offset or 0


def _parquet_key(sample: Sample) -> tuple[str, int, str]:
    return sample.shard, sample.row_group or 0, sample.member


class SampleReader:
    """The bytes of a chunk's samples, a span at a time (thread-safe: the engine's I/O threads)."""

    def __init__(self, samples: Sequence[Sample], settings: Settings, roots: LocalRoots | None) -> None:
        self.settings = settings
        self.roots = roots
        self._tar: dict[tuple[str, int], _Span] = {}
        self._parquet: dict[tuple[str, int, str], _Span] = {}
        self._files: dict[str, Any] = {}
        self._files_lock = threading.Lock()
        self._plan([s for s in samples if s.error is None])

    def _plan(self, samples: list[Sample]) -> None:
        limit = self.settings.max_image_bytes
        members = sorted(
            (s for s in samples if s.offset is not None and (s.size or 0) <= limit), key=_tar_key
        )
        span: _Span | None = None
        for sample in members:
            start, stop = sample.offset or 0, (sample.offset or 0) + (sample.size or 0)
            if (
                span is None
                or span.shard != sample.shard
                or start - span.stop > GAP_BYTES
                or stop - span.start > SPAN_BYTES
            ):
                span = _Span(sample.shard, sample.version, start, stop)
            span.stop = max(span.stop, stop)
            span.users += 1
            self._tar[_tar_key(sample)] = span
        for sample in samples:
            if sample.row_group is not None:
                key = _parquet_key(sample)
                span = self._parquet.setdefault(
                    key, _Span(sample.shard, sample.version, row_group=sample.row_group, column=sample.member)
                )
                span.users += 1

    def read(self, sample: Sample) -> bytes:
        """The sample's image bytes."""
        if sample.error is not None:
            raise InputShardError(sample.error)
        if not sample.shard.startswith("s3://") and self.roots is not None:
            self.roots.check(sample.shard, Path(sample.shard))
        if sample.offset is not None:
            if (sample.size or 0) > self.settings.max_image_bytes:
                limit = self.settings.max_image_bytes
                raise InputImageError(f"{sample.shard}#{sample.member}: larger than the {limit}-byte limit")
            span = self._tar[_tar_key(sample)]
            data = self._take(span, self._read_tar)
            begin = (sample.offset or 0) - span.start
            return bytes(data[begin : begin + (sample.size or 0)])
        span = self._parquet[_parquet_key(sample)]
        values = self._take(span, self._read_row_group)
        value = values[sample.row or 0] if (sample.row or 0) < len(values) else None
        if isinstance(value, dict):  # a Hugging Face Image feature: {bytes, path}
            value = value.get("bytes")
        if not value:
            raise InputImageError(
                f"{sample.shard}: row {sample.row} of row group {sample.row_group}: no image bytes"
            )
        if len(value) > self.settings.max_image_bytes:
            raise InputImageError(
                f"{sample.shard}: row {sample.row} of row group {sample.row_group}: larger than the "
                f"{self.settings.max_image_bytes}-byte limit"
            )
        return bytes(value)

    def _take(self, span: _Span, fetch: Any) -> Any:
        """The span's data, read by its first user; dropped after its last."""
        with span.lock:
            if span.data is None and span.error is None:
                try:
                    span.data = fetch(span)
                except Exception as exc:
                    span.error = exc
            data, error = span.data, span.error
            span.users -= 1
            if span.users <= 0:
                span.data = None
        if error is not None:
            raise error
        return data

    def _read_tar(self, span: _Span) -> bytes:
        return read_range(span.shard, span.start, span.stop, span.version)

    def _parquet_file(self, span: _Span) -> Any:
        import pyarrow.parquet as pq

        with self._files_lock:
            opened = self._files.get(span.shard)
            if opened is None:
                size, version = shard_size_and_version(span.shard)
                if span.version and version != span.version:
                    raise InputShardError(f"{span.shard}: {SHARD_CHANGED}")
                source = (
                    RangedFile(span.shard, size, span.version)
                    if span.shard.startswith("s3://")
                    else span.shard
                )
                opened = self._files[span.shard] = pq.ParquetFile(source)
            return opened

    def _read_row_group(self, span: _Span) -> list[Any]:
        import pyarrow as pa

        try:
            parquet = self._parquet_file(span)
            table = parquet.read_row_group(span.row_group, columns=[span.column])
        except (pa.ArrowException, OSError) as exc:
            raise InputShardError(
                f"{span.shard}: row group {span.row_group}: cannot be read: {exc}"
            ) from None
        values: list[Any] = table.column(0).to_pylist()
        return values
