"""What a user is told about bad input: one line that names the file, the line and the thing wrong,
with a suggestion where a name is misspelt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from jobs.cli import app
from jobs.manifest import validate_job
from jobs.registry import Registry
from kits.helpers import write_job
from schemas.errors import ConfigError, InputImageError, SpecError
from schemas.settings import Settings
from workers.imageio import decode_image, fetch_bytes

REGISTRY = Registry.load(None)
HEADER = "id,image,prompt,seed,size\n"


def problems_of(spec: Path, registry: Registry = REGISTRY) -> list[str]:
    with pytest.raises(SpecError) as caught:
        validate_job(spec, registry)
    return [str(problem) for problem in caught.value.problems]


def csv_job(folder: Path, text: str | bytes) -> Path:
    spec = write_job(folder, [], model="sd15")
    data = json.loads(spec.read_text())
    spec.write_text(json.dumps({**data, "items": "items.csv"}))
    items = folder / "items.csv"
    if isinstance(text, bytes):
        items.write_bytes(text)
    else:
        items.write_text(text, encoding="utf-8")
    return spec


def csv_rows(count: int) -> list[str]:
    return [f"r{n},pics/{n}.png,a cat,{n},64x64\n" for n in range(count)]


def test_an_unclosed_quote_in_a_csv_is_an_error_on_its_line(tmp_path: Path) -> None:
    rows = csv_rows(54)
    rows[2] = 'c,pics/wide.jpg,"unclosed,3,64x64\n'  # row 3, line 4: its field would run to the end
    spec = csv_job(tmp_path, HEADER + "".join(rows))
    assert problems_of(spec) == [
        f"{tmp_path / 'items.csv'}:4: not valid CSV: a quoted field begun on this row is never closed "
        "(it runs to the end of the file)"
    ]


def test_a_quote_closed_rows_later_is_an_error_where_it_opened(tmp_path: Path) -> None:
    rows = csv_rows(10)
    rows[2] = 'c,pics/wide.jpg,"unclosed,3,64x64\n'
    rows[6] = 'g,pics/g.png,"a cat, quoted",7,64x64\n'  # its first quote closes row 3's
    spec = csv_job(tmp_path, HEADER + "".join(rows))
    found = problems_of(spec)
    assert len(found) == 1 and found[0].startswith(f"{tmp_path / 'items.csv'}:4: not valid CSV:"), found


def test_quoted_fields_over_several_lines_are_still_read(tmp_path: Path) -> None:
    spec = csv_job(tmp_path, HEADER + 'a,a.png,"a cat,\nin a hat",1,64x64\nb,b.png,dog,2,64x64\n')
    assert validate_job(spec, REGISTRY).total == 2


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    text = HEADER + "".join(csv_rows(3))
    spec = csv_job(tmp_path, b"\xef\xbb\xbf" + text.encode())
    marked = validate_job(spec, REGISTRY)
    assert marked.total == 3
    # The mark is not data: the same rows without it make the same job.
    assert validate_job(csv_job(tmp_path, text), REGISTRY).job_id == marked.job_id


def test_invalid_json_names_one_line_only(tmp_path: Path) -> None:
    spec = write_job(tmp_path, [{"id": "a", "image": "a.png"}], model="sd15")
    items = tmp_path / "items.jsonl"
    items.write_text(items.read_text() + '{"id": "b",\n' + '{"id": "c" "image": "c.png"}\n')
    assert problems_of(spec) == [
        f"{items}:2: not valid JSON: Expecting property name enclosed in double quotes at the end of "
        "the line",
        f"{items}:3: not valid JSON: Expecting ',' delimiter at column 12",
    ]


@pytest.mark.parametrize(
    ("data", "says"),
    [(b"\x00\x01\x02 wrong magic", "not a recognized image"), (b"", "empty file")],
    ids=["wrong-magic", "zero-byte"],
)
def test_an_undecodable_image_is_named_by_its_input(tmp_path: Path, data: bytes, says: str) -> None:
    path = tmp_path / "in.png"
    path.write_bytes(data)
    with pytest.raises(InputImageError) as caught:
        decode_image(fetch_bytes(str(path), Settings()), str(path), Settings())
    message = str(caught.value)
    assert message.startswith(f"{path}: {says}") and "BytesIO" not in message, message


def test_a_bad_param_flag_is_named_by_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"")
    monkeypatch.setenv("IMGJOBS_BROKER_URL", "redis://127.0.0.1:9/0")  # never reached: the flags are refused
    flags = ["submit", "--from", str(tmp_path / "in" / "*.png"), "--model", "sd15", "--output", "out"]
    with pytest.raises(SpecError) as caught:
        app([*flags, "--param", "stepz=4", "--param", "strength=2"], standalone_mode=False)
    assert sorted(str(problem) for problem in caught.value.problems) == [
        "--param stepz: unknown field; did you mean 'steps'?",
        "--param strength: Input should be less than or equal to 1",
    ]
    with pytest.raises(SpecError) as caught:
        app([*flags, "--stage", "upscale", "--param", "prompt_syntax=compel"], standalone_mode=False)
    assert [str(problem) for problem in caught.value.problems] == [
        "--param: upscalers take plain prompts; prompt_syntax: compel is for img2img and text2img"
    ]
    with pytest.raises(SpecError) as caught:
        app([*flags, "--size", "51x", "--model", "no-such-model"], standalone_mode=False)
    assert [str(problem) for problem in caught.value.problems] == [
        "--size: size must look like 512x512 or [512, 512], got '51x'"
    ]
    with pytest.raises(SpecError) as caught:
        app([*flags[:-4], "--model", "no-such-model", "--output", "out"], standalone_mode=False)
    (problem,) = caught.value.problems
    assert str(problem).startswith("--model: unknown model 'no-such-model'"), problem


def test_an_unknown_stage_field_suggests_the_near_one_on_its_line(tmp_path: Path) -> None:
    (tmp_path / "items.jsonl").write_text(json.dumps({"id": "a", "image": "a.png"}) + "\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "version: 1\nname: x\noutput: out\nitems: items.jsonl\nstages:\n"
        "  - type: img2img\n    model: sd15\n    strenght: 0.5\n"
        "  - type: upscale\n    model: sd-x4-upscaler\n    noise_lvl: 3\n"
    )
    assert problems_of(spec) == [
        f"{spec}:8: stages.0.strenght: unknown field; did you mean 'strength'?",
        f"{spec}:11: stages.1.noise_lvl: unknown field; did you mean 'noise_level'?",
    ]


def test_an_unknown_item_field_lists_the_fields_when_none_is_near(tmp_path: Path) -> None:
    spec = write_job(tmp_path, [{"id": "a", "image": "a.png", "colour": "red"}], model="sd15")
    (found,) = problems_of(spec)
    assert found.startswith(f"{tmp_path / 'items.jsonl'}:1: colour: unknown field; the fields are id, image")


def test_an_unknown_model_suggests_a_near_name_on_the_stage_line(tmp_path: Path) -> None:
    (tmp_path / "items.jsonl").write_text(json.dumps({"id": "a", "image": "a.png"}) + "\n")
    (tmp_path / "models.yaml").write_text(
        "models:\n  tiny-sd:\n    source: some/tiny-sd\n  tiny-sd-style:\n    source: some/style\n"
    )
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "version: 1\nname: x\noutput: out\nitems: items.jsonl\nstages:\n"
        "  - type: img2img\n    model: tiny-sd-stile\n"
    )
    (found,) = problems_of(spec, Registry.load(tmp_path / "models.yaml"))
    assert found == (
        f"{spec}:7: stages.0.model: unknown model 'tiny-sd-stile': not registered in "
        f"{tmp_path / 'models.yaml'} and not a diffusers folder; did you mean 'tiny-sd-style'?"
    )


def test_semantic_spec_problems_carry_their_line(tmp_path: Path) -> None:
    (tmp_path / "items.jsonl").write_text(json.dumps({"id": "a", "image": "a.png"}) + "\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "version: 1\nname: x\noutput: out\nitems: items.jsonl\nstages:\n"
        "  - type: img2img\n    model: sd15\n    handover: latent\n"
        "  - type: img2img\n    model: kandinsky22\n"
        "  - type: text2img\n    model: sd15\n"
    )
    found = problems_of(spec)
    assert f"{spec}:11: stages.2.type: text2img can only be the first stage" in found, found
    handover = f"{spec}:8: stages.0.handover: latent handover needs models of one VAE family"
    assert any(problem.startswith(handover) for problem in found), found
    spec.write_text(spec.read_text().replace("items: items.jsonl", "items: missing.jsonl"))
    assert f"{spec}:4: items: no such file: {tmp_path / 'missing.jsonl'}" in problems_of(spec)


def test_an_unknown_registry_field_suggests_the_near_one_with_its_line(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  tiny:\n    dtype: float32\n    sorce: models/tiny\n")
    with pytest.raises(ConfigError) as caught:
        Registry.load(models)
    assert str(caught.value) == (
        f"model registry {models}:4: models.tiny.sorce: unknown field; did you mean 'source'?"
    )


def test_help_reads_as_sentences_answers_dash_h_and_shows_no_type_for_flags() -> None:
    runner = CliRunner()
    wide = {"COLUMNS": "500"}
    top = runner.invoke(app, ["-h"], env=wide)
    assert top.exit_code == 0, top.output
    lines = top.output.splitlines()
    first = next(index for index, line in enumerate(lines) if "─ Commands ─" in line)
    rows = lines[
        first + 1 : next(index for index in range(first, len(lines)) if lines[index].startswith("╰"))
    ]
    names = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    # At 500 columns each command's help is one line: none breaks where its docstring's lines do.
    assert sorted(row.split()[1] for row in rows) == names, rows
    for command in [[name] for name in names] + [["schedule", "list"]]:
        shown = runner.invoke(app, [*command, "-h"], env=wide)
        assert shown.exit_code == 0 and "Usage:" in shown.output, (command, shown.output)
        assert "<bool>" not in shown.output, command
    assert "must load" not in runner.invoke(app, ["validate", "-h"], env=wide).output
