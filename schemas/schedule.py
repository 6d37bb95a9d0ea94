"""Scheduled pipelines (schedules.yaml): each entry turns the images of a source that were not
processed before into a job, on a cron or an interval."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEDULE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class ScheduleEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="also the jobs' name; lowercase letters, digits, '-'")
    cron: str | None = Field(None, description='five fields: "minute hour day-of-month month day-of-week"')
    every_s: int | None = Field(None, ge=1, description="or an interval in seconds")
    source: str = Field(min_length=1, description="s3://bucket/prefix/*.png or a local glob")
    output: str = Field(min_length=1)
    prompt: str | None = None
    defaults: dict[str, Any] = Field(default_factory=dict, description="the job spec's defaults")
    stages: list[dict[str, Any]] = Field(min_length=1, description="the job spec's stages")
    dataset: bool = False

    @model_validator(mode="after")
    def _check(self) -> ScheduleEntry:
        if not SCHEDULE_NAME.match(self.name):
            raise ValueError("name must be lowercase letters, digits or '-', starting with a letter or digit")
        if (self.cron is None) == (self.every_s is None):
            raise ValueError("give exactly one of cron and every_s")
        if self.cron is not None and len(self.cron.split()) != 5:
            raise ValueError(f"cron must have five fields, got {self.cron!r}")
        return self

    def job_spec(self) -> dict[str, Any]:
        """The job spec a firing submits, without its items."""
        return {
            "version": 1,
            "name": self.name,
            "output": self.output,
            "defaults": self.defaults,
            "stages": self.stages,
            "dataset": self.dataset,
        }


class SchedulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schedules: list[ScheduleEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> SchedulesFile:
        names = [entry.name for entry in self.schedules]
        if len(names) != len(set(names)):
            raise ValueError("schedule names must be unique")
        return self
