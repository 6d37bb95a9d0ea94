"""Jobs from a listing: `imgjobs submit --from 's3://bucket/in/*.png'` or a local glob, one item per
matching image, written out as an ordinary job (spec + items.jsonl) and submitted the usual way.

A pattern means the same on S3 as on local files, as glob reads it: `*`, `?` and `[...]` match
within one level of the path, never across `/`; `**`, a whole level, matches any number of levels;
wildcards skip names that start with a dot. S3 keys are split into levels at `/`."""

from __future__ import annotations

import fnmatch
import functools
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from jobstate.storage import s3_client
from schemas.errors import ConfigError
from schemas.job import RESERVED_ITEM_IDS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
WILDCARDS = "*?["
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_DOTS = re.compile(r"\.{2,}")  # ".." is refused in item ids


def _wildcard_free_prefix(pattern: str) -> str:
    """The listing's S3 prefix: what every matching key starts with."""
    cut = min((pattern.find(c) for c in WILDCARDS if c in pattern), default=len(pattern))
    return pattern[:cut]


def check_pattern(pattern: str) -> None:
    """A ConfigError unless the pattern is an s3:// pattern with a bucket or a local glob, with `**`
    only as a whole level (elsewhere glob would quietly read it as `*`)."""
    if "://" in pattern and not pattern.startswith("s3://"):
        raise ConfigError(f"{pattern!r}: a listing is s3://bucket/prefix/*.png or a local glob")
    if pattern.startswith("s3://") and not split_pattern(pattern)[0]:
        raise ConfigError(f"{pattern!r}: an s3:// listing needs a bucket, as in s3://bucket/in/*.png")
    if any("**" in level and level != "**" for level in pattern.split("/")):
        raise ConfigError(f"{pattern!r}: `**` must be a whole path level, as in in/**/*.png")


def split_pattern(pattern: str) -> tuple[str, str]:
    """(bucket, key pattern) of an s3:// pattern; a bucket alone means all of it."""
    bucket, _, key_pattern = pattern.removeprefix("s3://").partition("/")
    return bucket, key_pattern or "**"


def _is_literal(level: str) -> bool:
    return not any(c in level for c in WILDCARDS)


def _level_matches(pattern: str, name: str) -> bool:
    if _is_literal(pattern):
        return pattern == name
    # As in the shell and glob: a wildcard does not match a hidden name's leading dot.
    return (pattern.startswith(".") or not name.startswith(".")) and fnmatch.fnmatchcase(name, pattern)


@functools.lru_cache(maxsize=4096)
def _levels_match(patterns: tuple[str, ...], names: tuple[str, ...]) -> bool:
    if not patterns:
        return not names
    head, rest = patterns[0], patterns[1:]
    if head == "**":  # zero or more levels, none of them hidden
        return _levels_match(rest, names) or (
            bool(names) and not names[0].startswith(".") and _levels_match(patterns, names[1:])
        )
    return bool(names) and _level_matches(head, names[0]) and _levels_match(rest, names[1:])


def matches(pattern: str, path: str) -> bool:
    """Whether a key or path matches the pattern, the same way for S3 and local files: `*`, `?` and
    `[...]` match within one level (never `/`), `**` matches any number of levels."""
    return _levels_match(tuple(pattern.split("/")), tuple(path.split("/")))


def matches_in_new_folders(pattern: str, folder: str) -> bool:
    """Whether the pattern could match files in folders yet to be made inside `folder` (a path or
    key prefix without wildcards, "" for a bucket's root), such as the job folders of an output.
    A literal level names an existing folder, never one to come."""
    names = tuple(folder.rstrip("/").split("/")) if folder else ()
    return _matches_below(tuple(pattern.split("/")), names)


def _matches_below(patterns: tuple[str, ...], names: tuple[str, ...]) -> bool:
    if not names:
        return bool(patterns) and not _is_literal(patterns[0])
    if not patterns:
        return False
    head, rest = patterns[0], patterns[1:]
    if head == "**":
        return _matches_below(rest, names) or (
            not names[0].startswith(".") and _matches_below(patterns, names[1:])
        )
    return _level_matches(head, names[0]) and _matches_below(rest, names[1:])


def absolute_pattern(source: str, base_dir: Path) -> str:
    """A local pattern made absolute, its leading levels without wildcards resolved as an output is,
    so that the two compare."""
    if source.startswith("s3://"):
        return source
    levels = os.path.normpath(base_dir / os.path.expanduser(source)).split("/")
    literal = next((i for i, level in enumerate(levels) if any(c in level for c in WILDCARDS)), len(levels))
    return str(Path(Path("/".join(levels[:literal]) or "/").resolve(), *levels[literal:]))


def lists_output(source: str, output: str) -> bool:
    """Whether the listing `source` could list what jobs write under `output` (both absolute, as
    absolute_pattern and a resolved folder, or s3://): each listing would take the last one's outputs
    for new images."""
    if source.startswith("s3://") != output.startswith("s3://"):
        return False
    if not source.startswith("s3://"):
        return matches_in_new_folders(source, output)
    bucket, key_pattern = split_pattern(source)
    out_bucket, _, out_prefix = output.removeprefix("s3://").partition("/")
    return bucket == out_bucket and matches_in_new_folders(key_pattern, out_prefix.strip("/"))


def list_images(pattern: str) -> Iterator[str]:
    """URIs matching an s3://bucket/prefix/*.png pattern or a local glob, in sorted order."""
    for uri, _version in list_versions(pattern):
        yield uri


def list_versions(pattern: str) -> Iterator[tuple[str, str]]:
    """(URI, version) of each matching image: the ETag on S3, a content hash for local files, so a
    rewritten image counts as new."""
    check_pattern(pattern)
    if pattern.startswith("s3://"):
        yield from _s3_versions(pattern)
        return
    for path in sorted(glob.glob(pattern, recursive=True)):
        if matches(pattern, path) and Path(path).is_file() and path.lower().endswith(IMAGE_SUFFIXES):
            yield str(Path(path).resolve()), hashlib.sha256(Path(path).read_bytes()).hexdigest()


def list_files(pattern: str, suffixes: tuple[str, ...]) -> Iterator[str]:
    """URIs matching a pattern whose names end with one of `suffixes` (input shards), sorted."""
    check_pattern(pattern)
    if pattern.startswith("s3://"):
        for uri, _version in _s3_versions(pattern, suffixes):
            yield uri
        return
    for path in sorted(glob.glob(pattern, recursive=True)):
        if matches(pattern, path) and Path(path).is_file() and path.lower().endswith(suffixes):
            yield str(Path(path).resolve())


def _s3_versions(pattern: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> Iterator[tuple[str, str]]:
    bucket, key_pattern = split_pattern(pattern)
    # The client storage uses: standard retries, timeouts and the checksum settings S3-compatible
    # stores need.
    try:
        pages = (
            s3_client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=_wildcard_free_prefix(key_pattern))
        )
        for page in pages:
            for entry in page.get("Contents", []):
                key = entry["Key"]
                if key.lower().endswith(suffixes) and matches(key_pattern, key):
                    yield f"s3://{bucket}/{key}", str(entry.get("ETag", "")).strip('"')
    except (BotoCoreError, ClientError) as exc:  # no credentials, no such bucket, endpoint down
        # After boto3's own retries: the source, its credentials or its endpoint need fixing, and
        # nothing was submitted.
        raise ConfigError(f"cannot list {pattern}: {exc}") from None


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
    """job.json and items.jsonl in `folder` for every image the pattern lists; returns (spec path, count).
    A local pattern is relative to the working folder, and so is a local output (`spec`'s, absolute)."""
    check_pattern(pattern)
    output = spec.get("output")
    if isinstance(output, str) and lists_output(absolute_pattern(pattern, Path.cwd()), output):
        raise ConfigError(
            f"--from {pattern!r} would list what the job writes under --output {output}, and a later "
            "submit of the same listing would take those outputs for new images; write them elsewhere"
        )
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
