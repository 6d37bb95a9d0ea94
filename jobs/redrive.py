"""Dead letters and redrive: list a job's failed items, run them again, or cancel the job. State goes
through the job-state owner (jobstate.store); failures are read from the job's results parts."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterator
from typing import Any, Literal

from jobstate.bits import mask, ones, zeros
from jobstate.meta import JobMeta
from jobstate.parts import JobParts
from jobstate.results import JobBits, part_results, parts_with_failures
from jobstate.storage import open_storage
from jobstate.store import MOVE_BATCH, CancelVerdict, JobStore
from schemas.errors import ConfigError, ImgjobsError, JobCancelledError, UnknownJobError
from schemas.messages import Chunk, ChunkId, ItemResult, JobEnd

Sender = Callable[[JobMeta, list[Chunk]], None]
CANCELLED = JobCancelledError.__name__


def _parts(meta: JobMeta) -> JobParts:
    return JobParts(open_storage(meta.output, meta.job_id), meta.run_id)


def _failed_lines(meta: JobMeta, bits: JobBits) -> Iterator[tuple[int, ItemResult]]:
    parts = _parts(meta)
    for part in parts_with_failures(meta, bits):
        for line in part_results(meta, parts, bits, part):
            if line.failed:
                yield line.position, ItemResult.model_validate_json(line.line)


def failures(store: JobStore, job_id: str, reason: str | None = None) -> Iterator[ItemResult]:
    """The job's failed items, with their reasons; only those of type `reason` when given."""
    meta = store.meta(job_id)
    for _position, result in _failed_lines(meta, store.bits(meta)):
        if reason is None or (result.error is not None and result.error.type == reason):
            yield result


def cancel(store: JobStore, job_id: str, send_end: Callable[[JobEnd], None]) -> CancelVerdict:
    """Cancel at once: every item not started counts as cancelled now, chunks sent before are
    dropped when they start, and a running one stops at its next call; the job's end follows."""
    verdict, end_round = store.cancel(job_id)
    if end_round is not None:
        send_end(JobEnd(job_id=job_id, run_id=store.meta(job_id).run_id, round=end_round))
    return verdict


def retry(
    store: JobStore,
    job_id: str,
    reason: str | None,
    send: Sender,
    send_end: Callable[[JobEnd], None],
    ids: Collection[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> int:
    """Run failed items (of type `reason`, or all; only those named in `ids` when given) again from
    the first stage; those of a cancelled job that has ended include the cancelled ones. Items that
    succeeded stay as they are. With `overrides` (item fields, as `with_overrides` takes them), the
    items run with those fields changed, and their results rows say so. Returns how many items were
    sent again; an id in `ids` that names no such item is an error, before anything changes.

    Everything is read before anything changes. Items move, and the job reopens, in one script per
    MOVE_BATCH items, so `imgjobs prune` either deletes the job before or keeps it. Should anything
    stop the retry after that (an error publishing the chunks, Ctrl-C), the items not started again
    go back to failed (or cancelled), the job ends again, and running `imgjobs retry` again finds
    them. Only a Redis lost mid-retry can leave items open with nothing queued."""
    meta = store.meta(job_id)
    if meta.cancelled_at is not None and meta.finished_at is None:
        raise ImgjobsError(
            f"job {job_id} is being cancelled; retry it once `imgjobs status` says it has ended"
        )
    cancelled = meta.cancelled_at is not None
    if cancelled and reason not in (None, CANCELLED):
        # Running only some of its failures would leave the cancelled items open with nothing queued.
        raise ConfigError(
            f"job {job_id} was cancelled: `imgjobs retry {job_id}` runs its failed and cancelled items "
            f"again, `--reason {CANCELLED}` its cancelled ones; other reasons are for jobs not cancelled"
        )
    bits = store.bits(meta)
    targets = list(_targets(meta, bits, reason, cancelled))
    if ids is not None:
        targets = _named(meta, targets, set(ids), reason)
    if not targets:
        return 0
    kinds = dict(targets)
    moved: list[tuple[int, int, Literal["f", "c"]]] = []  # position, stages it had passed, kind
    round_ = meta.round
    try:
        positions = [position for position, _ in targets]
        for start in range(0, len(positions), MOVE_BATCH):
            batch = positions[start : start + MOVE_BATCH]
            round_, stages = store.reopen_items(meta, batch, reopen=not moved, cancelled=cancelled)
            if round_ == -1:
                raise UnknownJobError(f"no job {job_id!r} on this broker (pruned meanwhile)")
            if round_ == -2:
                raise ImgjobsError(f"job {job_id} was cancelled meanwhile; retry it once it has ended")
            moved += [(p, passed, kinds[p]) for p, passed in zip(batch, stages, strict=True) if passed >= 0]
        if not moved:
            return 0
        by_part = itertools.groupby(sorted(p for p, _, _ in moved), key=meta.part_of)
        chunks = [
            Chunk(
                job_id=job_id,
                run_id=meta.run_id,
                chunk_id=str(ChunkId(job_id, part, retry_round=round_)),
                part=part,
                stage_index=0,
                epoch=meta.epoch,
                round=round_,
                overrides=overrides or None,
                slots=mask([p - meta.positions(part).start for p in group], len(meta.positions(part))),
            )
            for part, group in by_part
        ]
        for start in range(0, len(chunks), 64):
            send(meta, chunks[start : start + 64])
    except BaseException as exc:
        if not moved:
            raise
        end_round = store.put_back(meta, moved, recancel=cancelled)
        if end_round is not None:
            send_end(JobEnd(job_id=job_id, run_id=meta.run_id, round=end_round))
        if isinstance(exc, Exception):
            raise ImgjobsError(
                f"job {job_id}: the retry stopped ({exc}); its items are failed again: "
                f"run `imgjobs retry {job_id}` again"
            ) from exc
        raise
    return len(moved)


def _named(
    meta: JobMeta, targets: list[tuple[int, Literal["f", "c"]]], ids: set[str], reason: str | None
) -> list[tuple[int, Literal["f", "c"]]]:
    """The targets whose items have one of `ids`; every id must name one."""
    parts = _parts(meta)
    kept, found = [], set()
    for part, group in itertools.groupby(sorted(targets), key=lambda target: meta.part_of(target[0])):
        items = parts.items(part)
        first = meta.positions(part).start
        for position, kind in group:
            if items[position - first].id in ids:
                kept.append((position, kind))
                found.add(items[position - first].id)
    missing = sorted(ids - found)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        which = f"failed items of type {reason}" if reason else "failed items"
        raise ConfigError(f"--ids: {shown}: not among job {meta.job_id}'s {which}; nothing was retried")
    return kept


def _targets(
    meta: JobMeta, bits: JobBits, reason: str | None, cancelled: bool
) -> Iterator[tuple[int, Literal["f", "c"]]]:
    """(position, 'f' for failed or 'c' for cancelled) of the items to run again."""
    if reason is None:
        # Every failed item: the bitmaps say which, without reading a part.
        yield from ((position, "f") for position in ones(bits.failed, meta.total))
        if cancelled:
            yield from ((position, "c") for position in zeros(bits.done, meta.total))
        return
    if reason == CANCELLED and cancelled:
        yield from ((position, "c") for position in zeros(bits.done, meta.total))
        return
    for position, result in _failed_lines(meta, bits):
        if result.error is not None and result.error.type == reason:
            yield position, "f"
