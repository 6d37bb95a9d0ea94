"""The one model and the connections a worker process holds for its lifetime."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import ClassVar

from celery.exceptions import SoftTimeLimitExceeded

from jobstate.connection import WORKER, redis_client
from jobstate.store import JobStore
from schemas.errors import ConfigError
from schemas.messages import WORKER_MODEL_ENV, ChunkSender, JobEnd, WorkerModel
from schemas.settings import Settings
from workers.chunk import WorkerContext
from workers.job_end import EndContext

log = logging.getLogger("imgjobs.worker")
TIME_LIMITS = (SoftTimeLimitExceeded,)


class WorkerRuntime:
    _context: ClassVar[WorkerContext | None] = None

    @classmethod
    def start(
        cls, settings: Settings, send_chunk: ChunkSender, send_end: Callable[[JobEnd], None]
    ) -> WorkerContext:
        import torch

        from workers.models import apply_gpu_settings
        from workers.observability import route_library_logs
        from workers.warmup import load_model

        route_library_logs()  # before the model loads: loading logs too

        raw = os.environ.get(WORKER_MODEL_ENV)
        if not raw:
            raise ConfigError(
                f"{WORKER_MODEL_ENV} is not set; start workers with `imgjobs worker --model NAME`"
            )
        model = WorkerModel.model_validate_json(raw)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        apply_gpu_settings(settings, model.entry)
        started = time.perf_counter()
        loaded = load_model(model.name, model.entry, settings.model_cache)
        log.info(
            "model %s loaded from %s in %.1fs", model.name, model.entry.source, time.perf_counter() - started
        )
        assert settings.broker_url is not None
        client = redis_client(settings.broker_url, WORKER)
        cls._context = WorkerContext(
            model=loaded,
            settings=settings,
            store=JobStore(client),
            send_chunk=send_chunk,
            send_end=send_end,
            time_limits=TIME_LIMITS,
        )
        return cls._context

    @classmethod
    def context(cls) -> WorkerContext:
        if cls._context is None:
            raise ConfigError("the worker's model is not loaded (worker_process_init did not run)")
        return cls._context

    @classmethod
    def end_context(cls) -> EndContext:
        ctx = cls.context()
        return EndContext(store=ctx.store, settings=ctx.settings, open_storage=ctx.open_storage)
