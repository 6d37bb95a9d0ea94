"""Recording what one run of a chunk made: finished items into a results part and then done in
Redis; items for the next stage into a handover part, the next stage's chunk, and then handed over
in Redis.

The order is what keeps work from being lost or done twice: a result is in storage before its item
counts as done, and a handover is queued before its items count as handed over. A crash in between
runs the items again at this stage, and the rows or chunks that repeat are passed over (the latest
attempt's row wins; the next stage skips items it finished).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence

from jobstate import layout
from jobstate.bits import mask
from jobstate.meta import JobMeta
from jobstate.parts import Attempt, HandoverItem, JobParts
from jobstate.storage import Storage
from jobstate.store import JobStore
from schemas.errors import StorageError
from schemas.messages import Chunk, ChunkId, ChunkSender, ItemResult
from workers.engine import WorkItem
from workers.events import ChunkInfo, emit

log = logging.getLogger(__name__)


def _digest(slots: Sequence[int]) -> str:
    """Names a handover by its items. A run stopped part-way (a storage outage) hands over what it
    finished, and its retry the rest: these must not share a chunk id, or the next stage counts the
    second as a redelivery of the first. The same items handed over twice (a redelivered parent) get
    the same id, and the next stage skips what it finished."""
    return hashlib.sha256(",".join(map(str, slots)).encode()).hexdigest()[:12]


def _reason(done: Sequence[tuple[WorkItem, ItemResult]], exc: StorageError) -> str:
    """Why items failed, for the job's end to tell in place of their rows: their own error (mostly
    the same storage's), and the write of the rows that failed too."""
    errors = [result.error.message for _, result in done if result.error is not None]
    if errors and str(exc) not in errors[0]:
        return f"{errors[0]}; writing the failure failed too: {exc}"
    return f"{errors[0] if errors else exc}; the failure could not be written either"


class ChunkRecorder:
    """The engine's Sink for one run of one chunk."""

    def __init__(
        self,
        store: JobStore,
        parts: JobParts,
        storage: Storage,
        meta: JobMeta,
        chunk: Chunk,
        attempt: Attempt,
        info: ChunkInfo,
        send_chunk: ChunkSender,
    ) -> None:
        self.store = store
        self.parts = parts
        self.storage = storage
        self.meta = meta
        self.chunk = chunk
        self.plan = meta.recipe[chunk.stage_index]
        self.attempt = attempt
        self.info = info
        self.send_chunk = send_chunk
        self.open: dict[int, WorkItem] = {}  # this run's items not yet recorded nor handed over
        self.handed: list[tuple[WorkItem, HandoverItem]] = []  # to hand over when the run ends
        self.stopped = False
        # A short tag of the chunk, so rows of two chunks of one part never share a file name.
        self.tag = hashlib.sha256(chunk.chunk_id.encode()).hexdigest()[:6]

    def expect(self, items: Sequence[WorkItem]) -> None:
        self.open = {work.slot: work for work in items}

    # -- the Sink

    def finished(self, done: Sequence[tuple[WorkItem, ItemResult]]) -> None:
        self._record(done, f"{self.tag}-c{done[0][0].slot}", must_write=True)

    def handed_over(self, handed: Sequence[tuple[WorkItem, HandoverItem]]) -> None:
        self.handed.extend(handed)

    def should_stop(self) -> bool:
        if not self.stopped and self.store.standing(self.chunk) != "open":
            self.stopped = True
        return self.stopped

    # -- recording

    def _record(self, done: Sequence[tuple[WorkItem, ItemResult]], tag: str, must_write: bool) -> None:
        rows = [(work.slot, result) for work, result in done]
        try:
            self.parts.put_results(self.chunk.part, self.attempt, tag, rows)
        except StorageError as exc:
            if must_write:
                raise  # the chunk runs again, these items with it
            # Failing items for good with no store to write to: they still end, and the job's end
            # tells their failure from this note (a disk full: "No space left on device" and where).
            log.warning(
                "chunk %s: failures of %d item(s) not written: %s", self.chunk.chunk_id, len(rows), exc
            )
            self.store.note_unrecorded(self.chunk, _reason(done, exc))
        outcomes = [(work.position, result.status == "failed") for work, result in done]
        standing, moved = self.store.finish_items(self.chunk, self.plan.name, outcomes)
        self.stopped = self.stopped or standing != "open"
        recorded = [result for (work, result), first in zip(done, moved, strict=True) if first]
        for work, _ in done:
            self.open.pop(work.slot, None)
        for result in recorded:
            self._delete_handover_files(result.id)
        if recorded:
            emit.items_finished(self.info, recorded)

    def _delete_handover_files(self, item_id: str) -> None:
        """Files earlier stages wrote only for the next one go once the item is finished, never
        before; a failure to delete them costs some storage, never the item."""
        try:
            for plan in self.meta.recipe[: self.chunk.stage_index]:
                for kind in plan.writes:
                    if kind not in plan.save:
                        self.storage.delete(layout.output_key(item_id, plan, kind))
        except StorageError as exc:
            log.warning("item %s: handover files not deleted: %s", item_id, exc, extra={"item_id": item_id})

    def close(self) -> None:
        """Hand over what this run finished for the next stage: its handover part, then its chunk,
        then the mark in Redis."""
        if not self.handed:
            return
        handed, self.handed = self.handed, []
        next_index = self.chunk.stage_index + 1
        slots = [work.slot for work, _ in handed]
        digest = _digest(slots)
        key = self.parts.put_handover(self.chunk.part, next_index, digest, [item for _, item in handed])
        next_chunk = self.chunk.model_copy(
            update={
                "chunk_id": str(ChunkId.parse(self.chunk.chunk_id).handed_over(next_index, digest)),
                "stage_index": next_index,
                "slots": mask(slots, len(self.meta.positions(self.chunk.part))),
                "handover_part": key,
            }
        )
        self.send_chunk(next_chunk, self.meta.recipe[next_index].model.queue, self.meta.spec.priority)
        self.store.hand_over(self.chunk, self.plan.name, [work.position for work, _ in handed])
        for work, _ in handed:
            self.open.pop(work.slot, None)
        emit.items_handed_over(self.info, [item.stages[-1] for _, item in handed])

    def fail_open(self, result_of: Callable[[WorkItem], ItemResult]) -> None:
        """Fail every item of this run not recorded nor handed over yet (the chunk gives up)."""
        if self.open:
            done = [(work, result_of(work)) for work in sorted(self.open.values(), key=lambda w: w.slot)]
            self._record(done, f"{self.tag}-f{done[0][0].slot}", must_write=False)
