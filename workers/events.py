"""What the chunk engine and the job's end report as they run: hooks that listeners subscribe to.

workers/observability.py turns them into metrics and log lines in every worker; tests and
benchmarks subscribe their own listeners to see what happened, instead of reading logs or
reaching into the engine:

    with subscribed(listener):
        ...   # every event raised in this process meanwhile reaches listener

A listener subclasses EngineEvents and overrides the hooks it wants; each hook runs in the thread
that raised the event, and an exception in a listener is logged, never raised into the work.
Listeners live on an EventHub, not in module state: `emit` is the process's hub (subscribe,
unsubscribe and subscribed here are its own), and emit.reset() leaves it with none (the tests do
so after each test, so that no listener outlives the test that subscribed it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from schemas.messages import ItemResult, StageRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkInfo:
    job_id: str
    chunk_id: str
    model: str
    stage: str  # s0-img2img, ...
    items: int  # items this run of the chunk works on (those finished before are skipped)
    delivery: int


@dataclass(frozen=True)
class CompileInfo:
    """One compilation by torch.compile (dynamo), as workers/compiles.py reads it."""

    model: str
    compile_id: str  # dynamo's "frame/count": "0/0" a function's first compilation, "0/1" its second
    function: str  # the compiled function: name (file:line)
    seconds: float
    reason: str | None  # a recompilation's failed guard (a new shape, ...); None for a first compilation
    fell_back: bool  # refused at dynamo's recompile limit: such inputs now run uncompiled, slowly


class EngineEvents:
    """Every hook, doing nothing."""

    def chunk_started(self, chunk: ChunkInfo) -> None:
        """The chunk runs `chunk.items` items."""

    def call_done(self, chunk: ChunkInfo, items: int, busy_s: float) -> None:
        """One pipeline call of `items` items took `busy_s` seconds."""

    def items_finished(self, chunk: ChunkInfo, results: Sequence[ItemResult]) -> None:
        """Items recorded as finished (succeeded or failed) by this chunk, now."""

    def items_handed_over(self, chunk: ChunkInfo, records: Sequence[StageRecord]) -> None:
        """Items handed to the next stage, one record of this stage each."""

    def chunk_done(self, chunk: ChunkInfo, elapsed_s: float, busy_s: float, unet_s: float) -> None:
        """The chunk's run ended after `elapsed_s`, `busy_s` of them inside pipeline calls (host time: on a
        GPU a call may return before its kernels ran), and `unet_s` inside the UNet (on a GPU, the time
        its kernels took, by CUDA events): `unet_s / elapsed_s` is the chunk's unet_share."""

    def chunk_retried(self, chunk_id: str, error: Exception, countdown_s: float) -> None:
        """The chunk stopped on a retryable error and runs again in `countdown_s` seconds."""

    def job_ended(self, job_id: str, seconds: float, error: str | None) -> None:
        """The job's end (results.jsonl, the report) was written, or failed for good with `error`."""

    def adapter_loaded(self, model: str, source: str, seconds: float) -> None:
        """The model loaded the LoRA adapter at `source`, once, in `seconds`."""

    def adapters_switched(self, model: str, active: Sequence[str], seconds: float) -> None:
        """The model switched to the adapter set `active` (their sources; empty: none)."""

    def compiled(self, chunk: ChunkInfo | None, compilation: CompileInfo) -> None:
        """torch.compile compiled (or, past its limit, refused to compile) during a call of `chunk`,
        which waited for it; None: while the model loaded and warmed up."""

    def scheduler_built(self, model: str, sampler: str, pipeline: str) -> None:
        """The model built the scheduler of `sampler` ("dpmpp_2m karras", or "own": the checkpoint's)
        for its pipeline of class `pipeline`, from the checkpoint's scheduler config: once each."""

    def sampler_switched(self, model: str, sampler: str, pipeline: str) -> None:
        """The model's pipeline of class `pipeline` now runs `sampler` (as in scheduler_built)."""


Listener = TypeVar("Listener", bound=EngineEvents)


class EventHub(EngineEvents):
    """Raises each event at every listener subscribed to it. Each hub holds its own listeners: `emit`
    is the process's, which the engine, the recorder, the tasks and the job's end raise events on;
    reset() drops every listener (a test's fresh start)."""

    def __init__(self) -> None:
        self._listeners: list[EngineEvents] = []
        self._lock = threading.Lock()

    def subscribe(self, listener: EngineEvents) -> None:
        with self._lock:
            self._listeners.append(listener)

    def unsubscribe(self, listener: EngineEvents) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    @contextmanager
    def subscribed(self, listener: Listener) -> Iterator[Listener]:
        self.subscribe(listener)
        try:
            yield listener
        finally:
            self.unsubscribe(listener)

    def listening(self, kind: type[Listener]) -> Listener | None:
        """The first listener of this class subscribed, if any."""
        with self._lock:
            return next((listener for listener in self._listeners if isinstance(listener, kind)), None)

    def reset(self) -> None:
        with self._lock:
            self._listeners.clear()

    def _each(self, call: Callable[[EngineEvents], None]) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                call(listener)
            except Exception:
                log.exception("event listener %s failed", type(listener).__name__)

    def chunk_started(self, chunk: ChunkInfo) -> None:
        self._each(lambda listener: listener.chunk_started(chunk))

    def call_done(self, chunk: ChunkInfo, items: int, busy_s: float) -> None:
        self._each(lambda listener: listener.call_done(chunk, items, busy_s))

    def items_finished(self, chunk: ChunkInfo, results: Sequence[ItemResult]) -> None:
        self._each(lambda listener: listener.items_finished(chunk, results))

    def items_handed_over(self, chunk: ChunkInfo, records: Sequence[StageRecord]) -> None:
        self._each(lambda listener: listener.items_handed_over(chunk, records))

    def chunk_done(self, chunk: ChunkInfo, elapsed_s: float, busy_s: float, unet_s: float) -> None:
        self._each(lambda listener: listener.chunk_done(chunk, elapsed_s, busy_s, unet_s))

    def chunk_retried(self, chunk_id: str, error: Exception, countdown_s: float) -> None:
        self._each(lambda listener: listener.chunk_retried(chunk_id, error, countdown_s))

    def job_ended(self, job_id: str, seconds: float, error: str | None) -> None:
        self._each(lambda listener: listener.job_ended(job_id, seconds, error))

    def adapter_loaded(self, model: str, source: str, seconds: float) -> None:
        self._each(lambda listener: listener.adapter_loaded(model, source, seconds))

    def adapters_switched(self, model: str, active: Sequence[str], seconds: float) -> None:
        self._each(lambda listener: listener.adapters_switched(model, active, seconds))

    def compiled(self, chunk: ChunkInfo | None, compilation: CompileInfo) -> None:
        self._each(lambda listener: listener.compiled(chunk, compilation))

    def scheduler_built(self, model: str, sampler: str, pipeline: str) -> None:
        self._each(lambda listener: listener.scheduler_built(model, sampler, pipeline))

    def sampler_switched(self, model: str, sampler: str, pipeline: str) -> None:
        self._each(lambda listener: listener.sampler_switched(model, sampler, pipeline))


# The process's hub.
emit = EventHub()
subscribe = emit.subscribe
unsubscribe = emit.unsubscribe
subscribed = emit.subscribed
