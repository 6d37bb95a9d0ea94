"""Scheduled pipelines (schedules.yaml): each entry turns the images of a source that were not
processed before into a job, on a cron or an interval."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from celery.schedules import crontab
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.job import Priority, PromptText

SCHEDULE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")  # \Z: $ allows a final newline

# Hand-written rather than pydantic's timedelta, which takes seconds or ISO 8601 ("P30D") but not the
# "30d" people write on a command line or in a YAML file.
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*\Z")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION_S = 100 * 365 * 86400

# crontab's keywords, in the order of a cron line's fields, with what each field takes.
CRON_FIELDS = {
    "minute": "0-59",
    "hour": "0-23",
    "day_of_month": "1-31",
    "month_of_year": "1-12 or jan-dec",
    "day_of_week": "0-6 or sun-sat, 0 is Sunday",
}


def parse_duration(text: str) -> float:
    """Seconds in "90s", "15m", "12h" or "30d"."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration; write a number and s, m, h or d, e.g. 30d")
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds > MAX_DURATION_S:
        raise ValueError(f"{text!r} is longer than a century")
    return seconds


def parse_cron(text: str) -> crontab:
    """Celery's crontab for a five-field cron line. Each field is checked alone first, so that an
    error names the field (crontab reads letters as weekday names in any field, and says so)."""
    values = text.split()
    if len(values) != len(CRON_FIELDS):
        raise ValueError(f"must have five fields (minute hour day-of-month month day-of-week), got {text!r}")
    fields = dict(zip(CRON_FIELDS, values, strict=True))
    for field, value in fields.items():
        try:
            crontab(**{field: value})
        except ValueError as exc:
            reason = "" if "weekday" in str(exc) and field != "day_of_week" else f": {exc}"
            raise ValueError(
                f"{field} {value!r} of {text!r} is not valid ({CRON_FIELDS[field]}){reason}"
            ) from None
    try:
        return crontab(**fields)
    except ValueError as exc:  # fields valid alone that never meet, such as 31 February
        raise ValueError(str(exc)) from None


class ScheduleEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="also the jobs' name; lowercase letters, digits, '-'")
    cron: str | None = Field(None, description='five fields: "minute hour day-of-month month day-of-week"')
    every_s: int | None = Field(None, ge=1, description="or an interval in seconds")
    source: str = Field(min_length=1, description="s3://bucket/prefix/*.png or a local glob")
    output: str = Field(min_length=1)
    prompt: PromptText | None = None
    defaults: dict[str, Any] = Field(default_factory=dict, description="the job spec's defaults")
    stages: list[dict[str, Any]] = Field(min_length=1, description="the job spec's stages")
    dataset: bool = False
    priority: Priority = Field("normal", description="the priority of the jobs it submits")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not SCHEDULE_NAME.match(value):
            raise ValueError("must be lowercase letters, digits or '-', starting with a letter or digit")
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            parse_cron(value)
        return value

    @model_validator(mode="after")
    def _one_cadence(self) -> ScheduleEntry:
        if (self.cron is None) == (self.every_s is None):
            raise ValueError("give exactly one of cron and every_s")
        return self

    def cadence(self) -> crontab | timedelta:
        """What Celery beat fires the entry on."""
        if self.every_s is not None:
            return timedelta(seconds=self.every_s)
        assert self.cron is not None
        return parse_cron(self.cron)

    def job_spec(self) -> dict[str, Any]:
        """The job spec a firing submits, without its items."""
        return {
            "version": 1,
            "name": self.name,
            "output": self.output,
            "defaults": self.defaults,
            "stages": self.stages,
            "dataset": self.dataset,
            "priority": self.priority,
        }


class SchedulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schedules: list[ScheduleEntry] = Field(default_factory=list)
    keep_finished_jobs_for: str | None = Field(
        None, description="beat prunes jobs finished longer ago than this (30d, 12h), hourly"
    )

    @field_validator("keep_finished_jobs_for")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @property
    def retention_s(self) -> float | None:
        return None if self.keep_finished_jobs_for is None else parse_duration(self.keep_finished_jobs_for)

    @model_validator(mode="after")
    def _unique(self) -> SchedulesFile:
        names = [entry.name for entry in self.schedules]
        if len(names) != len(set(names)):
            raise ValueError("schedule names must be unique")
        return self
