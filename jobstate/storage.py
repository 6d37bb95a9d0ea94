"""Where a job's files go: one small interface, a local-directory backend and an S3 backend.

A Storage is rooted at one job's prefix ({output}/{job_id}); keys are relative to it and checked
so that none escapes it. Outputs, results.jsonl and the report live there, and so do the job's
parts (jobstate/parts.py). S3 settings come from boto3's own chain (AWS_ENDPOINT_URL, AWS_* keys,
profiles, instance roles); we never read or store credentials ourselves.

Errors are StorageError (retryable: the store may come back) or StorageRefusedError (the store
refuses this for good: a path through a file, no permission, a bucket name S3 cannot have).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, cast

import boto3
import botocore.session
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from schemas.errors import InputShardError, StorageError, StorageRefusedError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# What a local file system says when no retry can help.
PERMANENT_ERRNOS = frozenset(
    {errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG, errno.EEXIST}
)
# What S3 says when there is no such key.
NOT_FOUND = ("404", "NoSuchKey", "NotFound")
# What S3 says when no retry can help.
PERMANENT_S3_ERRORS = frozenset(
    {
        "403",
        "AccessDenied",
        "InvalidBucketName",
        "InvalidObjectState",
        "KeyTooLongError",
        "NoSuchBucket",
    }
)


class Storage(Protocol):
    root: str

    def put(self, key: str, data: bytes, content_type: str) -> str:
        """Write data under key, replacing what is there; returns the object's URI."""

    def put_file(self, key: str, path: Path, content_type: str) -> str: ...

    def get(self, key: str) -> bytes: ...

    def get_file(self, key: str, path: Path) -> bool:
        """Copy key into the local file `path`; False (and nothing written) when there is no such key."""

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[str]:
        """The keys of the files directly under the folder `prefix` (a key), sorted; none if it is absent."""

    def delete(self, key: str) -> None:
        """Remove key; a missing key is not an error."""

    def uri(self, key: str) -> str: ...


def check_key(key: str) -> str:
    parts = key.split("/")
    if (
        not key
        or key.startswith("/")
        or "\\" in key
        or "\x00" in key
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise StorageRefusedError(
            f"refusing storage key {key!r}: keys are relative and stay inside the job's prefix"
        )
    return key


def _local_error(action: str, path: Path, exc: OSError) -> StorageError:
    reason = exc.strerror or str(exc)
    if exc.errno in PERMANENT_ERRNOS:
        return StorageRefusedError(f"cannot {action} {path}: {reason}")
    return StorageError(f"cannot {action} {path}: {reason}")


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self._root = root
        self.root = str(root)

    def _path(self, key: str) -> Path:
        return self._root / check_key(key)

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def put(self, key: str, data: bytes, content_type: str) -> str:
        path = self._path(key)
        try:
            with _Replacing(path) as tmp, open(tmp, "wb") as file:
                file.write(data)
        except OSError as exc:
            raise _local_error("write", path, exc) from None
        return str(path)

    def put_file(self, key: str, path: Path, content_type: str) -> str:
        target = self._path(key)
        try:
            with _Replacing(target) as tmp:
                shutil.copyfile(path, tmp)
        except OSError as exc:
            raise _local_error("write", target, exc) from None
        return str(target)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except OSError as exc:
            raise _local_error("read", self._path(key), exc) from None

    def get_file(self, key: str, path: Path) -> bool:
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _local_error("read", self._path(key), exc) from None
        return True

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        folder = self._path(prefix)
        try:
            with os.scandir(folder) as entries:
                names = [
                    entry.name for entry in entries if entry.is_file() and not entry.name.startswith(".")
                ]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _local_error("list", folder, exc) from None
        return [f"{prefix}/{name}" for name in sorted(names)]

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise _local_error("delete", self._path(key), exc) from None


class _Replacing:
    """A temporary name beside `path`, renamed over it on success, so a reader never sees half a
    file; removed on failure. Created with os.open's default mode, so the file follows the umask
    as any other file the user writes (mkstemp's would be 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".tmp-{secrets.token_hex(6)}-{path.name}"[:255])

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        return self.tmp

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


# What a client is built from: a process whose environment changes (an operator's rotated keys, a
# test's own endpoint) gets a client of the new environment, never one cached from the old.
S3_ENVIRONMENT = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_MAX_ATTEMPTS",
    "AWS_CA_BUNDLE",
    "AWS_EC2_METADATA_DISABLED",
)


def s3_client() -> S3Client:
    """The client for the process's S3 environment (S3_ENVIRONMENT), built once per environment (two
    threads asking first at once may each build one, which is harmless). Retries and timeouts are
    boto3's own; checksums are only sent when required because some S3-compatible stores reject the new
    default CRC headers (boto3#4392)."""
    return _client_for(tuple(os.environ.get(name) for name in S3_ENVIRONMENT))


def forget_s3_clients() -> None:
    """Drop the clients built so far, so the next request builds one (a test's fresh start)."""
    _client_for.cache_clear()


def s3_clients_built() -> int:
    return _client_for.cache_info().currsize


@functools.lru_cache(maxsize=4)
def _client_for(environment: tuple[str | None, ...]) -> S3Client:
    # A session of its own: boto3's default session is not safe to create clients from on several
    # threads at once, and the chunk runner's I/O threads may be the first to ask.
    core = botocore.session.Session()
    # A count in the client's config would override the operator's (AWS_MAX_ATTEMPTS, ~/.aws/config).
    configured = core.get_config_variable("max_attempts")
    config = Config(
        retries=(
            {"mode": "standard", "total_max_attempts": int(configured)}
            if configured
            else {"mode": "standard", "max_attempts": 8}
        ),
        connect_timeout=10,
        read_timeout=60,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session(botocore_session=core).client("s3", config=config)


def split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _s3_error(action: str, uri: str, exc: Exception) -> StorageError:
    if isinstance(exc, ParamValidationError):
        return StorageRefusedError(f"cannot {action} {uri}: {exc}")
    # upload_file keeps only the text of its last ClientError, the code among it.
    if isinstance(exc, ClientError):
        refused = exc.response.get("Error", {}).get("Code") in PERMANENT_S3_ERRORS
    else:
        refused = isinstance(exc, S3UploadFailedError) and any(
            f"({code})" in str(exc) for code in PERMANENT_S3_ERRORS
        )
    if refused:
        return StorageRefusedError(f"cannot {action} {uri}: {exc}")
    return StorageError(f"cannot {action} {uri}: {exc}")


class S3Storage:
    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.root = f"s3://{bucket}/{self.prefix}"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{check_key(key)}" if self.prefix else check_key(key)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put(self, key: str, data: bytes, content_type: str) -> str:
        try:
            s3_client().put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type
            )
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error("write", self.uri(key), exc) from None
        return self.uri(key)

    def put_file(self, key: str, path: Path, content_type: str) -> str:
        try:
            s3_client().upload_file(
                str(path), self.bucket, self._key(key), ExtraArgs={"ContentType": content_type}
            )
        # upload_file wraps the ClientError of its last attempt in S3UploadFailedError (boto3's own).
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            raise _s3_error("write", self.uri(key), exc) from None
        return self.uri(key)

    def get(self, key: str) -> bytes:
        try:
            body: bytes = s3_client().get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error("read", self.uri(key), exc) from None
        return body

    def get_file(self, key: str, path: Path) -> bool:
        return self._found(key, lambda: s3_client().download_file(self.bucket, self._key(key), str(path)))

    def list(self, prefix: str) -> list[str]:
        folder = f"{self._key(prefix)}/"
        names: list[str] = []
        try:
            for page in (
                s3_client()
                .get_paginator("list_objects_v2")
                .paginate(Bucket=self.bucket, Prefix=folder, Delimiter="/")
            ):
                names += [obj["Key"][len(folder) :] for obj in page.get("Contents", [])]
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error("list", f"s3://{self.bucket}/{folder}", exc) from None
        return [f"{prefix}/{name}" for name in sorted(names)]

    def delete(self, key: str) -> None:
        try:
            s3_client().delete_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error("delete", self.uri(key), exc) from None

    def exists(self, key: str) -> bool:
        return self._found(key, lambda: s3_client().head_object(Bucket=self.bucket, Key=self._key(key)))

    def _found(self, key: str, request: Callable[[], object]) -> bool:
        """Make a request about `key`; False where S3 says there is no such key."""
        try:
            request()
        except (BotoCoreError, ClientError) as exc:
            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in NOT_FOUND:
                return False
            raise _s3_error("read", self.uri(key), exc) from None
        return True


def open_storage(output: str, job_id: str) -> Storage:
    """The storage rooted at {output}/{job_id}."""
    check_key(job_id)
    if output.startswith("s3://"):
        bucket, prefix = split_s3_uri(output)
        return S3Storage(bucket, f"{prefix.strip('/')}/{job_id}".strip("/"))
    return LocalStorage(Path(output.removeprefix("file://")) / job_id)


# -- input shards: whole streams at submit, byte ranges on workers (jobs/shards.py, workers/samples.py)

SHARD_GONE_S3_ERRORS = frozenset({*NOT_FOUND, "NoSuchBucket"})
SHARD_CHANGED = "the shard changed since it was indexed at submit; submit the job again"


def local_version(path: Path) -> str:
    """A local file's version: its size and modification time, which any rewrite changes."""
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _shard_error(uri: str, exc: ClientError) -> StorageError | InputShardError:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    if code in SHARD_GONE_S3_ERRORS:
        return InputShardError(f"{uri}: no such shard")
    if code in ("412", "PreconditionFailed"):
        return InputShardError(f"{uri}: {SHARD_CHANGED}")
    if code in ("416", "InvalidRange"):
        return InputShardError(f"{uri}: the shard is shorter than its index says (truncated since submit?)")
    if code in PERMANENT_S3_ERRORS:
        return InputShardError(f"{uri}: {code}")
    return StorageError(f"{uri}: {exc}")


@contextlib.contextmanager
def _s3_shard_errors(uri: str) -> Iterator[None]:
    """S3's errors about a shard as imgjobs' own: InputShardError where no retry helps (gone, changed,
    refused, a request S3 cannot take), StorageError where it may pass."""
    try:
        yield
    except ClientError as exc:
        raise _shard_error(uri, exc) from None
    except ParamValidationError as exc:
        raise InputShardError(f"{uri}: {exc}") from None
    except BotoCoreError as exc:
        raise StorageError(f"{uri}: {exc}") from None


def open_shard(uri: str) -> tuple[BinaryIO, str, int]:
    """A shard as a stream read from its start, with its version and size: the ETag on S3, size and
    mtime for a local file. InputShardError where it cannot be opened for good."""
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        with _s3_shard_errors(uri):
            obj = s3_client().get_object(Bucket=bucket, Key=key)
        return cast(BinaryIO, obj["Body"]), str(obj.get("ETag", "")), int(obj.get("ContentLength", 0))
    path = Path(uri)
    try:
        handle = path.open("rb")
        return handle, local_version(path), path.stat().st_size
    except OSError as exc:
        raise InputShardError(f"{uri}: {exc.strerror or exc}") from None


def read_range(uri: str, start: int, stop: int, version: str | None) -> bytes:
    """Bytes [start, stop) of a shard, as it was when indexed (`version`): on S3 one GET with a Range
    (and If-Match, so a shard rewritten since fails rather than giving other bytes), locally a seek.
    InputShardError when the shard is gone, changed or shorter; StorageError when it may pass."""
    if stop <= start:
        return b""
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        span = f"bytes={start}-{stop - 1}"
        with _s3_shard_errors(uri):
            if version:
                body = s3_client().get_object(Bucket=bucket, Key=key, Range=span, IfMatch=version)
            else:
                body = s3_client().get_object(Bucket=bucket, Key=key, Range=span)
            data: bytes = body["Body"].read()
    else:
        path = Path(uri)
        try:
            if version and local_version(path) != version:
                raise InputShardError(f"{uri}: {SHARD_CHANGED}")
            with path.open("rb") as handle:
                handle.seek(start)
                data = handle.read(stop - start)
        except OSError as exc:
            raise InputShardError(f"{uri}: {exc.strerror or exc}") from None
    if len(data) != stop - start:
        raise InputShardError(
            f"{uri}: truncated: ends before byte {stop} "
            f"(read {len(data)} of {stop - start} bytes from {start})"
        )
    return data


class RangedFile(io.RawIOBase):
    """A shard as a seekable file whose reads are ranged reads (read_range): what pyarrow reads a
    Parquet file's footer and row groups through, fetching only the byte ranges it asks for."""

    def __init__(self, uri: str, size: int, version: str | None) -> None:
        super().__init__()
        self.uri, self.size, self.version, self.position = uri, size, version, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def read(self, size: int = -1) -> bytes:
        stop = self.size if size is None or size < 0 else min(self.size, self.position + size)
        data = read_range(self.uri, self.position, stop, self.version) if stop > self.position else b""
        self.position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def shard_size_and_version(uri: str) -> tuple[int, str]:
    """A shard's size and version without reading it (a HEAD, or a stat)."""
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        with _s3_shard_errors(uri):
            head = s3_client().head_object(Bucket=bucket, Key=key)
        return int(head["ContentLength"]), str(head.get("ETag", ""))
    try:
        return Path(uri).stat().st_size, local_version(Path(uri))
    except OSError as exc:
        raise InputShardError(f"{uri}: {exc.strerror or exc}") from None
