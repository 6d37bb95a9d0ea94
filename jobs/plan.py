"""Planning a submission: each item as workers will read it (local paths made absolute), written in
parts of the job's chunk size while the manifest is validated. Free of Celery and Redis, so the GPU
benchmark (whose machine has no Celery) uses the producer's own planning; jobs/producer.py
publishes the parts and sends one chunk per part.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from jobstate.parts import JobParts
from schemas.job import IMAGE_URI_SCHEMES, Item


def absolute_path(uri: str | None, items_dir: Path) -> str | None:
    """A local input's absolute path; None for remote inputs and no input."""
    if uri is not None and uri.startswith("file://"):
        return uri.removeprefix("file://")
    if uri is None or uri.startswith(IMAGE_URI_SCHEMES):
        return None
    return _absolute(uri, items_dir)


def _absolute(uri: str | None, items_dir: Path) -> str | None:
    if uri is None or uri.startswith(IMAGE_URI_SCHEMES):
        return uri
    path = os.path.expanduser(uri)
    if os.path.isabs(path):
        return path
    joined = os.path.join(items_dir, path)
    # Lexical normalising costs no system calls (resolve() costs one per path component, per item,
    # most of a local manifest's submit time); it differs from the file system only where ".."
    # follows a symbolic link, so only such paths are resolved.
    return str(Path(joined).resolve()) if ".." in path.split(os.sep) else os.path.normpath(joined)


def normalized(item: Item, items_dir: Path) -> Item:
    """The item as workers read it: its local paths made absolute (items_dir is resolved already)."""
    image, control = item.image, item.control_image
    if control is None and (image is None or image.startswith(IMAGE_URI_SCHEMES)):
        return item  # most items of a large job: nothing local to make absolute
    paths = {
        "image": _absolute(item.image, items_dir),
        "control_image": _absolute(item.control_image, items_dir),
    }
    if paths == {"image": item.image, "control_image": item.control_image}:
        return item
    return item.model_copy(update=paths)


class PartWriter:
    """Writes items, in manifest order, as part files of `chunk_size` items each (the layout of
    jobstate/parts.py's items parts) into a local folder, from which they are published to the job's
    storage once the whole manifest has validated."""

    def __init__(self, folder: Path, chunk_size: int, items_dir: Path) -> None:
        self.folder = folder
        self.chunk_size = chunk_size
        self.items_dir = items_dir
        self.parts = 0
        self._lines = 0
        self._file: BinaryIO | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, item: Item, line: bytes | None) -> None:
        """The item, and its manifest line where that is valid Item JSON already (JSONL)."""
        file = self._file
        if file is None:
            file = self._file = (self.folder / self.name(self.parts)).open("wb")
            self.parts += 1
        written = normalized(item, self.items_dir)
        if line is not None and written is item:
            file.write(
                line if line.endswith(b"\n") and not line.endswith(b"\r\n") else line.rstrip(b"\r\n") + b"\n"
            )
        else:
            file.write(written.model_dump_json(exclude_none=True).encode() + b"\n")
        self._lines += 1
        if self._lines == self.chunk_size:
            file.close()
            self._file, self._lines = None, 0

    @staticmethod
    def name(part: int) -> str:
        return f"p{part:07d}.jsonl"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def publish(self, parts: JobParts, first: int = 0, stop: int | None = None) -> None:
        """Copy parts `first` to `stop` (default: the last) into the job's storage."""
        for part in range(first, self.parts if stop is None else stop):
            source = self.folder / self.name(part)
            target = parts.items_key(part)
            parts.storage.put_file(target, source, "application/x-ndjson")

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
