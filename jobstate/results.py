"""An item's result as the parts and the bitmaps have it: one line per item, in manifest order.

results.jsonl, `imgjobs failures` and `imgjobs retry` all read the job through part_results, so
they agree. The bitmaps decide what counts: an item whose done bit is set takes its latest row whose
status matches its failed bit (rows a dead worker wrote but never marked done are passed over), or,
with none, a failed line that says its result is missing; an item never finished in a cancelled job
is cancelled.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from jobstate.bits import any_bit, bit
from jobstate.meta import JobMeta
from jobstate.parts import JobParts, ResultRow
from schemas.errors import JobCancelledError, StorageError
from schemas.job import Item, resolve_params
from schemas.messages import ItemResult, item_result


@dataclass(frozen=True)
class JobBits:
    """A job's bitmaps, fetched whole (1 bit an item: 12.5 MB for 100 million)."""

    done: bytes
    failed: bytes
    handed: tuple[bytes, ...]  # past stage 0, 1, ...

    def reached(self, position: int) -> int:
        """The stage an unfinished item is at: the first it was not handed past."""
        stage = 0
        while stage < len(self.handed) and bit(self.handed[stage], position):
            stage += 1
        return stage


@dataclass(frozen=True)
class ResultLine:
    position: int
    failed: bool
    line: str  # ItemResult JSON


def _chosen(rows: list[ResultRow], failed: bool) -> ResultRow | None:
    """The latest row of the item's recorded status; None if there is none. Rows of the other status
    were written by an attempt that never counted (a dead worker's, an earlier round's)."""
    matching = [row for row in rows if row.failed == failed]
    return max(matching, key=lambda row: row.attempt) if matching else None


def cancelled_result(meta: JobMeta, item: Item, stage_index: int) -> ItemResult:
    plan = meta.recipe[stage_index]
    defaults = meta.spec.defaults
    return item_result(
        item,
        defaults,
        plan,
        resolve_params(item, plan.spec, defaults),
        records=[],
        outputs={},
        error=JobCancelledError("the job was cancelled before the item ran"),
    )


def lost_result(meta: JobMeta, item: Item, folder: str) -> ItemResult:
    """The result of an item finished without a row in `folder`: one that failed while storage could
    not take its row (meta.unrecorded says why), or whose row was removed since."""
    plan = meta.recipe[0]
    reason = meta.unrecorded or f"the item's recorded result is missing from {folder}"
    return item_result(
        item,
        meta.spec.defaults,
        plan,
        resolve_params(item, plan.spec, meta.spec.defaults),
        records=[],
        outputs={},
        error=StorageError(reason),
    )


def part_results(meta: JobMeta, parts: JobParts, bits: JobBits, part: int) -> Iterator[ResultLine]:
    """The result line of every finished item of `part` in manifest order, with cancelled items where
    the job is cancelled; items still open are left out."""
    positions = meta.positions(part)
    cancelled = meta.cancelled_at is not None
    if not any_bit(bits.done, positions) and not cancelled:
        return
    rows = parts.results(part)
    items: list[Item] | None = None
    for slot, position in enumerate(positions):
        failed = bit(bits.failed, position)
        if bit(bits.done, position):
            row = _chosen(rows.get(slot, []), failed)
            if row is not None:
                yield ResultLine(position, row.failed, row.line)
                continue
            items = items or parts.items(part)
            lost = lost_result(meta, items[slot], parts.storage.uri(parts.results_folder(part)))
            yield ResultLine(position, True, lost.model_dump_json())
        elif cancelled:
            items = items or parts.items(part)
            result = cancelled_result(meta, items[slot], bits.reached(position))
            yield ResultLine(position, True, result.model_dump_json())


def parts_with_failures(meta: JobMeta, bits: JobBits) -> Iterator[int]:
    """The parts that hold at least one failed (or, in a cancelled job, unfinished) item."""
    cancelled = meta.cancelled_at is not None
    for part in range(meta.parts):
        positions = meta.positions(part)
        unfinished = cancelled and not all(bit(bits.done, position) for position in positions)
        if unfinished or any_bit(bits.failed, positions):
            yield part
