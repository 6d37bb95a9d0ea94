"""schedules.yaml: the example validates, and bad entries fail with the entry and field named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.scheduler import load_schedules
from schemas.errors import ConfigError
from schemas.settings import Settings
from tests.conftest import ROOT


def test_the_example_validates_and_compose_runs_beat_with_it() -> None:
    schedules = load_schedules(Settings(schedules=ROOT / "deploy" / "schedules.example.yaml"))
    assert [entry.name for entry in schedules.schedules] == ["nightly-restyle"]
    assert schedules.retention_s == 30 * 86400
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    for service in ("beat", "scheduler"):
        assert any(
            "schedules.example.yaml:/etc/imgjobs/schedules.yaml" in v
            for v in compose["services"][service]["volumes"]
        )
        assert (
            compose["services"][service]["environment"]["IMGJOBS_SCHEDULES"] == "/etc/imgjobs/schedules.yaml"
        )
    assert compose["services"]["beat"]["command"] == ["schedule", "beat"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "{name: a, cron: '0 2 * * *', every_s: 5, source: x, output: o, stages: [{}]}",
            "exactly one of cron",
        ),
        ("{name: a, cron: '0 2 *', source: x, output: o, stages: [{}]}", "five fields"),
        ("{name: A b, every_s: 5, source: x, output: o, stages: [{}]}", "lowercase"),
        ("{name: a, every_s: 5, source: x, output: o, stages: []}", "stages"),
    ],
)
def test_bad_entries_are_named(tmp_path: Path, entry: str, message: str) -> None:
    path = tmp_path / "schedules.yaml"
    path.write_text(f"schedules:\n  - {entry}\n")
    with pytest.raises(ConfigError, match=message):
        load_schedules(Settings(schedules=path))


def test_no_schedules_file() -> None:
    with pytest.raises(ConfigError, match="IMGJOBS_SCHEDULES"):
        load_schedules(Settings())
