"""The producer side's broker: IMGJOBS_BROKER_URL, checked, and a Celery app that sends tasks by name.
Redis clients are built in jobstate/connection.py, as the workers build theirs."""

from __future__ import annotations

import os
import sys

from celery import Celery

from schemas.errors import ConfigError
from schemas.messages import JOB_END_QUEUE, WORKER_MODEL_ENV, WorkerModel
from schemas.registry import ResolvedModel
from schemas.settings import Settings, celery_config, redact_url


def require_broker_url(settings: Settings) -> str:
    if not settings.broker_url:
        raise ConfigError(
            "no broker configured: set IMGJOBS_BROKER_URL=redis://host:6379/0 (or use `imgjobs run`)"
        )
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        raise ConfigError(
            f"IMGJOBS_BROKER_URL must be redis:// or rediss://, got {redact_url(settings.broker_url)}"
        )
    return settings.broker_url


def producer_app(settings: Settings, broker_url: str) -> Celery:
    app = Celery("imgjobs-producer")
    app.conf.update(celery_config(settings, broker_url))
    return app


def celery_command(app_module: str, *arguments: str) -> list[str]:
    """The argv of Celery's own command line on the app in `app_module`."""
    return [sys.executable, "-m", "celery", "-A", app_module, *arguments]


def worker_arguments(queues: str, pool: str, loglevel: str, hostname: str | None = None) -> list[str]:
    """`celery worker`'s arguments for one task at a time from `queues`, with no gossip or mingle
    (nothing here asks other workers for their state at start)."""
    named = ["--hostname", hostname] if hostname else []
    return [
        "worker",
        *("--queues", queues, "--concurrency", "1", "--pool", pool, *named),
        *("--without-gossip", "--without-mingle", "--loglevel", loglevel),
    ]


def worker_node(model: ResolvedModel, pid: int) -> str:
    """The Celery node name of the `imgjobs worker` of `model` whose process is `pid`, as it answers
    `imgjobs workers`; Celery puts the host's name in place of %h."""
    return f"{model.queue}.{pid}@%h"


def worker_command(
    model: ResolvedModel, loglevel: str, quiet: bool = False
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of `imgjobs worker`'s Celery worker: it loads `model` and consumes its
    queue alone, and, for the `cpu` model, jobs' ends, so that no GPU waits on them. `quiet`: without
    Celery's banner, which is text on stdout (a JSON log has only JSON lines)."""
    queues = f"{model.queue},{JOB_END_QUEUE}" if model.name == "cpu" else model.queue
    hostname = worker_node(model, os.getpid())  # this process becomes the worker (execve)
    banner = ["--quiet"] if quiet else []
    argv = celery_command("workers.app", *banner, *worker_arguments(queues, "prefork", loglevel, hostname))
    resolved = WorkerModel(name=model.name, entry=model.entry).model_dump_json()
    return argv, dict(os.environ) | {WORKER_MODEL_ENV: resolved}
