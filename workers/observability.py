"""What a worker tells operators: Prometheus metrics and structured logs that carry job, chunk and
item ids.

Metrics live in the pool process, where chunks run, and are served from there on
IMGJOBS_METRICS_PORT. Items/s is `rate(imgjobs_items_total[1m])`; GPU duty cycle is
`rate(imgjobs_busy_seconds_total[1m])`, and `imgjobs_duty_cycle` gives the same over the last minute.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from pythonjsonlogger.json import JsonFormatter

ITEMS = Counter("imgjobs_items_total", "Items through a stage", ["model", "stage", "status"])
FAILURES = Counter("imgjobs_failures_total", "Failed items by reason", ["model", "stage", "reason"])
STAGE_SECONDS = Histogram(
    "imgjobs_stage_seconds",
    "Seconds one item spent in a stage (fetch, its share of the batched call, write)",
    ["model", "stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
BUSY_SECONDS = Counter("imgjobs_busy_seconds_total", "Seconds spent in pipeline calls", ["model"])
DUTY_CYCLE = Gauge("imgjobs_duty_cycle", "Fraction of the last minute spent in pipeline calls", ["model"])
GPU_MEMORY = Gauge("imgjobs_gpu_memory_bytes", "CUDA memory of this worker's process", ["kind"])

DUTY_WINDOW_S = 60.0

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "imgjobs_log_context", default=None
)


class _Duty:
    """Busy intervals of the last minute, for the duty-cycle gauge, with their sum kept as they come
    and go rather than summed on every call."""

    def __init__(self) -> None:
        self.intervals: deque[tuple[float, float]] = deque()
        self.busy_s = 0.0

    def add(self, model: str, busy_s: float) -> None:
        now = time.monotonic()
        self.intervals.append((now, busy_s))
        self.busy_s += busy_s
        while self.intervals and self.intervals[0][0] < now - DUTY_WINDOW_S:
            self.busy_s -= self.intervals.popleft()[1]
        DUTY_CYCLE.labels(model).set(min(1.0, max(0.0, self.busy_s) / DUTY_WINDOW_S))


_duty = _Duty()


def record_stage(model: str, stage: str, timings: dict[str, float]) -> None:
    STAGE_SECONDS.labels(model, stage).observe(sum(timings.values()))


def record_busy(model: str, seconds: float) -> None:
    BUSY_SECONDS.labels(model).inc(seconds)
    _duty.add(model, seconds)


def record_item(model: str, stage: str, status: str, reason: str | None = None, count: int = 1) -> None:
    ITEMS.labels(model, stage, status).inc(count)
    if reason:
        FAILURES.labels(model, stage, reason).inc(count)


def record_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        GPU_MEMORY.labels("allocated").set(torch.cuda.memory_allocated())
        GPU_MEMORY.labels("reserved").set(torch.cuda.memory_reserved())


def serve_metrics(port: int) -> None:
    start_http_server(port)


@contextmanager
def log_context(**fields: str) -> Iterator[None]:
    """Fields added to every log record written inside the block (job_id, chunk_id, stage, ...)."""
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        _context.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_context.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{processName}{message}",
                style="{",
                rename_fields={"levelname": "level"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
