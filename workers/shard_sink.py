"""Writing a job's outputs as shards (`output_format: webdataset` or `parquet`): one shard per part
of the job, a fixed range of items (positions part * shard_size onwards; the job's chunks are
`shard_size` items for this), in img2dataset's layout under the job's prefix (jobstate/layout.py):

    {output}/{job_id}/shards/{shard}.tar           webdataset: {id}.png (or .jpg, .webp), {id}.txt
                                                   (the caption), {id}.json (key, caption, seed,
                                                   parameters, stages, the sample's metadata)
    {output}/{job_id}/shards/{shard}.parquet       webdataset: the shard's index, a row per item,
                                                   failed ones with their reason; parquet: the shard
                                                   itself, images as a Hugging Face Image feature
    {output}/{job_id}/shards/{shard}_stats.json    counts by status; written last: a shard without
                                                   it is not complete

Exactly once, with chunks delivered at least once:

- The last stage's images go to a spool on the worker's disk, not to storage (ShardSpool), and its
  finished items are held, not recorded (ShardSink). When the run ends, the shard is written whole:
  its stats file is deleted, the shard and its index are uploaded (boto3's managed upload: multipart
  past 8 MB, and S3 shows an object only once its upload completes, so a cut-off upload never
  replaces a shard; locally a temporary file renamed over it), then the stats file. Only then are
  the items recorded (results part, then done in Redis). A worker killed anywhere before leaves its
  items open: the chunk's redelivery runs them again and rewrites the shard whole; a shard whose
  stats file is missing is one being rewritten.
- A shard holds the latest outcome of every item of its range that has finished. A run of only some
  of them (`imgjobs retry` of a few items, a chunk retried for the items a storage outage left, a
  later stage's chunk handed only part of the range) copies the others from the published shard and
  its index, and rewrites the shard whole: only the shards holding the items run are written.
- Such a rewrite reads the shard before and publishes after, so two runs of one shard's items at once
  (two retries, a redelivery racing its first delivery) would lose one's outcomes: writers take a
  lease on the shard in Redis (jobstate) and take turns. A writer renews it while it writes and checks
  it between its steps; one that finds it lost records nothing and retries (its items stay open).

Memory is bounded by one call's images and one shard's index rows; the spool and the shard being
written lie on the worker's disk (one shard at a time), and the previous shard is read from there.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from jobstate.layout import ShardKeys, shard_name
from jobstate.meta import JobMeta
from jobstate.storage import Storage
from jobstate.store import JobStore
from schemas.errors import StorageError
from schemas.messages import SCORE_COLUMNS, Chunk, ItemResult, score_columns
from workers.engine import WorkItem
from workers.recording import ChunkRecorder

log = logging.getLogger(__name__)

LEASE_TTL_S = 120.0  # a writer renews it while it writes; a dead writer's lapses after this
LEASE_WAIT_S = 300.0  # how long a writer waits for another to finish the same shard
ROW_GROUP_ROWS = 100  # Parquet rows per row group: what the datasets library writes for images
SUCCESS, FAILED = "success", "failed"  # img2dataset's status words


class ShardSpool:
    """The last stage's encoded images of one run, appended to a file on the worker's disk until the
    shard is written (thread-safe: the engine writes from its I/O threads)."""

    def __init__(self, folder: Path, shard_uri: str, output_format: str) -> None:
        self.path = folder / "spool.bin"
        self.shard_uri = shard_uri
        self.output_format = output_format
        self._file = self.path.open("w+b")
        self._lock = threading.Lock()
        self._where: dict[str, tuple[int, int, str]] = {}  # item id -> offset, size, image format

    def add(self, item_id: str, image_format: str, data: bytes) -> str:
        with self._lock:
            self._file.seek(0, io.SEEK_END)
            self._where[item_id] = (self._file.tell(), len(data), image_format)
            self._file.write(data)
        member = f"{item_id}.{_extension(image_format)}" if self.output_format == "webdataset" else item_id
        return f"{self.shard_uri}#{member}"

    def image(self, item_id: str) -> tuple[bytes, str] | None:
        with self._lock:
            where = self._where.get(item_id)
            if where is None:
                return None
            offset, size, image_format = where
            self._file.flush()
            self._file.seek(offset)
            return self._file.read(size), image_format

    def close(self) -> None:
        self._file.close()


def _extension(image_format: str) -> str:
    return "jpg" if image_format == "jpeg" else image_format


def _size_of(data: bytes) -> tuple[int | None, int | None]:
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            return image.size
    except Exception:
        return None, None


def _row(work: WorkItem, result: ItemResult, image: tuple[bytes, str] | None) -> dict[str, Any]:
    """A shard's index row for an item this run finished (the image is not part of it)."""
    item = work.member.item
    failed = result.status == "failed" or image is None
    width, height = _size_of(image[0]) if image is not None else (None, None)
    return {
        "position": work.position,
        "id": item.id,
        "key": item.key or item.id,
        "status": FAILED if failed else SUCCESS,
        "error_type": result.error.type if result.error else (None if not failed else "StageError"),
        "error_message": result.error.message
        if result.error
        else (None if not failed else "no image written"),
        "caption": result.prompt or None,
        "seed": result.seed,
        "width": width,
        "height": height,
        "source": item.image,
        "format": _extension(image[1]) if image is not None and not failed else None,
        "params": result.params.model_dump_json(exclude_none=True),
        "stages": json.dumps(
            [
                {"name": s.name, "model": s.model, **s.params.model_dump(exclude_none=True)}
                for s in result.stages
            ]
        ),
        "metadata": json.dumps(item.metadata) if item.metadata else None,
        # The scores of a scored stage, null elsewhere: a dataset filtered by them reads no image.
        **dict.fromkeys(SCORE_COLUMNS) | score_columns(result.quality),
    }


def _schema(with_image: bool) -> Any:
    import pyarrow as pa

    fields = [
        pa.field("position", pa.int64()),
        pa.field("id", pa.string()),
        pa.field("key", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("source", pa.string()),
        pa.field("format", pa.string()),
        pa.field("params", pa.string()),
        pa.field("stages", pa.string()),
        pa.field("metadata", pa.string()),
        pa.field("clip_score", pa.float64()),
        pa.field("input_similarity", pa.float64()),
        pa.field("phash", pa.string()),
        pa.field("low_score", pa.bool_()),
        pa.field("score_seed", pa.int64()),
    ]
    if not with_image:
        return pa.schema(fields)
    image = pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())]))
    # The `datasets` library reads its features from this key of the schema's metadata: with it,
    # load_dataset("parquet", ...) decodes `image` as an Image feature.
    features = {"image": {"_type": "Image"}}
    for one in fields:
        dtype = {"int64": "int64", "string": "string", "double": "float64", "bool": "bool"}[str(one.type)]
        features[one.name] = {"dtype": dtype, "_type": "Value"}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return pa.schema([image, *fields], metadata=metadata)


def _record(row: dict[str, Any]) -> bytes:
    """A webdataset sample's {id}.json: what the index row says, its JSON fields as JSON."""
    record = {name: value for name, value in row.items() if name not in ("position", "format")}
    for name in ("params", "stages", "metadata"):
        if record.get(name):
            record[name] = json.loads(record[name])
    return json.dumps(record).encode()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes one shard whole from the outcomes of this run and those the published shard holds."""

    def __init__(self, storage: Storage, keys: ShardKeys, folder: Path, keep: Callable[[], None]) -> None:
        self.storage = storage
        self.keys = keys
        self.folder = folder
        self.keep = keep  # raises once the shard's lease is lost

    def _previous_rows(self) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        local = self.folder / "previous-index.parquet"
        if not self.storage.get_file(self.keys.index, local):
            return []
        columns = [name for name in pq.read_schema(local).names if name != "image"]
        rows: list[dict[str, Any]] = pq.read_table(local, columns=columns).to_pylist()
        return rows

    def write(
        self, new: Sequence[dict[str, Any]], images: Callable[[str], tuple[bytes, str] | None]
    ) -> dict[str, Any]:
        """Publish the shard with `new` rows (this run's items, whose images `images` gives) and the
        published shard's rows of other items; returns its stats."""
        mine = {row["id"] for row in new}
        kept = [row for row in self._previous_rows() if row["id"] not in mine]
        rows = sorted([*kept, *new], key=lambda row: row["position"])
        self.keep()
        self.storage.delete(self.keys.stats)  # from here until the stats are back, the shard is not complete
        kept_images = {row["id"] for row in kept if row["status"] == SUCCESS}
        if self.keys.output_format == "webdataset":
            self._write_tar(rows, kept_images, images)
        else:
            self._write_parquet(rows, kept_images, images)
        self.keep()
        by_status: dict[str, int] = {}
        for row in rows:
            status = SUCCESS if row["status"] == SUCCESS else str(row["error_type"])
            by_status[status] = by_status.get(status, 0) + 1
        stats = {
            "shard": self.keys.name,
            "count": len(rows),
            "successes": sum(1 for row in rows if row["status"] == SUCCESS),
            "failed": sum(1 for row in rows if row["status"] != SUCCESS),
            "status_dict": by_status,
            "first_position": rows[0]["position"] if rows else None,
            "last_position": rows[-1]["position"] if rows else None,
            "written_at": time.time(),
        }
        self.storage.put(self.keys.stats, json.dumps(stats, indent=1).encode(), "application/json")
        return stats

    def _write_tar(
        self, rows: list[dict[str, Any]], kept: set[str], images: Callable[[str], tuple[bytes, str] | None]
    ) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        previous: tarfile.TarFile | None = None
        members: dict[str, tarfile.TarInfo] = {}
        if kept:
            local = self.folder / "previous.tar"
            if self.storage.get_file(self.keys.shard, local):
                previous = tarfile.open(local, "r:")  # noqa: SIM115 (closed below)
                members = {info.name: info for info in previous.getmembers()}
        path = self.folder / "shard.tar"
        now = time.time()
        try:
            with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
                for row in rows:
                    if row["status"] != SUCCESS:
                        continue
                    name = f"{row['id']}.{row['format']}"
                    if row["id"] in kept:
                        info = members.get(name)
                        handle = previous.extractfile(info) if previous is not None and info else None
                        if handle is None:
                            row.update(
                                status=FAILED,
                                error_type="StorageError",
                                error_message=f"{name} is missing from the shard it was written to",
                            )
                            continue
                        data = handle.read()
                    else:
                        found = images(row["id"])
                        if found is None:
                            continue
                        data = found[0]
                    _add_member(tar, name, data, now)
                    if row["caption"]:
                        _add_member(tar, f"{row['id']}.txt", row["caption"].encode(), now)
                    _add_member(tar, f"{row['id']}.json", _record(row), now)
        finally:
            if previous is not None:
                previous.close()
        self.storage.put_file(self.keys.shard, path, "application/x-tar")
        self.keep()
        index = self.folder / "index.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=_schema(with_image=False)), index)
        self.storage.put_file(self.keys.index, index, "application/vnd.apache.parquet")

    def _write_parquet(
        self, rows: list[dict[str, Any]], kept: set[str], images: Callable[[str], tuple[bytes, str] | None]
    ) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        previous: dict[str, Any] = {}
        if kept:
            local = self.folder / "previous.parquet"
            if self.storage.get_file(self.keys.shard, local):
                table = pq.read_table(local, columns=["id", "image"], memory_map=True)
                previous = {
                    item_id: image
                    for item_id, image in zip(
                        table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True
                    )
                    if item_id in kept
                }
        schema = _schema(with_image=True)
        path = self.folder / "shard.parquet"
        with pq.ParquetWriter(path, schema) as writer:
            for start in range(0, len(rows), ROW_GROUP_ROWS):
                batch = []
                for row in rows[start : start + ROW_GROUP_ROWS]:
                    image = None
                    if row["status"] == SUCCESS:
                        if row["id"] in kept:
                            image = previous.get(row["id"])
                        else:
                            found = images(row["id"])
                            image = (
                                {"bytes": found[0], "path": f"{row['id']}.{row['format']}"} if found else None
                            )
                        if image is None:
                            row.update(
                                status=FAILED,
                                error_type="StorageError",
                                error_message="its image is missing from the shard it was written to",
                            )
                    batch.append({**row, "image": image})
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        self.storage.put_file(self.keys.shard, path, "application/vnd.apache.parquet")


class _Lease:
    """A shard's lease, renewed by a thread every third of its time to live while the shard is
    written (an upload of a large shard may take longer than that); check() raises once it is lost."""

    def __init__(self, store: JobStore, job_id: str, part: int, token: str, name: str) -> None:
        self.store, self.job_id, self.part, self.token, self.name = store, job_id, part, token, name
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="imgjobs-shard-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_TTL_S / 3):
            try:
                kept = self.store.keep_shard(self.job_id, self.part, self.token, LEASE_TTL_S)
            except Exception:  # Redis away for a moment: the next renewal, or check(), tells
                log.warning("shard %s: could not renew its lease", self.name, exc_info=True)
                continue
            if not kept:
                self.lost = True
                return

    def check(self) -> None:
        if self.lost or not self.store.keep_shard(self.job_id, self.part, self.token, LEASE_TTL_S):
            self.lost = True
            raise StorageError(f"shard {self.name}: lost its lease while writing it; the chunk runs again")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class ShardSink:
    """The engine's Sink for the last stage of a job that writes shards: holds the finished items
    until their shard is published, then hands them to the ChunkRecorder (see the module's doc)."""

    def __init__(
        self, recorder: ChunkRecorder, store: JobStore, storage: Storage, meta: JobMeta, chunk: Chunk
    ) -> None:
        self.recorder = recorder
        self.store = store
        self.storage = storage
        self.meta = meta
        self.chunk = chunk
        self.keys = ShardKeys(shard_name(chunk.part, meta.parts), meta.spec.output_format)
        self._folder = tempfile.TemporaryDirectory(prefix="imgjobs-shard-")
        self.folder = Path(self._folder.name)
        self.spool = ShardSpool(self.folder, storage.uri(self.keys.shard), meta.spec.output_format)
        self.held: dict[int, tuple[WorkItem, ItemResult]] = {}

    # -- as the ChunkRecorder

    def expect(self, items: Sequence[WorkItem]) -> None:
        self.recorder.expect(items)

    def finished(self, done: Sequence[tuple[WorkItem, ItemResult]]) -> None:
        for work, result in done:
            self.held[work.slot] = (work, result)

    def handed_over(self, handed: Sequence[tuple[WorkItem, Any]]) -> None:
        raise AssertionError("the last stage hands nothing over")

    def should_stop(self) -> bool:
        return self.recorder.should_stop()

    def close(self) -> None:
        """Publish the shard with what this run finished, then record it."""
        self._publish()

    def fail_open(self, result_of: Callable[[WorkItem], ItemResult]) -> None:
        """Fail every item of this run not recorded yet: in the shard if it can still be written,
        else (storage refusing) recorded without it, so that the items still end."""
        for slot, work in self.recorder.open.items():
            if slot not in self.held:
                self.held[slot] = (work, result_of(work))
        try:
            self._publish()
        except StorageError as exc:
            log.error("chunk %s: shard %s not written: %s", self.chunk.chunk_id, self.keys.name, exc)
            self.held.clear()
            self.recorder.fail_open(result_of)

    # -- the shard

    def _publish(self) -> None:
        if not self.held:
            return
        done = [self.held[slot] for slot in sorted(self.held)]
        rows = [
            _row(work, result, self.spool.image(work.member.item.id) if result.status != "failed" else None)
            for work, result in done
        ]
        token = secrets.token_hex(8)
        self._take_lease(token)
        lease = _Lease(self.store, self.meta.job_id, self.chunk.part, token, self.keys.name)
        try:
            stats = ShardWriter(self.storage, self.keys, self.folder, lease.check).write(
                rows, self.spool.image
            )
            lease.check()
            self.recorder.finished(done)
            self.held.clear()
            log.info(
                "chunk %s: shard %s written: %d item(s), %d succeeded",
                self.chunk.chunk_id,
                self.keys.name,
                stats["count"],
                stats["successes"],
            )
        finally:
            lease.stop()
            self.store.drop_shard(self.meta.job_id, self.chunk.part, token)

    def _take_lease(self, token: str) -> None:
        deadline = time.monotonic() + LEASE_WAIT_S
        while not self.store.take_shard(self.meta.job_id, self.chunk.part, token, LEASE_TTL_S):
            if time.monotonic() > deadline:
                raise StorageError(f"shard {self.keys.name}: another worker has been writing it for too long")
            time.sleep(0.2)
