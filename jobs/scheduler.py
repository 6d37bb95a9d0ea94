"""Scheduled pipelines: Celery beat fires each entry of the schedules file (IMGJOBS_SCHEDULES), and
a firing submits a job for the source's images not processed before.

RedBeat keeps the schedule and its last run in Redis, so restarting beat neither loses nor repeats
a firing. Each object is remembered by URI and ETag (or content hash) once its job is submitted;
a firing that dies before remembering them submits the same items again next time, which gives
the same job id, so nothing runs twice (unless the job was pruned meanwhile). With
`keep_finished_jobs_for` in the file, beat also prunes finished jobs, hourly.

The file is checked whole each time it is read (cron fields, sources, outputs, stages, models), so
that `schedule list` and beat's start fail on what a firing would fail on. A firing writes its job
(spec and items) into the state dir, in a folder only its user can read.

    imgjobs schedule beat      Celery beat with RedBeat
    imgjobs schedule worker    runs the firings (a small producer-side Celery worker, no torch)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
import yaml
from celery import Celery
from celery.schedules import crontab
from pydantic import ValidationError

from jobs.broker import require_broker_url
from jobs.embedded import state_root
from jobs.manifest import ParamsResolver, locate
from jobs.producer import prepared, submit
from jobs.prompts import PromptChecks
from jobs.recipe import plan_recipe
from jobs.registry import Location, Registry, error_message, first_error
from jobs.sources import (
    absolute_pattern,
    check_pattern,
    item_id_for,
    list_versions,
    lists_output,
)
from jobstate import keys
from jobstate.connection import connect_redis
from jobstate.store import JobStore
from schemas.errors import ConfigError
from schemas.job import Item, JobSpec
from schemas.schedule import ScheduleEntry, SchedulesFile
from schemas.settings import Settings, celery_config

log = logging.getLogger("imgjobs.schedule")

FIRE_TASK = "imgjobs.fire_schedule"
PRUNE_TASK = "imgjobs.prune_jobs"
SCHEDULE_QUEUE = "imgjobs.schedules"
# Not a valid schedule name (those have no ':'), so it never shadows an entry of the file.
PRUNE_ENTRY = "imgjobs:prune"
PRUNE_EVERY = timedelta(hours=1)
MODEL_FIELDS = ("model", "controlnet", "depth_model")
# The image of the item whose parameters stand for every firing's items at load; any URI will do.
SAMPLE_IMAGE = "s3://bucket/sample.png"


class _SchedulesYaml:
    """The file as read, to name the line and the schedule an error is about."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not UTF-8 text") from None
        try:
            self.data: Any = yaml.safe_load(text) or {}
            self.root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None

    def error(self, loc: Location, message: str) -> ConfigError:
        """One line: the file and line, the schedule by name, the field, the message."""
        line, kept = locate(self.root, loc)
        where = str(self.path) if line is None else f"{self.path}:{line}"
        if len(kept) >= 2 and kept[0] == "schedules" and isinstance(kept[1], int):
            where += f": schedule {self._name(kept[1])}"
            kept = kept[2:]
        field = ".".join(str(part) for part in kept)
        return ConfigError(f"{where}: {field}: {message}" if field else f"{where}: {message}")

    def _name(self, index: int) -> str:
        entries = self.data.get("schedules") if isinstance(self.data, dict) else None
        entry = entries[index] if isinstance(entries, list) and index < len(entries) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        return repr(name) if isinstance(name, str) else f"#{index + 1}"


def load_schedules(settings: Settings) -> SchedulesFile:
    """The schedules file with every entry checked as its firing would check it (cron, source,
    output, stages, models), so that a mistake fails `schedule list` and beat's start rather than
    a firing. Relative local paths are made absolute against the file's folder."""
    if settings.schedules is None:
        raise ConfigError("no schedules file: set IMGJOBS_SCHEDULES=/path/to/schedules.yaml")
    read = _SchedulesYaml(settings.schedules)
    try:
        schedules = SchedulesFile.model_validate(read.data)
    except ValidationError as exc:
        err = first_error(exc)
        raise read.error(tuple(err["loc"]), error_message(err, SchedulesFile)) from None
    registry = Registry.load(settings.models)
    base_dir = settings.schedules.resolve().parent
    checked = [
        _checked(entry, ("schedules", index), read, registry, base_dir)
        for index, entry in enumerate(schedules.schedules)
    ]
    return schedules.model_copy(update={"schedules": checked})


def _checked(
    entry: ScheduleEntry, loc: Location, read: _SchedulesYaml, registry: Registry, base_dir: Path
) -> ScheduleEntry:
    try:
        check_pattern(entry.source)
    except ConfigError as exc:
        raise read.error((*loc, "source"), str(exc)) from None
    entry = entry.model_copy(
        update={
            "source": absolute_pattern(entry.source, base_dir),
            "output": _absolute_output(entry, base_dir),
        }
    )
    if lists_output(entry.source, entry.output):
        raise read.error(
            (*loc, "output"),
            f"{entry.output} lies inside the source {entry.source}, which would list the jobs' "
            "outputs as new images; write them elsewhere",
        )
    try:
        spec = JobSpec.model_validate({**entry.job_spec(), "items": "items.jsonl"})
    except ValidationError as exc:
        err = first_error(exc)
        raise read.error((*loc, *err["loc"]), error_message(err, JobSpec)) from None
    _recipe, problems = plan_recipe(spec, registry, base_dir, str(read.path))
    found = [(problem.field or "", problem.message) for problem in problems] + _item_problems(spec, entry)
    if found:
        field, message = found[0]
        raise read.error((*loc, *_loc_of(field)), message)
    return entry.model_copy(
        update={"stages": [_with_model_folders(stage, registry, base_dir) for stage in entry.stages]}
    )


def _absolute_output(entry: ScheduleEntry, base_dir: Path) -> str:
    if "://" in entry.output and not entry.output.startswith("file://"):
        return entry.output  # not local; JobSpec names what is wrong with it
    return str((base_dir / Path(entry.output.removeprefix("file://")).expanduser()).resolve())


def _item_problems(spec: JobSpec, entry: ScheduleEntry) -> list[tuple[str, str]]:
    """What the stages would refuse in every item of a firing: each is an image with the prompt."""
    if spec.stages[0].type == "text2img":
        return [
            (
                "stages.0.type",
                "text2img takes no image, and a schedule's items are images: it cannot be first",
            )
        ]
    resolved = ParamsResolver(spec).resolve(Item(id="sample", image=SAMPLE_IMAGE, prompt=entry.prompt))
    prompts = PromptChecks(spec)
    return [
        *(
            (f"stages.{index}", messages[0])
            for index, messages in enumerate(resolved)
            if isinstance(messages, list)
        ),
        *prompts.spec_problems,
        *prompts.item_problems(entry.prompt, None),
    ]


def _loc_of(field: str) -> Location:
    return tuple(int(part) if part.isdigit() else part for part in field.split(".") if part)


def _with_model_folders(stage: dict[str, Any], registry: Registry, base_dir: Path) -> dict[str, Any]:
    """The stage with a model given as a folder, relative to the schedules file, made absolute: a
    firing's job is written elsewhere, and would look for the folder beside itself."""
    folders = {
        field: registry.resolve(value, base_dir=base_dir).name
        for field in MODEL_FIELDS
        if isinstance(value := stage.get(field), str) and value not in registry.entries
    }
    return {**stage, **folders}


def entry_named(schedules: SchedulesFile, name: str) -> ScheduleEntry:
    for entry in schedules.schedules:
        if entry.name == name:
            return entry
    known = ", ".join(entry.name for entry in schedules.schedules) or "none"
    raise ConfigError(f"no schedule {name!r}; known: {known}")


def firing_folder(settings: Settings, name: str, digest: str) -> Path:
    """A firing's job spec and items, under the state dir and readable by this user alone: a folder
    in a shared temporary directory could be made in advance, or read, by anyone."""
    schedules = state_root(settings.state_dir) / "schedules"
    folder = schedules / name / digest
    try:
        schedules.mkdir(parents=True, exist_ok=True, mode=0o700)
        schedules.chmod(0o700)  # mkdir's mode applies only to a folder it makes
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make {folder} (IMGJOBS_STATE_DIR): {exc.strerror}") from None
    return folder


def fire(entry: ScheduleEntry, settings: Settings) -> str | None:
    """Submit a job for the source's new objects; returns its id, or None when nothing is new."""
    broker_url = require_broker_url(settings)
    client = connect_redis(broker_url)
    listed = list(list_versions(entry.source))
    markers = [f"{uri}|{version}" for uri, version in listed]
    known = client.smismember(keys.schedule_seen(entry.name), markers) if markers else []
    fresh = [(uri, marker) for (uri, _), marker, seen in zip(listed, markers, known, strict=True) if not seen]
    client.hset(keys.schedule_last(entry.name), "fired_at", repr(time.time()))
    if not fresh:
        log.info("schedule %s: nothing new in %s", entry.name, entry.source)
        return None
    # A folder named by the new objects: the same objects give the same job id, run after run.
    digest = hashlib.sha256("\n".join(marker for _, marker in fresh).encode()).hexdigest()[:16]
    folder = firing_folder(settings, entry.name, digest)
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
        submission = submit(dataclasses.replace(job, schedule=entry.name), settings, broker_url)
    client.sadd(keys.schedule_seen(entry.name), *(marker for _, marker in fresh))
    client.hset(keys.schedule_last(entry.name), "job_id", submission.job_id)
    # Kept when the submit fails, for the error that names its files; the next firing writes it again.
    shutil.rmtree(folder, ignore_errors=True)
    log.info("schedule %s: job %s with %d new item(s)", entry.name, submission.job_id, len(fresh))
    return submission.job_id


@dataclass(frozen=True)
class ScheduleStanding:
    """What `imgjobs schedule list` shows of a schedule beside its file entry."""

    last_fired_at: float | None
    next_firing_at: float | None  # None: at the start of `imgjobs schedule beat` (an interval never fired)
    last_job_id: str | None
    seen: int  # source objects submitted so far


def standing(client: redis.Redis, entry: ScheduleEntry, now: float | None = None) -> ScheduleStanding:
    now = time.time() if now is None else now
    last = {_text(key): _text(value) for key, value in client.hgetall(keys.schedule_last(entry.name)).items()}
    fired_at = float(last["fired_at"]) if "fired_at" in last else None
    return ScheduleStanding(
        last_fired_at=fired_at,
        next_firing_at=next_firing(entry, fired_at, now),
        last_job_id=last.get("job_id"),
        seen=int(client.scard(keys.schedule_seen(entry.name))),
    )


def next_firing(entry: ScheduleEntry, last_fired_at: float | None, now: float) -> float | None:
    """When beat fires the entry next (cron fields in UTC, beat's time zone)."""
    if entry.every_s is not None:
        return None if last_fired_at is None else max(last_fired_at + entry.every_s, now)
    cadence = entry.cadence()
    assert isinstance(cadence, crontab)
    cadence.nowfun = lambda: datetime.fromtimestamp(now, UTC)
    since = datetime.fromtimestamp(last_fired_at if last_fired_at is not None else now, UTC)
    remaining: timedelta = cadence.remaining_estimate(since)
    return now + max(remaining.total_seconds(), 0.0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
            "schedule": entry.cadence(),
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
