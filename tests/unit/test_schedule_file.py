"""schedules.yaml: the example validates; bad entries fail when the file is loaded, with the file, line,
entry and field named; a firing's job is written where only its user can read it."""

from __future__ import annotations

import os
import stat
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import redis
import yaml

from jobs.embedded import EmbeddedRedis
from jobs.scheduler import entry_named, fire, load_schedules
from jobstate.store import JobStore
from kits.helpers import write_image
from kits.processes import ROOT
from schemas.errors import ConfigError
from schemas.settings import Settings


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


def entry_file(tmp_path: Path, **fields: str) -> Path:
    """A schedules file of one entry, `nightly`, one field a line, with `fields` replacing the defaults."""
    entry = {
        "name": "nightly",
        "cron": "'0 2 * * *'",
        "source": "s3://bucket/incoming/*.png",
        "output": "s3://bucket/nightly",
        "stages": "[{type: img2img, model: sd15, strength: 0.6}]",
    } | fields
    lines = [
        f"  {'- ' if index == 0 else '  '}{key}: {value}" for index, (key, value) in enumerate(entry.items())
    ]
    path = tmp_path / "schedules.yaml"
    path.write_text("schedules:\n" + "\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("0 25 * * *", r"hour '25' of '0 25 \* \* \*' is not valid \(0-23\)"),
        ("61 2 * * *", r"minute '61' .* is not valid \(0-59\)"),
        ("0 2 0 * *", r"day_of_month '0' .* is not valid \(1-31\)"),
        ("0 2 * 13 *", r"month_of_year '13' .* is not valid"),
        ("0 2 * * 8", r"day_of_week '8' .* is not valid"),
        ("x 2 * * *", r"minute 'x' .* is not valid \(0-59\)$"),
        ("0 2 31 2 *", r"Invalid crontab: day_of_month '31' never occurs in month_of_year '2'"),
    ],
)
def test_a_cron_that_beat_would_refuse_fails_at_load_with_file_line_and_schedule(
    tmp_path: Path, cron: str, message: str
) -> None:
    path = entry_file(tmp_path, cron=f"'{cron}'")
    with pytest.raises(ConfigError, match=rf"^{path}:3: schedule 'nightly': cron: {message}"):
        load_schedules(Settings(schedules=path))


def test_the_cadence_is_the_cron_as_written(tmp_path: Path) -> None:
    entry = load_schedules(Settings(schedules=entry_file(tmp_path, cron="'15 2 * * mon-fri'"))).schedules[0]
    cadence = entry.cadence()
    assert not isinstance(cadence, timedelta)
    assert (cadence.minute, cadence.hour, cadence.day_of_week) == ({15}, {2}, {1, 2, 3, 4, 5})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"stages": "[{type: img2img, model: sd15-typo}]"},
            r":6: schedule 'nightly': stages\.0\.model: unknown model 'sd15-typo'",
        ),
        (
            {"stages": "\n      - type: img2img\n        model: sd15\n        strenght: 0.3"},
            r":9: schedule 'nightly': stages\.0\.strenght: unknown field",
        ),
        (
            {"stages": "[{type: img2img, model: sd15, strength: 0.1, steps: 5}]"},
            r":6: schedule 'nightly': stages\.0: steps x strength must give at least one denoising step",
        ),
        (
            {"stages": "[{type: text2img, model: sd15}]"},
            r":6: schedule 'nightly': stages\.0\.type: text2img takes no image",
        ),
        (
            {"stages": "[{type: resize}, {type: img2img, model: cpu}]"},
            r":6: schedule 'nightly': stages\.1\.model: resize runs on the model `cpu`, and only resize does",
        ),
        ({"output": "http://host/out"}, r":5: schedule 'nightly': output: must be a local directory"),
        (
            {
                "prompt": "'" + "(" * 20 + "cat'",
                "stages": "[{type: img2img, model: sd15, prompt_syntax: compel}]",
            },
            r":7: schedule 'nightly': prompt: nests parentheses 20 levels deep",
        ),
        (
            {"prompt": '"a\\x00cat"'},
            r":7: schedule 'nightly': prompt: contains the control character U\+0000",
        ),
    ],
)
def test_stages_and_models_are_checked_at_load(tmp_path: Path, fields: dict[str, str], message: str) -> None:
    """Not at firing, where the error named a temporary job file."""
    path = entry_file(tmp_path, **fields)
    with pytest.raises(ConfigError, match=rf"^{path}{message}"):
        load_schedules(Settings(schedules=path))


def test_a_misspelt_field_is_named_on_its_line_rather_than_as_missing(tmp_path: Path) -> None:
    path = tmp_path / "schedules.yaml"
    path.write_text(
        "schedules:\n"
        "  - name: nightly\n"
        "    every_s: 60\n"
        "    sorce: s3://bucket/in/*.png\n"
        "    output: s3://bucket/out\n"
        "    stages: [{type: resize}]\n"
    )
    with pytest.raises(ConfigError, match=rf"^{path}:4: schedule 'nightly': sorce: unknown field"):
        load_schedules(Settings(schedules=path))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("s3:///incoming/*.png", "an s3:// listing needs a bucket"),
        ("https://host/incoming/*.png", r"a listing is s3://bucket/prefix/\*\.png or a local glob"),
        ("s3://bucket/in/a**.png", r"`\*\*` must be a whole path level"),
    ],
)
def test_a_bad_source_fails_at_load(tmp_path: Path, source: str, message: str) -> None:
    path = entry_file(tmp_path, source=source)
    with pytest.raises(ConfigError, match=rf"^{path}:4: schedule 'nightly': source: .*{message}"):
        load_schedules(Settings(schedules=path))


@pytest.mark.parametrize(
    ("source", "output", "refused"),
    [
        ("s3://bucket/in/**/*.png", "s3://bucket/in/out", True),
        ("s3://bucket/in/**", "s3://bucket/in/out/", True),
        ("s3://bucket/in/*/*.png", "s3://bucket/in", True),
        ("s3://bucket/**/*.png", "s3://bucket", True),
        ("s3://bucket", "s3://bucket/out", True),  # a bucket alone lists all of it
        ("s3://bucket/in/*.png", "s3://bucket/in/out", False),  # `*` stays in in/
        ("s3://bucket/in/*.png", "s3://bucket", False),  # the jobs' folders are not in/
        ("s3://bucket/in/**/*.png", "s3://other/in/out", False),
        ("s3://bucket/in/**/*.png", "s3://bucket/out", False),
        ("s3://bucket/in/**/*.png", "s3://bucket/in/.out", False),  # `**` skips hidden folders
        ("incoming/**/*.png", "incoming/out", True),  # local paths, relative to the file
        ("incoming/*/*.png", "file://{tmp}/incoming", True),
        ("{tmp}/incoming/**/*.png", "out", False),
        ("incoming/**/*.png", "s3://bucket/incoming/out", False),
    ],
)
def test_an_output_inside_its_source_is_refused(
    tmp_path: Path, source: str, output: str, refused: bool
) -> None:
    """Each firing would otherwise submit the outputs of the one before as new images."""
    path = entry_file(tmp_path, source=source.format(tmp=tmp_path), output=output.format(tmp=tmp_path))
    if refused:
        with pytest.raises(
            ConfigError, match=rf"^{path}:5: schedule 'nightly': output: .* lies inside the source"
        ):
            load_schedules(Settings(schedules=path))
    else:
        load_schedules(Settings(schedules=path))


def test_local_paths_are_relative_to_the_schedules_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "conf" / "models" / "mine"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text('{"_class_name": "StableDiffusionImg2ImgPipeline"}')
    path = entry_file(
        tmp_path / "conf",
        source="incoming/*.png",
        output="out",
        stages="[{type: img2img, model: models/mine}, {type: resize, size: [64, 64]}]",
    )
    monkeypatch.chdir(tmp_path)  # not where the file is
    entry = load_schedules(Settings(schedules=path)).schedules[0]
    conf = (tmp_path / "conf").resolve()
    assert entry.source == str(conf / "incoming" / "*.png")
    assert entry.output == str(conf / "out")
    assert entry.stages == [
        {"type": "img2img", "model": str(conf / "models" / "mine")},
        {"type": "resize", "size": [64, 64]},
    ]


def test_a_firing_writes_its_job_in_a_private_folder_of_the_state_dir(
    tmp_path: Path, redis_server: EmbeddedRedis, private_state_dir: Path
) -> None:
    """Not in a fixed folder of the shared temporary directory, which another user could have made
    first, or read."""
    name = f"private-{os.getpid()}"
    write_image(tmp_path / "incoming" / "a.png")
    path = entry_file(
        tmp_path,
        name=name,
        source=f"{tmp_path}/incoming/*.png",
        output=str(tmp_path / "out"),
        stages="[{type: resize, size: [32, 32]}]",
    )
    settings = Settings(schedules=path, broker_url=redis_server.url)
    job_id = fire(entry_named(load_schedules(settings), name), settings)
    assert job_id is not None
    assert not (Path(tempfile.gettempdir()) / "imgjobs-schedules" / name).exists()
    folder = private_state_dir / "schedules"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert list((folder / name).iterdir()) == []  # each firing's folder goes once its job is submitted
    meta = JobStore(redis.Redis.from_url(redis_server.url)).find(job_id)
    assert meta is not None and meta.output == str((tmp_path / "out").resolve())
