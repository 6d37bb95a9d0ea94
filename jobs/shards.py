"""Input shards: a job's `items` may name WebDataset tars or Parquet image datasets instead of a
manifest, local or s3://, with brace ranges as webdataset writes them and patterns as `submit
--from` reads them:

    items: s3://bucket/laion/{00000..00999}.tar
    items: data/train-*.parquet

Each sample becomes an item: its key is the item id (or an id derived from it, deterministically,
where the key is not a valid id: the item keeps the key), its caption the prompt, its other fields
the item's metadata, carried to the output. Submit indexes every shard once, in the pass that
validates the job, so that workers read only their items' bytes with ranged reads:

- a tar is read through once as a stream, and each sample's image member is recorded by its data
  offset and size (the headers sit between the members, so a tar cannot be indexed without reading
  it; on S3 that is one GET per shard). Captions (`.txt`) and metadata (`.json`, other small text
  members) are read on the way, so workers never fetch them.
- a Parquet file's footer says where its row groups are: its key, caption and metadata columns are
  read, never its image column, and each sample is recorded by row group and row.

A shard that cannot be opened, or breaks off part-way (truncated, a corrupt header), is reported by
`validate`, one line each. Submitted anyway, the samples indexed before the break become items that
fail with the shard's reason; a shard with none adds nothing, and submit says so.

Why the standard tarfile and pyarrow: tarfile's stream mode gives each member's data offset and
size in one sequential read, which is the index; the `webdataset` library reads shards only as
whole streams (its indexed `wids` reader downloads whole shards to a local cache) and would bring
torch into the producer. pyarrow is already a dependency and reads Parquet row groups by range.
`braceexpand` is the expansion webdataset itself uses, so a pattern means what it means there.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

from jobs.sources import WILDCARDS, list_files
from jobstate.storage import RangedFile, open_shard, shard_size_and_version
from schemas.errors import ConfigError, ImgjobsError, InputShardError
from schemas.job import ITEM_ID_PATTERN, RESERVED_ITEM_IDS, SampleFields

SHARD_SUFFIXES = (".tar", ".parquet")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "jpeg")
PARQUET_CAPTION_COLUMNS = ("caption", "text", "txt", "prompt")
PARQUET_KEY_COLUMNS = ("key", "__key__", "id")
MAX_TEXT_MEMBER = 64 * 1024  # a text member larger than this is not carried as metadata
INDEX_AHEAD = 4  # shards indexed at once, on threads: mostly waiting on storage
# A sample's key as webdataset splits a member's name: up to the first dot of its last path level.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# Output shards name their samples by item id, and webdataset ends a key at its first dot: ids
# taken from keys have none.
_PLAIN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def is_shard_source(items: str, base: Path) -> bool:
    """Whether a spec's `items` names input shards rather than a manifest: anything on S3, a tar, a
    pattern or brace range of them, or a Parquet file whose columns hold image bytes."""
    lowered = items.lower()
    if not lowered.endswith(SHARD_SUFFIXES):
        return False
    if items.startswith("s3://") or lowered.endswith(".tar") or any(c in items for c in WILDCARDS + "{"):
        return True
    import pyarrow as pa

    path = base / items
    try:
        return path.is_file() and _parquet_image_column(path, None) is not None
    except (pa.ArrowException, OSError):
        return False  # read as a manifest, whose reading says what is wrong with it


def shard_uris(items: str, base: Path) -> list[str]:
    """The shards `items` names, in the order written: brace ranges expanded, then patterns listed
    (sorted); a local path relative to `base`. A ConfigError when a name matches nothing."""
    uris: list[str] = []
    for piece in braceexpand(items):
        local = piece if piece.startswith("s3://") else str((base / piece).resolve())
        if any(c in piece for c in WILDCARDS):
            found = list(list_files(local, SHARD_SUFFIXES))
            if not found:
                raise ConfigError(f"items: {piece!r} matches no .tar or .parquet shard")
            uris += found
        elif piece.lower().endswith(SHARD_SUFFIXES):
            uris.append(local)
        else:
            raise ConfigError(f"items: {piece!r} is not a .tar or .parquet shard")
    return uris


@dataclass
class ShardIndex:
    """One shard's samples as item rows, or why it could not be indexed (whole)."""

    uri: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def item_id(key: str) -> str:
    """The item id of a sample key: the key itself where it is a plain id, else the key made safe
    with a short hash of the original, so that two keys never meet in one id."""
    if _PLAIN_ID.match(key) and key not in RESERVED_ITEM_IDS:
        return key
    safe = _UNSAFE.sub("-", key).strip("-_")[:100] or "sample"
    if not safe[0].isalnum():
        safe = f"s{safe}"
    derived = f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    assert ITEM_ID_PATTERN.match(derived)
    return derived


def _row(
    key: str, caption: str | None, metadata: dict[str, Any], sample: dict[str, Any], shard: str
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": item_id(key),
        "image": f"{shard}#{sample['member']}" if "offset" in sample else f"{shard}#{key}",
        "sample": sample,
    }
    if row["id"] != key:
        row["key"] = key
    if caption is not None:
        row["prompt"] = caption
    if metadata:
        row["metadata"] = metadata
    return row


# -- WebDataset tars


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class _TarSample:
    """The members of one sample read so far."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.images: dict[str, tuple[str, int, int]] = {}  # extension -> (member, offset, size)
        self.texts: dict[str, str] = {}

    def row(self, uri: str, version: str, fields: SampleFields) -> dict[str, Any]:
        wanted = (fields.image or ";".join(IMAGE_EXTENSIONS)).lower().split(";")
        found = next((self.images[ext] for ext in wanted if ext in self.images), None)
        metadata: dict[str, Any] = {}
        record = self.texts.get("json")
        if record is not None:
            try:
                parsed = json.loads(record)
            except ValueError:
                parsed = record
            metadata.update(parsed if isinstance(parsed, dict) else {"json": parsed})
        caption_field = fields.caption or "txt"
        if caption_field.startswith("json."):
            value = metadata.get(caption_field.removeprefix("json."))
            caption = None if value is None else str(value)
        else:
            caption = self.texts.get(caption_field)
            if caption is None and fields.caption is None and isinstance(metadata.get("caption"), str):
                caption = metadata["caption"]
        for ext, text in self.texts.items():
            if ext not in ("json", caption_field):
                metadata[ext] = text
        sample: dict[str, Any] = {"shard": uri, "version": version}
        if found is None:
            sample["member"] = f"{self.key}.{wanted[0]}"
            sample["error"] = f"{uri}: sample {self.key!r} has no image member ({', '.join(wanted)})"
        else:
            sample["member"], sample["offset"], sample["size"] = found
        return _row(self.key, caption.strip() if caption else caption, metadata, sample, uri)


def index_tar(uri: str, fields: SampleFields) -> ShardIndex:
    """Read the tar through once: each sample's image member by offset and size, its caption and
    metadata by content. Members of a sample are consecutive and share a key, as webdataset writes."""
    index = ShardIndex(uri)
    try:
        stream, version, _size = open_shard(uri)
    except ImgjobsError as exc:
        index.error = str(exc).removeprefix(f"{uri}: ")
        return index
    current: _TarSample | None = None
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                match = _MEMBER_NAME.match(info.name)
                if match is None:
                    continue  # a name with no extension is no part of a sample
                key, ext = match.group(1), match.group(2).lower()
                if current is None or current.key != key:
                    if current is not None:
                        index.rows.append(current.row(uri, version, fields))
                    current = _TarSample(key)
                if ext in IMAGE_EXTENSIONS or (fields.image and ext in fields.image.lower().split(";")):
                    current.images[ext] = (info.name, info.offset_data, info.size)
                elif info.size <= MAX_TEXT_MEMBER:
                    member = tar.extractfile(info)
                    text = _text(member.read()) if member is not None else None
                    if text is not None:
                        current.texts[ext] = text
        if current is not None:
            index.rows.append(current.row(uri, version, fields))
    except (tarfile.TarError, EOFError, OSError) as exc:
        index.error = f"not a readable tar: {_tar_reason(exc)}"
    except ImgjobsError as exc:  # the stream broke off on S3 past boto3's retries
        index.error = str(exc)
    return index


def _tar_reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "unexpected end of data" in text or isinstance(exc, EOFError):
        return "truncated (it ends inside a member)"
    return text


# -- Parquet image datasets


def _is_image_type(kind: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    return bool(pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)


def _parquet_image_column(path: Path | RangedFile, wanted: str | None) -> str | None:
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if wanted is not None:
        return wanted if wanted in schema.names and _is_image_type(schema.field(wanted).type) else None
    names = [name for name in schema.names if _is_image_type(schema.field(name).type)]
    preferred = [name for name in PARQUET_IMAGE_COLUMNS if name in names]
    return (preferred or names or [None])[0]


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def index_parquet(uri: str, fields: SampleFields) -> ShardIndex:
    """Read the footer and every column but the image column, a row group at a time: each sample by
    row group and row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = ShardIndex(uri)
    try:
        size, version = shard_size_and_version(uri)
        source: Path | RangedFile = RangedFile(uri, size, version) if uri.startswith("s3://") else Path(uri)
        parquet = pq.ParquetFile(source)
        schema = parquet.schema_arrow
        image = _parquet_image_column(source, fields.image)
        if image is None:
            which = f"column {fields.image!r}" if fields.image else "column"
            index.error = f"no {which} of image bytes (binary, or a struct with bytes)"
            return index
        key_column = fields.key or next((name for name in PARQUET_KEY_COLUMNS if name in schema.names), None)
        caption = fields.caption or next((n for n in PARQUET_CAPTION_COLUMNS if n in schema.names), None)
        for name, role in ((key_column, "samples.key"), (caption, "samples.caption")):
            if name is not None and name not in schema.names:
                index.error = f"{role}: no column {name!r}"
                return index
        carried = [
            name for name in schema.names if name != image and not _is_image_type(schema.field(name).type)
        ]
        stem = _UNSAFE.sub("-", Path(uri.rsplit("/", 1)[-1]).stem)
        position = 0
        for group in range(parquet.num_row_groups):
            rows = parquet.read_row_group(group, columns=carried).to_pylist() if carried else None
            for row_index in range(parquet.metadata.row_group(group).num_rows):
                row = rows[row_index] if rows is not None else {}
                key = row.get(key_column) if key_column else None
                key = str(key) if key is not None else f"{stem}-{position:06d}"
                text = row.get(caption) if caption else None
                metadata = {
                    name: _json_safe(value)
                    for name, value in row.items()
                    if name not in (key_column, caption)
                }
                sample = {
                    "shard": uri,
                    "member": image,
                    "row_group": group,
                    "row": row_index,
                    "version": version,
                }
                index.rows.append(_row(key, None if text is None else str(text), metadata, sample, uri))
                position += 1
    except (pa.ArrowException, OSError, ValueError) as exc:
        index.error = f"not a readable Parquet file: {exc}"
    except InputShardError as exc:
        index.error = str(exc).removeprefix(f"{uri}: ")
    except ImgjobsError as exc:
        index.error = str(exc)
    return index


def index_shard(uri: str, fields: SampleFields) -> ShardIndex:
    return index_parquet(uri, fields) if uri.lower().endswith(".parquet") else index_tar(uri, fields)


def indexed(uris: list[str], fields: SampleFields) -> Iterator[ShardIndex]:
    """Each shard's index, in order; up to INDEX_AHEAD shards are read at once."""
    with ThreadPoolExecutor(INDEX_AHEAD, thread_name_prefix="imgjobs-index") as pool:
        pending: deque[Future[ShardIndex]] = deque()
        for uri in uris:
            pending.append(pool.submit(index_shard, uri, fields))
            if len(pending) >= INDEX_AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def with_shard_error(index: ShardIndex) -> list[dict[str, Any]]:
    """The rows of a shard that broke off part-way: each item fails with the shard's reason."""
    reason = f"{index.uri}: {index.error}"
    return [{**row, "sample": {**row["sample"], "error": reason}} for row in index.rows]


def write_shards_job(
    folder: Path, pattern: str, spec: dict[str, Any], prompt: str | None
) -> tuple[Path, int]:
    """job.json in `folder` whose items are the input shards `pattern` names (`submit --from`), a
    local pattern taken from where the command runs; `prompt` is for samples with no caption.
    Returns (spec path, shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    items = pattern if pattern.startswith("s3://") else str(Path(pattern).absolute())
    count = len(shard_uris(items, folder))
    if prompt is not None:
        spec = {**spec, "defaults": {**spec.get("defaults", {}), "prompt": prompt}}
    path = folder / "job.json"
    path.write_text(json.dumps({**spec, "items": items}, indent=2), encoding="utf-8")
    return path, count
