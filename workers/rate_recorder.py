"""Records what each chunk's pipeline calls took, by model and shape, into the rates the producer's
`submit --dry-run` estimates from (jobstate/rates.py). An event listener (workers/events.py): it sees
each item's record of the stage the chunk ran, which carries the item's share of its call's time."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import redis

from jobstate.rates import RateBook, RateSample, shape_of
from schemas.messages import ItemResult, StageRecord
from workers.events import ChunkInfo, EngineEvents

log = logging.getLogger(__name__)


class RateRecorder(EngineEvents):
    def __init__(self, book: RateBook) -> None:
        self.book = book
        self._lock = threading.Lock()
        # (model, shape) -> items, UNet evaluations, seconds
        self._pending: dict[tuple[str, str], list[float]] = {}

    def chunk_started(self, chunk: ChunkInfo) -> None:
        with self._lock:
            self._pending.clear()  # a chunk that stopped without chunk_done: its share is not counted

    def items_handed_over(self, chunk: ChunkInfo, records: Sequence[StageRecord]) -> None:
        self._add(chunk, records)

    def items_finished(self, chunk: ChunkInfo, results: Sequence[ItemResult]) -> None:
        self._add(chunk, [record for result in results for record in result.stages[-1:]])

    def chunk_done(self, chunk: ChunkInfo, elapsed_s: float, busy_s: float, unet_s: float) -> None:
        with self._lock:
            samples = [
                RateSample(model, shape, int(items), int(evaluations), seconds)
                for (model, shape), (items, evaluations, seconds) in self._pending.items()
            ]
            self._pending.clear()
        if samples:
            try:
                self.book.add(samples)
            except redis.RedisError as exc:  # an estimate's input, never worth failing a chunk over
                log.warning("rates of chunk %s not recorded: %s", chunk.chunk_id, exc)

    def _add(self, chunk: ChunkInfo, records: Sequence[StageRecord]) -> None:
        stage_type = chunk.stage.partition("-")[2]
        with self._lock:
            for record in records:
                seconds = record.timings.get("infer_s")
                if record.name != chunk.stage or seconds is None:
                    continue  # an earlier stage's record, or an item that failed before its call
                totals = self._pending.setdefault(
                    (record.model, shape_of(stage_type, record.params.size)), [0, 0, 0.0]
                )
                totals[0] += 1
                totals[1] += record.unet_evaluations or 0
                totals[2] += seconds
