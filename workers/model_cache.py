"""Models and adapters from object storage: an s3:// source is downloaded once into the model cache
(IMGJOBS_MODEL_CACHE), and loaded from there.

Each source has a folder in the cache, holding one complete copy per version of its objects, named
by a digest of their keys, sizes and ETags. A download goes into a `.partial-*` folder beside the
copies and becomes a copy only by renaming it, once every object is in and its manifest written: a
download cut off part-way never counts as a copy (the next download removes its leftovers). A worker
that starts lists the objects again: the same ETags find the copy it made before; a changed object
is a new version, downloaded afresh, after which the older copies are removed. One lock per source
lets the workers of one host, sharing the cache, download it once between them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from jobstate.storage import s3_client
from schemas.errors import ConfigError
from schemas.registry import s3_location

log = logging.getLogger(__name__)

MANIFEST = ".imgjobs-download.json"
PARTIAL_PREFIX = ".partial-"
LOCK = ".lock"


@dataclass(frozen=True)
class RemoteObject:
    key: str  # relative to the source's prefix; the object's own name for a single object
    etag: str
    size: int


def default_cache_root() -> Path:
    """$XDG_CACHE_HOME/imgjobs/models, else ~/.cache/imgjobs/models."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "imgjobs" / "models"


def local_copy(uri: str, root: Path | None) -> Path:
    """The local path of an s3:// source, downloaded into the cache at `root` (None: the default) unless
    a complete copy of the objects as they are now is there already: the folder of a prefix
    (s3://bucket/models/sd15/), or the file of a single object (s3://bucket/loras/style.safetensors)."""
    try:
        bucket, key = s3_location(uri)
    except ValueError as exc:
        raise ConfigError(f"{uri}: {exc}") from None
    objects = _listing(uri, bucket, key)
    folder = (root or default_cache_root()).expanduser() / "s3" / _folder_name(uri)
    version = _version(objects)
    copy = folder / version
    single = not key.endswith("/")
    with _locked(folder):
        if _complete(copy, objects):
            log.info("%s: using the cached copy %s", uri, copy)
        else:
            started = time.perf_counter()
            _download(uri, bucket, key, objects, folder, copy)
            size = sum(obj.size for obj in objects)
            log.info(
                "%s: downloaded %d objects (%d bytes) into %s in %.1fs",
                uri,
                len(objects),
                size,
                copy,
                time.perf_counter() - started,
            )
        _remove_others(folder, keep=version)
    return copy / objects[0].key if single else copy


def _folder_name(uri: str) -> str:
    """A readable, collision-free folder for a source: its last path segment and a digest of the URI."""
    tail = re.sub(r"[^A-Za-z0-9._-]", "-", uri.rstrip("/").rsplit("/", 1)[-1])[:60] or "source"
    return f"{tail}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def _listing(uri: str, bucket: str, key: str) -> list[RemoteObject]:
    """The source's objects, with their ETags and sizes, as S3 lists them now."""
    client = s3_client()
    try:
        if not key.endswith("/"):
            head = client.head_object(Bucket=bucket, Key=key)
            return [RemoteObject(PurePosixPath(key).name, head["ETag"], head["ContentLength"])]
        objects = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            for listed in page.get("Contents", []):
                relative = listed["Key"][len(key) :]
                if relative and not relative.endswith("/"):  # "folder" placeholder objects hold nothing
                    objects.append(
                        RemoteObject(_safe_relative(uri, relative), listed["ETag"], listed["Size"])
                    )
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NoSuchBucket"):
            raise ConfigError(f"{uri}: no such object or bucket") from None
        raise ConfigError(f"{uri}: cannot list it: {exc}") from None
    except BotoCoreError as exc:
        raise ConfigError(f"{uri}: cannot list it: {exc}") from None
    if not objects:
        raise ConfigError(f"{uri}: no objects under this prefix")
    return sorted(objects, key=lambda obj: obj.key)


def _safe_relative(uri: str, relative: str) -> str:
    """An object's path under the copy: a key that would leave it (.., an absolute path) is refused."""
    parts = PurePosixPath(relative).parts
    if relative.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ConfigError(f"{uri}: the key {relative!r} does not name a file under the prefix")
    return relative


def _version(objects: list[RemoteObject]) -> str:
    listing = json.dumps([[obj.key, obj.etag, obj.size] for obj in objects])
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def _manifest(uri: str, objects: list[RemoteObject]) -> dict[str, object]:
    return {"uri": uri, "objects": {obj.key: {"etag": obj.etag, "size": obj.size} for obj in objects}}


def _complete(copy: Path, objects: list[RemoteObject]) -> bool:
    """A copy made from exactly these objects, every file of the size listed."""
    try:
        recorded = json.loads((copy / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = {obj.key: {"etag": obj.etag, "size": obj.size} for obj in objects}
    if not isinstance(recorded, dict) or recorded.get("objects") != expected:
        return False
    return all(_size(copy / obj.key) == obj.size for obj in objects)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _download(uri: str, bucket: str, key: str, objects: list[RemoteObject], folder: Path, copy: Path) -> None:
    """Every object into a partial folder, then the folder renamed to `copy`: what is at `copy` is always
    a whole download. A download that fails leaves nothing usable (and its partial folder is removed)."""
    partial = folder / f"{PARTIAL_PREFIX}{copy.name}-{secrets.token_hex(4)}"
    partial.mkdir(parents=True)
    try:
        prefix = key if key.endswith("/") else ""
        for obj in objects:
            target = partial / obj.key
            target.parent.mkdir(parents=True, exist_ok=True)
            s3_client().download_file(bucket, prefix + obj.key if prefix else key, str(target))
            got = _size(target)
            if got != obj.size:
                raise ConfigError(f"{uri}: {obj.key} came down as {got} bytes of {obj.size}")
        (partial / MANIFEST).write_text(json.dumps(_manifest(uri, objects), indent=1), encoding="utf-8")
        if copy.exists():
            shutil.rmtree(copy)  # an incomplete or damaged copy of the same version
        os.rename(partial, copy)
    except (Boto3Error, BotoCoreError, ClientError) as exc:  # boto3's: retries used up on a broken read
        shutil.rmtree(partial, ignore_errors=True)
        raise ConfigError(f"{uri}: download failed: {exc}") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _remove_others(folder: Path, keep: str) -> None:
    """Older copies and the leftovers of downloads that were cut off (under the lock, nobody is
    downloading into them)."""
    for child in folder.iterdir():
        if child.name not in (keep, LOCK) and child.is_dir():
            log.info("removing %s from the model cache", child)
            shutil.rmtree(child, ignore_errors=True)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the source's folder: workers sharing the cache download a source once."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
