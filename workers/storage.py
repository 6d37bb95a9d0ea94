"""Where outputs go: one small interface, a local-directory backend and an S3 backend.

A Storage is rooted at one job's prefix ({output}/{job_id}); keys are relative to it and checked
so that none escapes it. S3 settings come from boto3's own chain (AWS_ENDPOINT_URL, AWS_* keys,
profiles, instance roles); we never read or store credentials ourselves.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from schemas.errors import StorageError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class Storage(Protocol):
    root: str

    def put(self, key: str, data: bytes, content_type: str) -> str:
        """Write data under key, replacing what is there; returns the object's URI."""

    def put_file(self, key: str, path: Path, content_type: str) -> str: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

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
        raise StorageError(
            f"refusing storage key {key!r}: keys are relative and stay inside the job's prefix"
        )
    return key


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
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a reader never sees half a file. mkstemp rather than
            # NamedTemporaryFile: the same unique name for half the cost, which counts for small images.
            handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with open(handle, "wb") as file:
                file.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror}") from None
        return str(path)

    def put_file(self, key: str, path: Path, content_type: str) -> str:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".tmp-{target.name}")
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {exc.strerror}") from None
        return str(target)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {self._path(key)}: {exc.strerror}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {self._path(key)}: {exc.strerror}") from None


@functools.cache
def s3_client() -> S3Client:
    """One client per process (two threads asking first at once may each build one, which is
    harmless). Retries and timeouts are boto3's own; checksums are only sent when required because
    some S3-compatible stores reject the new default CRC headers (boto3#4392)."""
    config = Config(
        retries={"mode": "standard", "max_attempts": 8},
        connect_timeout=10,
        read_timeout=60,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    # A session of its own: boto3's default session is not safe to create clients from on several
    # threads at once, and the chunk runner's I/O threads may be the first to ask.
    return boto3.session.Session().client("s3", config=config)


def split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


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
            raise StorageError(f"cannot write {self.uri(key)}: {exc}") from None
        return self.uri(key)

    def put_file(self, key: str, path: Path, content_type: str) -> str:
        try:
            s3_client().upload_file(
                str(path), self.bucket, self._key(key), ExtraArgs={"ContentType": content_type}
            )
        # upload_file wraps the ClientError of its last attempt in S3UploadFailedError (boto3's own).
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            raise StorageError(f"cannot write {self.uri(key)}: {exc}") from None
        return self.uri(key)

    def get(self, key: str) -> bytes:
        try:
            body: bytes = s3_client().get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot read {self.uri(key)}: {exc}") from None
        return body

    def delete(self, key: str) -> None:
        try:
            s3_client().delete_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot delete {self.uri(key)}: {exc}") from None

    def exists(self, key: str) -> bool:
        try:
            s3_client().head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"cannot read {self.uri(key)}: {exc}") from None
        except BotoCoreError as exc:
            raise StorageError(f"cannot read {self.uri(key)}: {exc}") from None
        return True


def open_storage(output: str, job_id: str) -> Storage:
    """The storage rooted at {output}/{job_id}."""
    check_key(job_id)
    if output.startswith("s3://"):
        bucket, prefix = split_s3_uri(output)
        return S3Storage(bucket, f"{prefix.strip('/')}/{job_id}".strip("/"))
    return LocalStorage(Path(output.removeprefix("file://")) / job_id)
