"""What a worker tells operators: Prometheus metrics and structured logs that carry job, chunk and
item ids.

Metrics live in the pool process, where chunks run, and are served from there on
IMGJOBS_METRICS_PORT. Items/s is `rate(imgjobs_items_total[1m])`; GPU duty cycle is
`rate(imgjobs_busy_seconds_total[1m])`, and `imgjobs_duty_cycle` gives the same over the last minute.
The duty cycle counts a pipeline call as busy from start to end, diffusers' host work included; the
share of the time inside the UNet, `rate(imgjobs_unet_seconds_total[1m])` or `imgjobs_unet_share`,
says how well the GPU is fed (workers/unet_clock.py).
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from pythonjsonlogger.json import JsonFormatter

from schemas.messages import ItemResult, StageRecord
from workers.events import ChunkInfo, CompileInfo, EngineEvents

ITEMS = Counter("imgjobs_items_total", "Items through a stage", ["model", "stage", "status"])
FAILURES = Counter("imgjobs_failures_total", "Failed items by reason", ["model", "stage", "reason"])
STAGE_SECONDS = Histogram(
    "imgjobs_stage_seconds",
    "Seconds one item spent in a stage (fetch, its share of the batched call, write)",
    ["model", "stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
CHUNKS = Counter(
    "imgjobs_chunks_total",
    "Chunk runs with items to run (a redelivered or retried chunk counts again)",
    ["model", "stage"],
)
CHUNK_RETRIES = Counter(
    "imgjobs_chunk_retries_total", "Chunk runs stopped by an error that may pass, to run again after a wait"
)
BUSY_SECONDS = Counter("imgjobs_busy_seconds_total", "Seconds spent in pipeline calls", ["model"])
ADAPTER_LOADS = Counter(
    "imgjobs_adapter_loads_total", "LoRA adapters loaded (each once per process)", ["model"]
)
ADAPTER_SWITCHES = Counter(
    "imgjobs_adapter_switches_total", "Switches of the active LoRA adapter set", ["model"]
)
UNET_SECONDS = Counter(
    "imgjobs_unet_seconds_total", "Seconds inside the UNet (on a GPU, its kernels' time)", ["model"]
)
DUTY_CYCLE = Gauge("imgjobs_duty_cycle", "Fraction of the last minute spent in pipeline calls", ["model"])
UNET_SHARE = Gauge("imgjobs_unet_share", "Fraction of the last minute spent inside the UNet", ["model"])
GPU_MEMORY = Gauge("imgjobs_gpu_memory_bytes", "CUDA memory of this worker's process", ["kind"])
COMPILES = Counter(
    "imgjobs_compiles_total",
    "torch.compile compilations, at load and warm-up or inside a chunk (a shape the warm-up missed)",
    ["model", "during"],
)
COMPILE_SECONDS = Counter(
    "imgjobs_compile_seconds_total", "Seconds spent compiling, at load or inside chunks", ["model", "during"]
)
COMPILE_FALLBACKS = Counter(
    "imgjobs_compile_fallbacks_total",
    "Compilations refused at dynamo's recompile limit: those inputs run uncompiled",
    ["model"],
)
JOB_END_SECONDS = Histogram(
    "imgjobs_job_end_seconds",
    "Seconds a job's end took (results.jsonl, the report)",
    buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300),
)

DUTY_WINDOW_S = 60.0
MAX_LOG_MESSAGE_CHARS = 4096

log = logging.getLogger("imgjobs.worker")

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "imgjobs_log_context", default=None
)


class _Window:
    """Seconds of the last minute (busy, or inside the UNet) per model, for a gauge of their share, with
    their sum kept as they come and go rather than summed on every call."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self.intervals: dict[str, deque[tuple[float, float]]] = {}
        self.seconds: dict[str, float] = {}

    def add(self, model: str, seconds: float) -> None:
        now = time.monotonic()
        intervals = self.intervals.setdefault(model, deque())
        intervals.append((now, seconds))
        total = self.seconds.get(model, 0.0) + seconds
        while intervals and intervals[0][0] < now - DUTY_WINDOW_S:
            total -= intervals.popleft()[1]
        self.seconds[model] = total
        self.gauge.labels(model).set(min(1.0, max(0.0, total) / DUTY_WINDOW_S))


class Observability(EngineEvents):
    """The engine's events as Prometheus metrics and log lines; every worker subscribes one. The metrics
    are the process's (Prometheus' registry); the last minute's shares are this listener's own."""

    def __init__(self) -> None:
        self._duty = _Window(DUTY_CYCLE)
        self._unet = _Window(UNET_SHARE)

    def chunk_started(self, chunk: ChunkInfo) -> None:
        CHUNKS.labels(chunk.model, chunk.stage).inc()

    def items_finished(self, chunk: ChunkInfo, results: Sequence[ItemResult]) -> None:
        for result in results:
            ITEMS.labels(chunk.model, chunk.stage, result.status).inc()
            if result.stages:
                STAGE_SECONDS.labels(chunk.model, chunk.stage).observe(
                    sum(result.stages[-1].timings.values())
                )
            if result.error:
                FAILURES.labels(chunk.model, chunk.stage, result.error.type).inc()
                log.warning(
                    "item %s failed: %s: %s",
                    result.id,
                    result.error.type,
                    result.error.message,
                    extra={"item_id": result.id, "reason": result.error.type},
                )

    def items_handed_over(self, chunk: ChunkInfo, records: Sequence[StageRecord]) -> None:
        ITEMS.labels(chunk.model, chunk.stage, "handed_over").inc(len(records))
        for record in records:
            STAGE_SECONDS.labels(chunk.model, chunk.stage).observe(sum(record.timings.values()))

    def chunk_done(self, chunk: ChunkInfo, elapsed_s: float, busy_s: float, unet_s: float) -> None:
        BUSY_SECONDS.labels(chunk.model).inc(busy_s)
        UNET_SECONDS.labels(chunk.model).inc(unet_s)
        self._duty.add(chunk.model, busy_s)
        self._unet.add(chunk.model, unet_s)
        duty = busy_s / elapsed_s if elapsed_s else 0.0
        unet_share = unet_s / elapsed_s if elapsed_s else 0.0
        log.info(
            "chunk %s: %d item(s), %.3f s; pipeline busy %.3f s (duty cycle %.0f%%), "
            "UNet %.3f s (unet share %.0f%%)",
            chunk.chunk_id,
            chunk.items,
            elapsed_s,
            busy_s,
            100 * duty,
            unet_s,
            100 * unet_share,
            extra={
                "busy_s": round(busy_s, 4),
                "elapsed_s": round(elapsed_s, 4),
                "duty_cycle": round(duty, 4),
                "unet_s": round(unet_s, 4),
                "unet_share": round(unet_share, 4),
            },
        )

    def compiled(self, chunk: ChunkInfo | None, compilation: CompileInfo) -> None:
        during = "load" if chunk is None else "chunk"
        COMPILES.labels(compilation.model, during).inc()
        COMPILE_SECONDS.labels(compilation.model, during).inc(compilation.seconds)
        why = f" ({compilation.reason})" if compilation.reason else ""
        if compilation.fell_back:
            COMPILE_FALLBACKS.labels(compilation.model).inc()
            log.warning(
                "model %s: %s hit dynamo's recompile limit and runs uncompiled from now on%s",
                compilation.model,
                compilation.function,
                why,
                extra={"compile_id": compilation.compile_id},
            )
        elif chunk is not None:
            # The chunk waited for it: a shape the warm-up did not cover (models.yaml: warmup_size,
            # warmup_guidance, static_batch).
            log.warning(
                "chunk %s: compiled %s in %.1f s%s",
                chunk.chunk_id,
                compilation.function,
                compilation.seconds,
                why,
                extra={"compile_id": compilation.compile_id, "compile_s": round(compilation.seconds, 2)},
            )
        else:
            log.info(
                "model %s: compiled %s in %.1f s",
                compilation.model,
                compilation.function,
                compilation.seconds,
                extra={"compile_id": compilation.compile_id},
            )

    def chunk_retried(self, chunk_id: str, error: Exception, countdown_s: float) -> None:
        CHUNK_RETRIES.inc()
        log.warning("chunk %s: %s; running it again in %.1f s", chunk_id, error, countdown_s)

    def job_ended(self, job_id: str, seconds: float, error: str | None) -> None:
        JOB_END_SECONDS.observe(seconds)

    def adapter_loaded(self, model: str, source: str, seconds: float) -> None:
        ADAPTER_LOADS.labels(model).inc()
        log.info("model %s: loaded LoRA %s in %.2fs", model, source, seconds)

    def adapters_switched(self, model: str, active: Sequence[str], seconds: float) -> None:
        ADAPTER_SWITCHES.labels(model).inc()
        log.info("model %s: adapters %s (%.3fs)", model, ", ".join(active) or "none", seconds)


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


class _BoundedMessages(logging.Filter):
    """Cuts a record's message to MAX_LOG_MESSAGE_CHARS: a library may log a whole input (diffusers
    logs the part of a prompt it cuts off, which a manifest line may make a megabyte long)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > MAX_LOG_MESSAGE_CHARS:
            more = len(message) - MAX_LOG_MESSAGE_CHARS
            record.msg = f"{message[:MAX_LOG_MESSAGE_CHARS]}… ({more} more characters)"
            record.args = None
        return True


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
    handler.addFilter(_BoundedMessages())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Python's warnings (warnings.warn) as records of the `py.warnings` logger, rather than text on stderr.
    logging.captureWarnings(True)


def route_library_logs() -> None:
    """diffusers and transformers log through handlers of their own, straight to stderr, past the
    worker's format: their records go to the root logger's handler instead, at their own levels
    (warnings and up, unless their verbosity is changed). Their progress bars, which would write
    lines of their own while a model loads, are off."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging
    from huggingface_hub.utils.tqdm import disable_progress_bars

    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()
        library.disable_progress_bar()
    disable_progress_bars()
