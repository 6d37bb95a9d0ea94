"""Validation of job specs and items: every problem found, located by file, line and field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from jobs.manifest import ValidatedJob, validate_job
from jobs.registry import Registry
from kits.helpers import validated_parts, write_image, write_job
from schemas.errors import SpecError
from schemas.job import (
    Item,
    JobSpec,
    ResolvedParams,
    resolve_negative_prompt,
    resolve_params,
    resolve_prompt,
    resolve_seed,
)
from schemas.registry import queue_for
from schemas.schedule import ScheduleEntry

REGISTRY = Registry.load(None)


def items(count: int, **extra: object) -> list[dict[str, object]]:
    return [{"id": f"i{n:03d}", "image": f"in/{n}.png", "prompt": f"p{n}", **extra} for n in range(count)]


def parted(spec: Path, chunk_size: int = 8) -> tuple[ValidatedJob, list[list[tuple[Item, ResolvedParams]]]]:
    """The job validated and written as parts, each item with its first stage's parameters as the
    chunk runner resolves them."""
    job, parts = validated_parts(spec, REGISTRY, chunk_size)
    stage, defaults = job.spec.stages[0], job.spec.defaults
    return job, [[(item, resolve_params(item, stage, defaults)) for item in part] for part in parts]


def problems_of(spec: Path, registry: Registry = REGISTRY) -> list[str]:
    with pytest.raises(SpecError) as caught:
        validate_job(spec, registry)
    return [str(problem) for problem in caught.value.problems]


def test_valid_job_has_a_deterministic_id_that_follows_the_items(tmp_path: Path) -> None:
    spec = write_job(tmp_path, items(5), model="sd15")
    first = validate_job(spec, REGISTRY)
    assert first.total == 5
    assert first.job_id == validate_job(spec, REGISTRY).job_id
    assert first.job_id.startswith("test-job-")
    assert first.output == str(tmp_path / "out")
    write_job(tmp_path, items(6), model="sd15")
    assert validate_job(spec, REGISTRY).job_id != first.job_id


def test_every_item_problem_is_reported_with_its_line(tmp_path: Path) -> None:
    spec = write_job(tmp_path, items(2), model="sd15")
    lines = (tmp_path / "items.jsonl").read_text().splitlines()
    lines += [
        "{not json",
        json.dumps({"id": "i000", "image": "a.png"}),  # duplicate of line 1
        json.dumps({"id": "../escape", "image": "a.png"}),
        json.dumps({"id": "ok1", "image": "ftp://host/a.png"}),
        json.dumps({"id": "ok2", "image": "a.png", "strength": 1.5}),
        json.dumps({"id": "ok3", "image": "a.png", "seed": "seven"}),
        json.dumps({"id": "ok4", "image": "a.png", "colour": "red"}),
        json.dumps({"id": "ok5"}),
        json.dumps({"id": "ok6", "image": "a.png", "size": [30, 30]}),
        json.dumps({"id": "ok7", "image": "a.png", "steps": 1, "strength": 0.5}),
    ]
    (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n")
    found = problems_of(spec)
    where = str(tmp_path / "items.jsonl")
    expected_starts = [
        f"{where}:3: not valid JSON",
        f"{where}:4: id: duplicate id 'i000', first on line 1",
        f"{where}:5: id: must be 1-128 characters",
        f"{where}:6: image: unsupported scheme",
        f"{where}:7: strength: Input should be less than or equal to 1",
        f"{where}:8: seed: Input should be a valid integer",
        f"{where}:9: colour: unknown field; the fields are id, image,",
        f"{where}:10: image: required unless the first stage is text2img",
        f"{where}:11: size: width and height must be multiples of 8",
        f"{where}:12: stages.0: steps x strength must give at least one denoising step",
    ]
    assert len(found) == len(expected_starts), found
    for problem, start in zip(found, expected_starts, strict=True):
        assert problem.startswith(start), (problem, start)


def test_spec_problems_name_the_yaml_line_and_field(tmp_path: Path) -> None:
    (tmp_path / "items.jsonl").write_text(json.dumps({"id": "a", "image": "a.png"}) + "\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "version: 1\n"
        "name: Bad Name\n"
        "output: out\n"
        "items: items.jsonl\n"
        "stages:\n"
        "  - type: img2img\n"
        "    model: sd15\n"
        "    strenght: 0.5\n"
    )
    found = problems_of(spec)
    assert found == [
        f"{spec}:2: name: must be 1-63 lowercase letters, digits or '-', starting with a letter or digit",
        f"{spec}:8: stages.0.strenght: unknown field; did you mean 'strength'?",
    ]


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("version: 1\nname: x\nstages: [\n  - a: b\n")
    found = problems_of(spec)
    assert len(found) == 1 and found[0].startswith(f"{spec}:") and "not valid YAML" in found[0]


def test_unknown_model_is_a_problem_of_the_stage(tmp_path: Path) -> None:
    spec = write_job(tmp_path, items(1), model="no-such-model")
    found = problems_of(spec)
    assert any("stages.0.model: unknown model 'no-such-model'" in p for p in found), found


def test_model_folder_named_directly(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    spec = write_job(tmp_path / "job", items(1), model="../my-model")
    job = validate_job(spec, REGISTRY)
    assert job.models[0].name == str(folder)
    assert job.models[0].queue.startswith("imgjobs.my-model-")


def test_csv_items_with_size_strings(tmp_path: Path) -> None:
    spec = write_job(tmp_path, [], model="sd15")
    spec_data = json.loads(spec.read_text())
    spec_data["items"] = "items.csv"
    spec.write_text(json.dumps(spec_data))
    (tmp_path / "items.csv").write_text(
        "id,image,prompt,seed,size\na,a.png,a cat,3,64x32\nb,b.png,a dog,,\nc,c.png,x,4,big\n"
    )
    found = problems_of(spec)
    assert found == [
        f"{tmp_path / 'items.csv'}:4: size: size must look like 512x512 or [512, 512], got 'big'"
    ]
    (tmp_path / "items.csv").write_text("id,image,prompt,seed,size\na,a.png,a cat,3,64x32\nb,b.png,a dog,,\n")
    _job, (part,) = parted(spec)
    assert [params.size for _, params in part] == [(64, 32), (32, 32)]  # b takes the job default


def test_an_unknown_resize_policy_is_named_with_its_field(tmp_path: Path) -> None:
    spec = write_job(tmp_path, [], model="sd15")
    spec_data = json.loads(spec.read_text())
    spec_data["items"] = "items.csv"
    spec.write_text(json.dumps(spec_data))
    csv = tmp_path / "items.csv"
    csv.write_text("id,image,resize\na,a.png,pad\nb,b.png,\nc,c.png,stretch\nd,d.png,Pad\n")
    expected = "resize: Input should be 'crop', 'fit' or 'pad'"
    assert problems_of(spec) == [f"{csv}:4: {expected}", f"{csv}:5: {expected}"]  # exact spelling
    csv.write_text("id,image,resize\na,a.png,pad\nb,b.png,\n")
    _job, (part,) = parted(spec)
    assert [params.resize for _, params in part] == ["pad", "crop"]  # b: the built-in crop

    spec_data["defaults"] = {"resize": "stretch"}
    spec_data["stages"] = [{"type": "resize", "resize": "zoom"}]
    spec.write_text(json.dumps(spec_data, indent=2))
    found = problems_of(spec)
    assert len(found) == 2, found
    assert found[0].startswith(f"{spec}:") and found[0].endswith(f"defaults.{expected}")
    assert found[1].startswith(f"{spec}:") and "stages.0.resize" in found[1] and found[1].endswith(expected)


def test_empty_items_file_is_an_error(tmp_path: Path) -> None:
    spec = write_job(tmp_path, [], model="sd15")
    assert problems_of(spec) == [f"{tmp_path / 'items.jsonl'}: no items"]


def test_missing_items_file(tmp_path: Path) -> None:
    spec = write_job(tmp_path, [], model="sd15")
    (tmp_path / "items.jsonl").unlink()
    found = problems_of(spec)
    assert found == [f"{spec}:5: items: no such file: {tmp_path / 'items.jsonl'}"]


def test_items_naming_a_folder_says_it_is_a_folder(tmp_path: Path) -> None:
    spec = write_job(tmp_path, [], model="sd15")
    (tmp_path / "items.jsonl").unlink()
    (tmp_path / "items.jsonl").mkdir()
    folder = tmp_path / "items.jsonl"
    assert problems_of(spec) == [
        f"{spec}:5: items: {folder} is a folder; items names a file (.jsonl, .csv, .parquet)"
    ]


def test_the_manifest_s_folder_is_part_of_the_id_only_where_a_relative_path_starts_there(
    tmp_path: Path,
) -> None:
    absolute = [{"id": "a", "image": str(tmp_path / "a.png")}, {"id": "b", "image": "s3://b/b.png"}]
    here = validate_job(write_job(tmp_path / "here", absolute, model="sd15", output=str(tmp_path)), REGISTRY)
    there = validate_job(
        write_job(tmp_path / "there", absolute, model="sd15", output=str(tmp_path)), REGISTRY
    )
    assert here.job_id == there.job_id
    relative = [*absolute, {"id": "c", "image": "c.png"}]
    here = validate_job(write_job(tmp_path / "here", relative, model="sd15", output=str(tmp_path)), REGISTRY)
    there = validate_job(
        write_job(tmp_path / "there", relative, model="sd15", output=str(tmp_path)), REGISTRY
    )
    assert here.job_id != there.job_id, "c.png is another file in each folder"


def test_local_inputs_an_embedded_run_s_workers_would_refuse_are_problems(tmp_path: Path) -> None:
    """What workers/imageio.py refuses, said before the run, one line per input: a path outside the
    job's folders and the operator's IMGJOBS_LOCAL_INPUT_ROOTS, one that leaves them by '..' or through
    a symbolic link."""
    job, elsewhere, shared = tmp_path / "job", tmp_path / "elsewhere", tmp_path / "shared"
    for path in (job / "a.png", job / "sub" / "b.png", elsewhere / "c.png", shared / "d.png"):
        write_image(path, size=(8, 8))
    (job / "link.png").symlink_to(elsewhere / "c.png")
    rows = [
        {"id": "inside", "image": "a.png"},
        {"id": "below", "image": "sub/b.png"},
        {"id": "absolute", "image": str(elsewhere / "c.png")},
        {"id": "up", "image": "../elsewhere/c.png"},
        {"id": "link", "image": "link.png"},
        {"id": "shared", "image": str(shared / "d.png")},
        {"id": "remote", "image": "s3://bucket/e.png"},
    ]
    spec = write_job(job, rows, model="sd15", output=str(tmp_path / "out"))
    assert validate_job(spec, REGISTRY, check_local=True).total == 7, "without embedded_roots: not checked"
    with pytest.raises(SpecError) as caught:
        validate_job(spec, REGISTRY, check_local=True, embedded_roots=str(shared))
    items = job / "items.jsonl"
    refused = "not under a folder workers may read local inputs from (IMGJOBS_LOCAL_INPUT_ROOTS)"
    c = elsewhere / "c.png"
    assert [str(problem) for problem in caught.value.problems] == [
        f"{items}:3: image: {c}: {refused}: workers will refuse it",
        f"{items}:4: image: {c}: {refused}: workers will refuse it",
        f"{items}:5: image: {job / 'link.png'} (through a symbolic link, it is {c}): {refused}: workers will "
        "refuse it",
    ]
    roots = os.pathsep.join([str(elsewhere), str(shared)])
    assert validate_job(spec, REGISTRY, check_local=True, embedded_roots=roots).total == 7


def test_parameter_precedence_item_then_stage_then_defaults(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [
        {"id": "a", "image": "a.png"},
        {
            "id": "b",
            "image": "b.png",
            "strength": 0.3,
            "negative_prompt": "item-neg",
            "seed": 9,
            "prompt": "own",
        },
    ]
    spec = write_job(
        tmp_path,
        rows,
        model="sd15",
        stage={"type": "img2img", "model": "sd15", "strength": 0.6, "negative_prompt": "stage-neg"},
        defaults={
            "prompt": "default prompt",
            "negative_prompt": "default-neg",
            "seed": 5,
            "steps": 20,
            "size": "64x64",
        },
    )
    job, parts = parted(spec)
    by_id = {item.id: (item, params) for part in parts for item, params in part}
    stage, defaults = job.spec.stages[0], job.spec.defaults
    item_a, params_a = by_id["a"]
    resolved_a = (resolve_prompt(item_a, stage, defaults), resolve_negative_prompt(item_a, stage, defaults))
    assert resolved_a == ("default prompt", "stage-neg") and resolve_seed(item_a, defaults) == 5
    assert (params_a.strength, params_a.steps, params_a.guidance_scale, params_a.size) == (
        0.6,
        20,
        7.5,
        (64, 64),
    )
    item_b, params_b = by_id["b"]
    resolved_b = (resolve_prompt(item_b, stage, defaults), resolve_negative_prompt(item_b, stage, defaults))
    assert resolved_b == ("own", "item-neg") and (resolve_seed(item_b, defaults), params_b.strength) == (
        9,
        0.3,
    )
    assert item_a.image == str(tmp_path / "a.png")


def test_parts_keep_manifest_order_and_respect_chunk_size(tmp_path: Path) -> None:
    rows = items(7) + items(3, strength=0.5)
    for index, row in enumerate(rows):
        row["id"] = f"x{index}"
    spec = write_job(tmp_path, rows, model="sd15")
    job, parts = parted(spec, chunk_size=3)
    # Parts are manifest ranges; items with other parameters share them (a call groups them).
    assert [[item.id for item, _ in part] for part in parts] == [
        ["x0", "x1", "x2"],
        ["x3", "x4", "x5"],
        ["x6", "x7", "x8"],
        ["x9"],
    ]
    assert [params.strength for _, params in parts[2]] == [0.75, 0.5, 0.5]
    assert (job.total, job.chunk_size) == (10, 3)


def test_duplicate_ids_count_toward_the_problem_limit(tmp_path: Path) -> None:
    spec = write_job(tmp_path, [{"id": "same", "image": f"in/{n}.png"} for n in range(1000)], model="sd15")
    found = problems_of(spec)
    assert len(found) == 201, len(found)
    assert found[0].endswith("id: duplicate id 'same', first on line 1") and ":2:" in found[0]
    assert found[-1].endswith("stopped after 200 problems")


def test_names_with_a_trailing_newline_are_refused() -> None:
    # A regex's $ also matches before a final newline: "abc\n" passed as an item id, and so on.
    with pytest.raises(ValidationError, match="id"):
        Item(id="results.jsonl\n", image="a.png")
    with pytest.raises(ValidationError, match="name"):
        JobSpec.model_validate(
            {"version": 1, "name": "job\n", "output": "o", "items": "i.jsonl", "stages": [{"type": "resize"}]}
        )
    with pytest.raises(ValidationError, match="lowercase"):
        ScheduleEntry(name="nightly\n", every_s=5, source="x", output="o", stages=[{}])
    assert "\n" not in queue_for("sd15\n")  # a registry name like this one is refused by the same pattern
