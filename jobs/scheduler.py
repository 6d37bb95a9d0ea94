"""Scheduled pipelines: Celery beat fires each entry of the schedules file (IMGJOBS_SCHEDULES), and
a firing submits a job for the source's images not processed before.

RedBeat keeps the schedule and its last run in Redis, so restarting beat neither loses nor repeats
a firing. Each object is remembered by URI and ETag (or content hash) once its job is submitted;
a firing that dies before remembering them submits the same items again next time, which gives
the same job id, so nothing runs twice (unless the job was pruned meanwhile). With
`keep_finished_jobs_for` in the file, beat also prunes finished jobs, hourly.

    imgjobs schedule beat      Celery beat with RedBeat
    imgjobs schedule worker    runs the firings (a small producer-side Celery worker, no torch)
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from celery import Celery
from celery.schedules import crontab
from pydantic import ValidationError

from jobs.broker import connect_redis, require_broker_url
from jobs.producer import prepared, submit
from jobs.registry import Registry
from jobs.sources import item_id_for, list_versions
from jobstate import keys
from jobstate.store import JobStore
from schemas.errors import ConfigError
from schemas.schedule import ScheduleEntry, SchedulesFile
from schemas.settings import Settings, celery_config

log = logging.getLogger("imgjobs.schedule")

FIRE_TASK = "imgjobs.fire_schedule"
PRUNE_TASK = "imgjobs.prune_jobs"
SCHEDULE_QUEUE = "imgjobs.schedules"
# Not a valid schedule name (those have no ':'), so it never shadows an entry of the file.
PRUNE_ENTRY = "imgjobs:prune"
PRUNE_EVERY = timedelta(hours=1)


def load_schedules(settings: Settings) -> SchedulesFile:
    if settings.schedules is None:
        raise ConfigError("no schedules file: set IMGJOBS_SCHEDULES=/path/to/schedules.yaml")
    try:
        raw = yaml.safe_load(settings.schedules.read_text(encoding="utf-8")) or {}
        return SchedulesFile.model_validate(raw)
    except OSError as exc:
        raise ConfigError(f"cannot read {settings.schedules}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{settings.schedules} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{settings.schedules} is not valid YAML: {exc}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"])
        raise ConfigError(f"{settings.schedules}: {where}: {err['msg']}") from None


def entry_named(schedules: SchedulesFile, name: str) -> ScheduleEntry:
    for entry in schedules.schedules:
        if entry.name == name:
            return entry
    known = ", ".join(entry.name for entry in schedules.schedules) or "none"
    raise ConfigError(f"no schedule {name!r}; known: {known}")


def fire(entry: ScheduleEntry, settings: Settings) -> str | None:
    """Submit a job for the source's new objects; returns its id, or None when nothing is new."""
    broker_url = require_broker_url(settings)
    client = connect_redis(broker_url)
    listed = list(list_versions(entry.source))
    markers = [f"{uri}|{version}" for uri, version in listed]
    known = client.smismember(keys.schedule_seen(entry.name), markers) if markers else []
    fresh = [(uri, marker) for (uri, _), marker, seen in zip(listed, markers, known, strict=True) if not seen]
    if not fresh:
        log.info("schedule %s: nothing new in %s", entry.name, entry.source)
        return None
    # A folder named by the new objects: the same objects give the same job id, run after run.
    digest = hashlib.sha256("\n".join(marker for _, marker in fresh).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "imgjobs-schedules" / entry.name / digest
    folder.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    rows: list[dict[str, Any]] = []
    for uri, _marker in fresh:
        row: dict[str, Any] = {"id": item_id_for(uri, taken), "image": uri}
        if entry.prompt is not None:
            row["prompt"] = entry.prompt
        rows.append(row)
    (folder / "items.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (folder / "job.json").write_text(
        json.dumps({**entry.job_spec(), "items": "items.jsonl"}), encoding="utf-8"
    )
    with prepared(folder / "job.json", Registry.load(settings.models), settings) as job:
        submission = submit(job, settings, broker_url)
    client.sadd(keys.schedule_seen(entry.name), *(marker for _, marker in fresh))
    log.info("schedule %s: job %s with %d new item(s)", entry.name, submission.job_id, len(fresh))
    return submission.job_id


def _cadence(entry: ScheduleEntry) -> crontab | timedelta:
    if entry.every_s is not None:
        return timedelta(seconds=entry.every_s)
    assert entry.cron is not None
    minute, hour, day_of_month, month_of_year, day_of_week = entry.cron.split()
    return crontab(
        minute=minute,
        hour=hour,
        day_of_month=day_of_month,
        month_of_year=month_of_year,
        day_of_week=day_of_week,
    )


def prune_finished(settings: Settings) -> int:
    """Delete the jobs finished longer ago than the file's keep_finished_jobs_for; returns how many."""
    retention_s = load_schedules(settings).retention_s
    if retention_s is None:
        return 0
    pruned = JobStore(connect_redis(require_broker_url(settings))).prune(time.time() - retention_s)
    log.info("pruned %d job(s) finished more than %.0f s ago", len(pruned), retention_s)
    return len(pruned)


def make_app(settings: Settings) -> Celery:
    broker_url = require_broker_url(settings)
    schedules = load_schedules(settings)
    beat_schedule: dict[str, dict[str, Any]] = {
        entry.name: {
            "task": FIRE_TASK,
            "schedule": _cadence(entry),
            "args": [entry.name],
            "options": {"queue": SCHEDULE_QUEUE},
        }
        for entry in schedules.schedules
    }
    if schedules.keep_finished_jobs_for is not None:
        beat_schedule[PRUNE_ENTRY] = {
            "task": PRUNE_TASK,
            "schedule": PRUNE_EVERY,
            "options": {"queue": SCHEDULE_QUEUE},
        }
    scheduler = Celery("imgjobs-scheduler")
    scheduler.conf.update(celery_config(settings, broker_url))
    scheduler.conf.update(
        beat_scheduler="redbeat.RedBeatScheduler",
        redbeat_redis_url=broker_url,
        redbeat_key_prefix=keys.REDBEAT_PREFIX,
        beat_max_loop_interval=5,
        # No result backend, so no celery.backend_cleanup entry either.
        result_expires=None,
        beat_schedule=beat_schedule,
    )

    @scheduler.task(name=FIRE_TASK)
    def fire_task(name: str) -> str | None:
        # Read the file at each firing, so edits to an entry apply without restarting the worker.
        return fire(entry_named(load_schedules(settings), name), settings)

    @scheduler.task(name=PRUNE_TASK)
    def prune_task() -> int:
        return prune_finished(settings)

    return scheduler
