"""What the commands print about jobs, apart from how they print it: status documents with ISO times,
the rate and the ETA, filters of the job list, and failures grouped by reason."""

from __future__ import annotations

import difflib
import fnmatch
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from string import hexdigits
from typing import Any

from schemas.job import JOB_HASH_CHARS
from schemas.messages import ItemResult
from schemas.progress import JobState, JobStatus
from schemas.schedule import parse_duration

RATE_WINDOW_S = 30.0
TIME_FIELDS = ("submitted_at", "started_at", "finished_at")


def iso_time(timestamp: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC, to the millisecond."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def average_rate(status: JobStatus, done: int | None = None, now: float | None = None) -> float:
    """Items finished per second of the job's running time (since it started, until it finished, less
    the time it was stopped)."""
    done = status.done if done is None else done
    if not status.started_at or not done:
        return 0.0
    return done / max(status.running_s(time.time() if now is None else now), 1e-6)


class RateMeter:
    """Items per second over the last RATE_WINDOW_S of polls: what the job does now, not its average
    (which a slow start or a pause drags down). With one poll, the average since the job started."""

    def __init__(self) -> None:
        self._polls: deque[tuple[float, int]] = deque()

    def rate(self, status: JobStatus, now: float | None = None) -> float:
        now = time.time() if now is None else now
        if status.finished:
            return average_rate(status, now=now)
        self._polls.append((now, status.done))
        while len(self._polls) > 2 and now - self._polls[1][0] >= RATE_WINDOW_S:
            self._polls.popleft()
        (first_at, first_done), (last_at, last_done) = self._polls[0], self._polls[-1]
        if last_at - first_at < 1.0:
            return average_rate(status, now=now)
        return max(last_done - first_done, 0) / (last_at - first_at)


def status_document(status: JobStatus, rate: float, now: float | None = None) -> dict[str, Any]:
    """`status --json` and `jobs --json`: the status, its times in ISO 8601, the current rate and,
    while items remain and it moves, the expected time left (`eta_s`) and of the end (`eta`)."""
    now = time.time() if now is None else now
    document = status.model_dump(mode="json")
    for field in TIME_FIELDS:
        document[field] = iso_time(getattr(status, field))
    remaining = status.total - status.done
    eta_s = remaining / rate if rate > 0 and remaining and not status.finished else None
    document["items_per_s"] = round(rate, 3)
    document["eta_s"] = None if eta_s is None else round(eta_s, 1)
    document["eta"] = None if eta_s is None else iso_time(now + eta_s)
    return document


@dataclass(frozen=True)
class JobFilter:
    """`imgjobs jobs --state --name --since`: each given criterion must hold."""

    state: JobState | None = None
    name: str | None = None  # a shell pattern, e.g. nightly-*
    since: float | None = None  # submitted at or after this Unix time

    def matches(self, status: JobStatus) -> bool:
        if self.state is not None and status.state != self.state:
            return False
        if self.name is not None and not fnmatch.fnmatchcase(status.name, self.name):
            return False
        return self.since is None or (status.submitted_at or 0.0) >= self.since


def newest_first(statuses: Iterable[JobStatus], chosen: JobFilter, limit: int | None) -> list[JobStatus]:
    listed = sorted(
        (status for status in statuses if chosen.matches(status)),
        key=lambda status: status.submitted_at or 0.0,
        reverse=True,
    )
    return listed[:limit] if limit else listed


@dataclass(frozen=True)
class FailureGroup:
    reason: str  # the error's type, e.g. InputImageError
    count: int
    example_id: str
    example_message: str


def failures_by_reason(failed: Iterable[ItemResult]) -> list[FailureGroup]:
    """Failed items grouped by their error's type, the largest group first, each with its first item
    (by id) as an example; one pass, holding a count and an example per reason."""
    counts: dict[str, int] = {}
    examples: dict[str, ItemResult] = {}
    for result in failed:
        reason = result.error.type if result.error else "unknown"
        counts[reason] = counts.get(reason, 0) + 1
        if reason not in examples or result.id < examples[reason].id:
            examples[reason] = result
    summary = []
    for reason, count in counts.items():
        example = examples[reason]
        message = example.error.message if example.error else ""
        summary.append(FailureGroup(reason, count, example.id, message))
    return sorted(summary, key=lambda group: (-group.count, group.reason))


def parse_since(value: str, now: float | None = None) -> float:
    """`--since`: a duration back from now (90s, 15m, 12h, 7d) or an ISO 8601 date or time (local
    time unless it names its zone); a Unix time."""
    now = time.time() if now is None else now
    try:
        return now - parse_duration(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ValueError(
            f"{value!r} is neither a duration (90s, 15m, 12h, 7d) nor an ISO date or time (2026-12-01T22:00)"
        ) from None


def job_name(job_id: str) -> str:
    """The name a job id starts with: the id without its hash (jobs/manifest.py)."""
    name, _, digest = job_id.rpartition("-")
    return name if name and len(digest) == JOB_HASH_CHARS and all(c in hexdigits for c in digest) else job_id


def suggested_ids(job_id: str, known: Iterable[str], most: int = 3) -> str | None:
    """ "did you mean ...?" for an unknown job id: the known jobs of its name (the id's hash mistyped,
    or the name alone given), else those whose id is spelt most alike; None if none is close."""
    ids = sorted(set(known))
    name = job_name(job_id)
    alike = [known_id for known_id in ids if job_name(known_id) == name] or difflib.get_close_matches(
        job_id, ids, n=most
    )
    if not alike:
        return None
    shown = ", ".join(repr(known_id) for known_id in alike[:most])
    more = f" and {len(alike) - most} more" if len(alike) > most else ""
    return f"did you mean {shown}{more}?" if len(alike) == 1 else f"did you mean one of {shown}{more}?"


def log_lines_naming(job_id: str, folders: Iterable[Path]) -> Iterator[tuple[Path, str]]:
    """Lines of the *.log files in `folders` that contain the job's id (JSON lines carry it as a field,
    text lines in the chunk ids they name), file by file in name order."""
    for folder in folders:
        for path in sorted(folder.glob("*.log")):
            with path.open(encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    if job_id in line:
                        yield path, line.rstrip("\n")
