"""torch.compile's compilations as engine events (`compiled`), so that a recompilation inside a chunk
(a shape the warm-up did not cover: another size, guidance at or below 1 without its CFG pair, a
batch halved after running out of memory, a weighted prompt over 77 tokens) and dynamo's silent
fallback to uncompiled code past its recompile limit are seen in metrics and logs, and by tests.

The source is dynamo's own record, one entry per compilation attempt, those refused at the recompile
limit included (torch._dynamo.utils.get_compilation_metrics, kept for the last 64 attempts). Its
compile-start and compile-end callbacks (torch._dynamo.callback) carry no reason and do not run for a
refused one. The record is read after every pipeline call (the engine's call_done event) and after a
model's load and warm-up, so each compilation is reported with the chunk, if any, it stalled.
"""

from __future__ import annotations

import threading
from typing import Any

from workers.events import ChunkInfo, CompileInfo, EngineEvents, emit

# How dynamo words a compilation refused at its recompile limit (torch 2.11 to 2.13).
LIMIT_MARK = "recompile limit"


def _records() -> list[Any]:
    from torch._dynamo.utils import get_compilation_metrics

    return [record for record in get_compilation_metrics() if not getattr(record, "is_runtime", False)]


def _key(record: Any) -> tuple[Any, ...]:
    return (getattr(record, "compile_id", None), getattr(record, "start_time_us", None), id(record))


def describe(record: Any, model: str) -> CompileInfo:
    name = getattr(record, "co_name", None)
    where = f"{getattr(record, 'co_filename', '?')}:{getattr(record, 'co_firstlineno', '?')}"
    failure = f"{getattr(record, 'fail_type', '') or ''} {getattr(record, 'fail_reason', '') or ''}"
    return CompileInfo(
        model=model,
        compile_id=str(getattr(record, "compile_id", None) or "?"),
        function=f"{name} ({where})" if name else "a compiled function",
        seconds=float(getattr(record, "entire_frame_compile_time_s", None) or 0.0),
        reason=getattr(record, "recompile_reason", None),
        fell_back=LIMIT_MARK in failure.lower(),
    )


class CompileWatch(EngineEvents):
    """Reports each compilation once; one per process (watch())."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: set[tuple[Any, ...]] = {_key(record) for record in _records()}

    def skip(self) -> None:
        """What was compiled so far is not this watch's to report (another pipeline's, in a bench)."""
        with self._lock:
            self._seen = {_key(record) for record in _records()}

    def report(self, model: str, chunk: ChunkInfo | None) -> list[CompileInfo]:
        """The compilations since the last report, raised as `compiled` events, with `chunk` (None: at
        the model's load and warm-up)."""
        with self._lock:
            records = _records()
            fresh = [record for record in records if _key(record) not in self._seen]
            self._seen = {_key(record) for record in records}
        compiled = [describe(record, model) for record in fresh]
        for info in compiled:
            emit.compiled(chunk, info)
        return compiled

    def call_done(self, chunk: ChunkInfo, items: int, busy_s: float) -> None:
        self.report(chunk.model, chunk)


_watch_lock = threading.Lock()


def watch() -> CompileWatch:
    """The process's watch: the one subscribed to the engine's events (emit), subscribed on first use
    (by a model that compiles), and again after the hub was reset."""
    with _watch_lock:
        found = emit.listening(CompileWatch)
        if found is None:
            found = CompileWatch()
            emit.subscribe(found)
        return found
