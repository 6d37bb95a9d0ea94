"""Jobs from a listing: `imgjobs submit --from 's3://bucket/in/*.png'` or a local glob, one item per
matching image, written out as an ordinary job (spec + items.jsonl) and submitted the usual way."""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from schemas.errors import ConfigError, StorageError
from schemas.job import RESERVED_ITEM_IDS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_DOTS = re.compile(r"\.{2,}")  # ".." is refused in item ids


def _wildcard_free_prefix(pattern: str) -> str:
    cut = min((pattern.find(c) for c in "*?[" if c in pattern), default=len(pattern))
    return pattern[:cut]


def list_images(pattern: str) -> Iterator[str]:
    """URIs matching an s3://bucket/prefix/*.png pattern or a local glob, in sorted order."""
    for uri, _version in list_versions(pattern):
        yield uri


def list_versions(pattern: str) -> Iterator[tuple[str, str]]:
    """(URI, version) of each matching image: the ETag on S3, a content hash for local files, so a
    rewritten image counts as new."""
    if pattern.startswith("s3://"):
        bucket, _, key_pattern = pattern.removeprefix("s3://").partition("/")
        if not bucket:
            raise ConfigError(f"--from {pattern!r}: an s3:// listing needs a bucket")
        # Imported here: only s3:// listings need boto3, and every CLI command would pay its import.
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            pages = (
                boto3.client("s3")
                .get_paginator("list_objects_v2")
                .paginate(Bucket=bucket, Prefix=_wildcard_free_prefix(key_pattern))
            )
            for page in pages:
                for entry in page.get("Contents", []):
                    key = entry["Key"]
                    if fnmatch.fnmatchcase(key, key_pattern or "*") and key.lower().endswith(IMAGE_SUFFIXES):
                        yield f"s3://{bucket}/{key}", str(entry.get("ETag", "")).strip('"')
        except (BotoCoreError, ClientError) as exc:  # no credentials, no such bucket, endpoint down
            raise StorageError(f"cannot list {pattern}: {exc}") from None
        return
    for path in sorted(glob.glob(pattern, recursive=True)):
        if Path(path).is_file() and path.lower().endswith(IMAGE_SUFFIXES):
            yield str(Path(path).resolve()), hashlib.sha256(Path(path).read_bytes()).hexdigest()


def item_id_for(uri: str, taken: set[str]) -> str:
    """A stable id from the file's name, made unique within the job, that passes the item id rules
    (schemas/job.py): "_DSC0001.JPG" gives "DSC0001", "a..b.png" "a.b", "dataset.png" "dataset-2"."""
    stem = _UNSAFE.sub("-", Path(uri.rsplit("/", 1)[-1]).stem)
    stem = _DOTS.sub(".", stem).strip("-.").lstrip("_-.")[:100] or "item"
    candidate, number = stem, 1
    while candidate in taken or candidate in RESERVED_ITEM_IDS:
        number += 1
        candidate = f"{stem}-{number}"
    taken.add(candidate)
    return candidate


def write_listing_job(
    folder: Path, pattern: str, spec: dict[str, Any], prompt: str | None
) -> tuple[Path, int]:
    """job.json and items.jsonl in `folder` for every image the pattern lists; returns (spec path, count)."""
    folder.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    count = 0
    with (folder / "items.jsonl").open("w", encoding="utf-8") as items:
        for uri in list_images(pattern):
            row: dict[str, Any] = {"id": item_id_for(uri, taken), "image": uri}
            if prompt is not None:
                row["prompt"] = prompt
            items.write(json.dumps(row) + "\n")
            count += 1
    if count == 0:
        raise ConfigError(f"--from {pattern!r} matches no image")
    path = folder / "job.json"
    path.write_text(json.dumps({**spec, "items": "items.jsonl"}, indent=2), encoding="utf-8")
    return path, count
