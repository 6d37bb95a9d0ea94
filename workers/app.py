"""The Celery app of a worker process. Start it through `imgjobs worker --model NAME`, which
resolves the model and points the worker at that model's queue only.

The model is loaded once per pool process, at process start (worker_process_init), and stays
resident; this module-level state is what Celery's process model asks for.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

from celery import Celery
from celery.platforms import EX_FAILURE
from celery.signals import celeryd_init, setup_logging, worker_init, worker_process_init
from celery.worker import state as worker_state

from jobstate.rates import RateBook
from schemas.errors import ConfigError
from schemas.job import Priority
from schemas.messages import END_JOB_TASK, RUN_CHUNK_TASK, WORKER_MODEL_ENV, Chunk, JobEnd, WorkerModel
from schemas.settings import Settings, celery_config, worker_broker_url
from workers import events
from workers.observability import Observability, configure_logging, serve_metrics
from workers.rate_recorder import RateRecorder
from workers.remote_control import tell_main_process
from workers.runtime import WorkerRuntime

log = logging.getLogger("imgjobs.worker")
MODEL_LOAD_FAILED = signal.SIGUSR2
_model_load_failed = False  # in the main process, once a pool process said so

try:
    settings = Settings.from_env()
    broker_url = worker_broker_url(settings)
    settings = settings.model_copy(update={"broker_url": broker_url})
except ConfigError as exc:
    # Celery shows any error raised while importing `-A workers.app` as a traceback; a setting that is
    # missing or wrong gets one line and exit 2 instead, as from the imgjobs commands.
    print(f"error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

app = Celery("imgjobs-worker")
app.conf.update(celery_config(settings, broker_url))
app.conf.include = ["workers.tasks"]


def send_chunk(chunk: Chunk, queue: str, priority: Priority) -> None:
    """Queue a chunk (the next stage's) on its model's queue, at its job's priority."""
    app.send_task(RUN_CHUNK_TASK, **chunk.send_options(queue, priority))


def send_end(end: JobEnd) -> None:
    """Queue a job's end for the CPU workers."""
    app.send_task(END_JOB_TASK, **end.send_options())


@celeryd_init.connect
def _log_from_the_start(**_: Any) -> None:
    # Celery warns (a worker run as root) before it sets logging up: through our formatter too.
    configure_logging(settings.log_format)


@setup_logging.connect
def _configure_logging(loglevel: int | str | None = None, **_: Any) -> None:
    # Connecting here stops Celery from configuring logging itself: every line, Celery's too, goes
    # through our formatter (JSON by default) with the job and chunk ids of the chunk in hand.
    level = loglevel if isinstance(loglevel, int) else logging.getLevelName(str(loglevel or "INFO").upper())
    configure_logging(settings.log_format, level if isinstance(level, int) else logging.INFO)


@worker_init.connect
def _stop_failed_on_request(**_: Any) -> None:
    """In the main process: a pool process that cannot load the model sends MODEL_LOAD_FAILED, and the
    worker then shuts down as on SIGTERM (warm: the queue keeps every chunk) but exits 1, so that a
    supervisor sees the failure. Celery's own SIGTERM shutdown exits 0, and its cold one loses its exit
    code on the way out."""

    def stop_failed(*_: object) -> None:
        global _model_load_failed
        # Pool processes forked from here on see it, and exit instead of loading the model again.
        _model_load_failed = True
        worker_state.should_stop = EX_FAILURE  # what Celery's own shutdown handlers set, with our code

    signal.signal(MODEL_LOAD_FAILED, stop_failed)


def _tell_why(exc: Exception) -> None:
    """One line for whoever started the worker (`imgjobs run`), where it asked for one."""
    if settings.worker_failure_file is None:
        return
    model = os.environ.get(WORKER_MODEL_ENV, "")
    name = WorkerModel.model_validate_json(model).name if model else "?"
    first_line = (str(exc).strip().splitlines() or [""])[0]
    try:
        settings.worker_failure_file.write_text(
            f"model {name} cannot load: {type(exc).__name__}: {first_line}\n", encoding="utf-8"
        )
    except OSError:
        log.warning("cannot write %s", settings.worker_failure_file)


@worker_process_init.connect
def _load_model(**_: Any) -> None:
    if _model_load_failed:
        # The pool replaces the process that failed before the worker has stopped: once is enough to
        # fail (a 13 GB model takes minutes to fail again).
        os._exit(1)
    try:
        events.subscribe(Observability())  # first: loading the model raises events too (its adapters)
        ctx = WorkerRuntime.start(settings, send_chunk, send_end)
        tell_main_process(ctx.model.device)
        events.subscribe(RateRecorder(RateBook(ctx.store.client)))
        if settings.metrics_port:
            serve_metrics(settings.metrics_port)
    except Exception as exc:
        log.exception("cannot load the model; stopping the worker")
        _tell_why(exc)
        # A worker without its model would take chunks only to fail them. Stop the parent too, or it
        # would start another pool process that fails the same way, forever.
        os.kill(os.getppid(), MODEL_LOAD_FAILED)
        os._exit(1)
