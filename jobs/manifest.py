"""Reading and validating a job: the spec (YAML or JSON) and its items file (JSONL or CSV).

Validation streams the items once and collects every problem with its file and line; nothing is
enqueued unless there are none. For a submit, the same pass writes the items as parts (jobs/plan.py).
Nothing holds the items: what grows with their number is 8 bytes per item, to find duplicate ids.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import yaml
from pydantic import ValidationError

from jobs.plan import PartWriter, absolute_path
from jobs.prompts import PromptChecks
from jobs.recipe import plan_recipe
from jobs.registry import Location, Registry, error_message, yaml_child, yaml_line
from jobs.shards import indexed, is_shard_source, shard_uris, with_shard_error
from jobstate import layout
from jobstate.meta import JobMeta, chunk_size_for
from schemas.errors import ConfigError, ImgjobsError, Problem, SpecError
from schemas.job import (
    DEFAULT_SHARD_SIZE,
    IMAGE_URI_SCHEMES,
    JOB_HASH_CHARS,
    Item,
    JobSpec,
    ResolvedParams,
    StageSpec,
    overrides_of,
    resolve_params,
)
from schemas.messages import StagePlan
from schemas.registry import ResolvedModel
from schemas.settings import NOT_UNDER_ROOTS, LocalRoots, Settings, real_folders

MAX_SPEC_BYTES = 1 * 2**20
MAX_LINE_BYTES = 1 * 2**20
MAX_PROBLEMS = 200
MAX_WARNINGS = 5  # lines of a kind of warning shown; the rest are counted
REMOTE_SCHEMES = ("s3://", "http://", "https://")
MAX_ITEMS = 10_000_000
ITEM_FORMATS = (".jsonl", ".csv", ".parquet")
PARQUET_BATCH = 4096
STAGE_TYPES = ("img2img", "text2img", "upscale", "resize")
Located = tuple[int | None, Location]


@dataclass(frozen=True)
class ValidatedJob:
    spec: JobSpec
    spec_path: Path
    items_path: Path
    output: str
    job_id: str
    total: int
    recipe: tuple[StagePlan, ...]
    chunk_size: int
    parts: PartWriter | None = None  # the items, written as parts, when validation was asked to
    schedule: str | None = None  # the schedule whose firing submits the job
    warnings: tuple[str, ...] = ()  # what may not go as the user expects, though nothing is wrong
    local_inputs: int = 0  # items that read a local file
    first_local_input: str | None = None

    def notes(self, distributed: bool) -> list[str]:
        """The warnings to print before the job runs; `distributed`: its workers may be on other hosts."""
        notes = list(self.warnings)
        if distributed and self.local_inputs:
            notes.append(
                f"{self.local_inputs} item(s) read local files (such as {self.first_local_input}): "
                "workers on other hosts may not see them, and a worker reads only under its "
                "IMGJOBS_LOCAL_INPUT_ROOTS; s3:// inputs reach every worker"
            )
        return notes

    def meta(self, run_id: str) -> JobMeta:
        """The job as the state owner records it at submit."""
        return JobMeta(
            job_id=self.job_id,
            name=self.spec.name,
            output=self.output,
            total=self.total,
            chunk_size=self.chunk_size,
            run_id=run_id,
            spec=self.spec,
            recipe=self.recipe,
            submitted_at=time.time(),
            schedule=self.schedule,
        )

    @property
    def models(self) -> list[ResolvedModel]:
        """The distinct models the job runs on, in stage order."""
        return list({plan.model.name: plan.model for plan in self.recipe}.values())


def locate(root: yaml.Node | None, loc: Location) -> Located:
    """The 1-based line of the YAML node a pydantic error location points at, and the location
    without the stage type that pydantic inserts for a tagged union."""
    node, kept = root, list[int | str]()
    for position, key in enumerate(loc):
        tag_place = position >= 2 and loc[position - 2] == "stages" and isinstance(loc[position - 1], int)
        if tag_place and key in STAGE_TYPES:
            continue  # pydantic's tag of the stage union, which a stage field may share a name with (resize)
        child = yaml_child(node, key)
        if child is None:
            kept.extend(loc[position:])
            break
        node = child
        kept.append(key)
    return (node.start_mark.line + 1 if node is not None else None), tuple(kept)


def _problems_from(
    exc: ValidationError, file: str, locate: Callable[[Location], Located], root: Any
) -> list[Problem]:
    """Pydantic's errors as Problems; `root` is what was validated (a model or an annotation)."""
    problems = []
    for err in exc.errors():
        line, loc = locate(tuple(err["loc"]))
        field = ".".join(str(part) for part in loc) or None
        problems.append(Problem(file=file, line=line, field=field, message=error_message(err, root)))
    return problems


def load_spec(spec_path: Path) -> JobSpec:
    """The spec, or a SpecError with every problem of it located by line and field."""
    return _read_spec(spec_path)[0]


def _read_spec(spec_path: Path) -> tuple[JobSpec, yaml.Node | None]:
    """The spec, and its YAML nodes, which know the line of every field."""
    file = str(spec_path)
    try:
        if spec_path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError([Problem(file, None, None, f"spec is larger than {MAX_SPEC_BYTES} bytes")])
        text = spec_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([Problem(file, None, None, f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise SpecError([Problem(file, None, None, "not UTF-8 text")]) from None
    try:
        # JSON is read by the YAML parser too; safe_load builds plain data only, never objects.
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise SpecError([Problem(file, None, None, "not valid YAML/JSON: nested too deeply")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise SpecError(
            [Problem(file, line, None, f"not valid YAML/JSON: {getattr(exc, 'problem', exc)}")]
        ) from None
    if not isinstance(data, dict):
        raise SpecError(
            [Problem(file, 1, None, "the spec must be a mapping of version, name, output, items, stages")]
        )
    try:
        return JobSpec.model_validate(data), root
    except ValidationError as exc:
        raise SpecError(_problems_from(exc, file, lambda loc: locate(root, loc), JobSpec)) from None


def _on_spec_lines(problems: list[Problem], file: str, root: yaml.Node | None) -> list[Problem]:
    """The spec's problems found after parsing (models, handovers, the items file) on the line of
    their field, as parse errors are."""
    return [
        replace(problem, line=yaml_line(root, _keys_of(problem.field)))
        if problem.file == file and problem.line is None and problem.field
        else problem
        for problem in problems
    ]


def _keys_of(field: str) -> Location:
    return tuple(int(part) if part.isdigit() else part for part in field.split("."))


def _bounded_lines(raw: Any) -> Iterator[bytes | None]:
    """Lines of a binary file, never holding more than MAX_LINE_BYTES of one; None for a longer line."""
    while line := raw.readline(MAX_LINE_BYTES + 1):
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while (rest := raw.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass
            yield None
            continue
        yield line


def _parquet_rows(items_path: Path, digest: Any) -> Iterator[tuple[int, Row]]:
    """(row number, row) of a Parquet file, read a batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(items_path).iter_batches(batch_size=PARQUET_BATCH):
            for row in batch.to_pylist():
                number += 1
                digest.update(json.dumps(row, sort_keys=True, default=str).encode())
                yield number, {key: value for key, value in row.items() if value is not None}
    except (pa.ArrowException, OSError) as exc:
        yield number + 1, f"not a readable Parquet file: {exc}"


Row = dict[str, Any] | bytes | str


def _raw_rows(items_path: Path, digest: Any) -> Iterator[tuple[int, Row]]:
    """(line, row) for each item, or (line, message) where the line itself cannot be read; a JSONL
    line comes unparsed (bytes), for the caller to parse; for Parquet the "line" is the row number."""
    suffix = items_path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(items_path, digest)
        return
    with items_path.open("rb") as raw:
        if suffix == ".jsonl":
            for number, line in enumerate(_bounded_lines(raw), start=1):
                if line is None:
                    yield number, f"line is longer than {MAX_LINE_BYTES} bytes"
                    continue
                digest.update(line)
                if line.strip():
                    yield number, line
        else:
            yield from _csv_rows(raw, digest)


def _csv_rows(raw: Any, digest: Any) -> Iterator[tuple[int, Row]]:
    """(line, row) of a CSV file with a header row: a row's last line (a quoted field may span
    several), or for an error the line after the last row read, where the broken row begins. An
    error ends the file, since what follows it cannot be split into rows reliably."""
    # utf-8-sig: the byte-order mark Excel writes would otherwise be part of the first column's name.
    text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
    # strict: without it, a quote never closed makes one field of the rest of the file, silently.
    reader = csv.DictReader(text, strict=True)
    read = 0  # the last line of the header or of the last row
    try:
        if reader.fieldnames is None:
            return  # an empty file
        read = reader.line_num
        for row in reader:
            read = reader.line_num
            if None in row:
                yield read, "more values than header columns"
                continue
            digest.update(json.dumps(row, sort_keys=True).encode())
            yield read, {k: v for k, v in row.items() if k and v not in (None, "")}
    except csv.Error as exc:
        yield read + 1, f"not valid CSV: {_csv_reason(exc)}"
    except UnicodeDecodeError as exc:
        yield read + 1, f"not valid CSV: {exc}"


def _csv_reason(exc: csv.Error) -> str:
    """The csv module's error in words that point at the usual cause, a quote never closed."""
    if str(exc) == "unexpected end of data":
        return "a quoted field begun on this row is never closed (it runs to the end of the file)"
    if "field larger than field limit" in str(exc):
        return f"{exc}; a quote begun on this row may never be closed"
    return str(exc)


StageParams = ResolvedParams | list[str]  # a stage's parameters, or why the item's values are refused


class ParamsResolver:
    """Each stage's parameters for an item, resolved once per distinct set of the item's overrides.
    An item overrides a parameter by the same name (see schemas.job.resolve_params), so items that
    are equal there resolve alike; this saves a validation per item and stage, a good part of the
    cost of reading a large manifest. The memo is cleared when it grows past MEMO_SIZE sets."""

    MEMO_SIZE = 4096

    def __init__(self, spec: JobSpec, recipe: Sequence[StagePlan] = ()) -> None:
        self.spec = spec
        # The stages as planned where every one is: with what their models add (a sampler).
        self.stages = [plan.spec for plan in recipe] if len(recipe) == len(spec.stages) else spec.stages
        self._memo: dict[tuple[object, ...], tuple[list[StageParams], bool]] = {}
        self.starts_with_text = spec.stages[0].type == "text2img"
        self.has_controlnet = any(getattr(stage, "controlnet", None) for stage in spec.stages)

    def _known(self, item: Item) -> tuple[list[StageParams], bool]:
        key = overrides_of(item)
        known = self._memo.get(key)
        if known is None:
            if len(self._memo) >= self.MEMO_SIZE:
                self._memo.clear()
            resolved = [self._resolve(item, stage) for stage in self.stages]
            known = self._memo[key] = (resolved, any(isinstance(params, list) for params in resolved))
        return known

    def resolve(self, item: Item) -> list[StageParams]:
        return self._known(item)[0]

    def refused(self, item: Item) -> bool:
        """Whether any stage refuses the item's parameters."""
        return self._known(item)[1]

    def _resolve(self, item: Item, stage: StageSpec) -> StageParams:
        try:
            return resolve_params(item, stage, self.spec.defaults)
        except ValidationError as exc:
            return [err["msg"].removeprefix("Value error, ") for err in exc.errors()]


def _json_row(line: bytes) -> dict[str, Any] | str:
    """A JSONL line as a mapping, or why it is not one."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not valid JSON: {exc.msg} {_json_place(exc)}"
    except UnicodeDecodeError as exc:
        return f"not valid JSON: {exc}"
    except RecursionError:
        return "not valid JSON: nested too deeply"
    return row if isinstance(row, dict) else "each line must be a JSON object"


def _json_place(exc: json.JSONDecodeError) -> str:
    """Where on its manifest line JSON's parser stopped. The line number is the caller's: JSON's own
    counts from the line's start and passes 1 at its final newline, a second, misleading one."""
    if not exc.doc[exc.pos :].strip():
        return "at the end of the line"
    return f"at column {exc.pos + 1}"


def _parsed(row: dict[str, Any] | bytes, file: str, line: int) -> tuple[Item | None, list[Problem]]:
    if isinstance(row, bytes):
        # Pydantic's own JSON parsing is about twice as fast as json.loads followed by model_validate.
        # Where it refuses a line, the line is read the second way, whose errors name the field.
        try:
            return Item.model_validate_json(row), []
        except ValidationError:
            parsed = _json_row(row)
            if isinstance(parsed, str):
                return None, [Problem(file, line, None, parsed)]
            row = parsed
    try:
        return Item.model_validate(row), []
    except ValidationError as exc:
        return None, _problems_from(exc, file, lambda loc: (line, loc), Item)


def _check_item(
    resolver: ParamsResolver, file: str, line: int, row: dict[str, Any] | bytes
) -> tuple[Item | None, list[Problem]]:
    item, problems = _parsed(row, file, line)
    if item is None:
        return None, problems
    starts_with_text = resolver.starts_with_text
    if (item.image is None) != starts_with_text or (item.control_image and not resolver.has_controlnet):
        if item.image is None and not starts_with_text:
            problems.append(Problem(file, line, "image", "required unless the first stage is text2img"))
        if item.image is not None and starts_with_text:
            problems.append(Problem(file, line, "image", "the first stage is text2img, which takes no image"))
        if item.control_image is not None and not resolver.has_controlnet:
            problems.append(Problem(file, line, "control_image", "no stage of this job has a controlnet"))
    if resolver.spec.output_format == "webdataset" and "." in item.id:
        problems.append(
            Problem(
                file,
                line,
                "id",
                "a WebDataset key ends at its first '.': ids of a webdataset output have none",
            )
        )
    if resolver.refused(item):
        for index, params in enumerate(resolver.resolve(item)):
            if isinstance(params, list):
                problems.extend(Problem(file, line, f"stages.{index}", message) for message in params)
    return item, problems


class _DuplicateIds:
    """Repeated item ids, found with 8 bytes per item where a set of the ids would take about 100: each
    id's 64-bit hash is kept, and only ids whose hash occurs twice are read again and compared."""

    BUCKETS = 16  # hashes kept in buckets by their low bits, so no array grows past 1/16 of the whole

    def __init__(self) -> None:
        self._buckets = [array("q") for _ in range(self.BUCKETS)]

    def add(self, item_id: str) -> None:
        value = hash(item_id)
        self._buckets[value & (self.BUCKETS - 1)].append(value)

    def _repeated(self) -> set[int]:
        repeated: set[int] = set()
        for bucket in self._buckets:
            ordered = np.frombuffer(bucket, dtype=np.int64)
            ordered.sort()  # in place, in the array's own memory: no copy of 8 bytes per item
            repeated.update(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
        return repeated

    def problems(
        self,
        resolver: ParamsResolver,
        rows: Iterator[tuple[str, int, Row]],
        budget: int,
        last_line: int | None,
    ) -> list[Problem]:
        """At most `budget` duplicates, among the rows (read again) up to last_line (where validation
        stopped)."""
        repeated = self._repeated()
        if not repeated or budget <= 0:
            return []
        first_line, problems = dict[str, tuple[str, int]](), list[Problem]()
        for file, line, row in rows:
            if len(problems) >= budget or (last_line is not None and line > last_line):
                break
            if isinstance(row, bytes):
                row = _json_row(row)
            item_id = row.get("id") if isinstance(row, dict) else None
            if not isinstance(row, dict) or not isinstance(item_id, str) or hash(item_id) not in repeated:
                continue
            item, _ = _check_item(resolver, file, line, row)
            if item is None:
                continue  # reported already, and not counted as a use of its id
            if item.id in first_line:
                first_file, first = first_line[item.id]
                where = f"line {first}" if first_file == file else f"{first_file}:{first}"
                problems.append(Problem(file, line, "id", f"duplicate id {item.id!r}, first on {where}"))
            first_line.setdefault(item.id, (file, line))
        return problems


# Spec fields that count toward the job id only where set to other than their default, so that a job
# written before they existed keeps its id.
OPTIONAL_IN_ID = ("samples", "output_format", "shard_size")


def spec_identity(spec: JobSpec) -> str:
    """What of the spec the job id covers: all but the priority (the same work sent at another
    priority is the same job)."""
    defaults = {name for name in OPTIONAL_IN_ID if getattr(spec, name) == JobSpec.model_fields[name].default}
    return spec.model_dump_json(exclude={"priority", *defaults})


def items_path_of(spec: JobSpec, spec_path: Path) -> Path:
    return (spec_path.parent / spec.items).resolve()


def output_of(spec: JobSpec, spec_path: Path) -> str:
    if spec.output.startswith("s3://"):
        return spec.output.rstrip("/")
    local = Path(spec.output.removeprefix("file://")).expanduser()
    return str(local if local.is_absolute() else (spec_path.parent / local).resolve())


def _unusable_items_file(items_path: Path) -> str | None:
    """Why the items file cannot be read, if it cannot."""
    if items_path.is_dir():
        return f"{items_path} is a folder; items names a file ({', '.join(ITEM_FORMATS)})"
    if items_path.suffix.lower() not in ITEM_FORMATS:
        return f"items file must be one of {ITEM_FORMATS}"
    if not items_path.is_file():
        return f"no such file: {items_path}"
    try:
        items_path.open("rb").close()
    except OSError as exc:
        return f"cannot read {items_path}: {exc.strerror}"
    return None


@dataclass(frozen=True)
class LocalInput:
    """A local input of a manifest line, for `validate --check-inputs` to decode (workers/check_inputs.py)."""

    file: str
    line: int | None
    field: str
    path: str

    def to_line(self) -> str:
        return json.dumps(asdict(self)) + "\n"


def local_input_problems(item: Item, items_dir: Path) -> list[tuple[str, str]]:
    """(field, message) for each local input of the item that is missing or is a folder, as this
    machine sees it: only where the workers share its files (validate, an embedded run)."""
    problems: list[tuple[str, str]] = []
    if item.sample is not None:
        return problems  # its shard was read when it was indexed
    for field, uri in (("image", item.image), ("control_image", item.control_image)):
        path = absolute_path(uri, items_dir)
        if path is None:
            continue
        if not os.path.exists(path):
            problems.append((field, f"no such file: {path}"))
        elif os.path.isdir(path):
            problems.append((field, f"{path} is a folder, not an image"))
    return problems


def embedded_input_roots(operator_roots: str | None, spec_path: Path, items_path: Path) -> str:
    """What an embedded run's workers may read local inputs from, as IMGJOBS_LOCAL_INPUT_ROOTS: the
    job's own folders (the spec's and the manifest's, which relative paths start from) and any the
    operator set."""
    folders = [operator_roots or "", str(spec_path.resolve().parent), str(items_path.resolve().parent)]
    return os.pathsep.join(dict.fromkeys(folder for folder in folders if folder))


def embedded_roots(settings: Settings) -> str | None:
    """validate_job's `embedded_roots` for a run with these settings: None where a broker's workers run
    it, elsewhere, with folders of their own."""
    return None if settings.broker_url else settings.local_input_roots or ""


def _names_local_file(uri: str | None) -> bool:
    return uri is not None and (uri.startswith("file://") or not uri.startswith(IMAGE_URI_SCHEMES))


def _relative(uri: str | None) -> bool:
    return _names_local_file(uri) and not os.path.isabs(os.path.expanduser(uri or "").removeprefix("file://"))


class _JobDigest:
    """The job id's hash, fed in one pass both with and without the manifest's folder: the folder is
    part of what the job runs only where an item names a path relative to it. A manifest of absolute
    paths or URIs (as `submit --from` writes into a temporary folder) thus gives the same id wherever
    it lies, while the id of one with relative paths is the one it always had."""

    def __init__(self, head: bytes, folder: str, output: str) -> None:
        self.with_folder = hashlib.sha256(head)
        self.without_folder = self.with_folder.copy()
        self.with_folder.update(f"{folder}\n{output}\n".encode())
        self.without_folder.update(f"{output}\n".encode())
        self.relative_paths = False

    def update(self, data: bytes) -> None:
        self.with_folder.update(data)
        self.without_folder.update(data)

    def hexdigest(self) -> str:
        return (self.with_folder if self.relative_paths else self.without_folder).hexdigest()


def output_problem(output: str) -> str | None:
    """Why a local output folder can never be written (a file on its path, no permission); None for
    S3, which only a write can tell."""
    if output.startswith("s3://"):
        return None
    existing = Path(output)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot be written: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be written: no permission to write in {existing}"
    return None


class _ShardRows:
    """The rows of a job's input shards (jobs/shards.py), indexed as they are read; the ids are kept
    in a temporary file, so that repeated ones are located without reading the shards again."""

    def __init__(self, uris: list[str], spec: JobSpec, strict: bool) -> None:
        self.uris, self.spec, self.strict = uris, spec, strict
        self.problems: list[Problem] = []
        self.notes: list[str] = []
        self._ids = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def rows(self, digest: Any) -> Iterator[tuple[str, int, Row]]:
        for index in indexed(self.uris, self.spec.samples):
            rows = index.rows
            if index.error is not None:
                if self.strict:
                    self.problems.append(Problem(index.uri, None, None, index.error))
                    continue
                rows = with_shard_error(index)
                fate = (
                    f"its {len(rows)} sample(s) fail with this reason"
                    if rows
                    else "no sample of it is in the job"
                )
                self.notes.append(f"{index.uri}: {index.error}; {fate}")
            digest.update(f"{index.uri}\n".encode())
            for number, row in enumerate(rows, start=1):
                digest.update(json.dumps(row, sort_keys=True).encode())
                self._ids.write(json.dumps([index.uri, number, row["id"]]) + "\n")
                yield index.uri, number, row

    def ids(self) -> Iterator[tuple[str, int, Row]]:
        self._ids.seek(0)
        for line in self._ids:
            uri, number, item_id = json.loads(line)
            yield uri, number, {"id": item_id}

    def close(self) -> None:
        self._ids.close()


def validate_job(
    spec_path: Path,
    registry: Registry,
    parts_to: Path | None = None,
    chunk_size: int | None = None,
    check_local: bool = False,
    local_inputs: TextIO | None = None,
    embedded_roots: str | None = None,
) -> ValidatedJob:
    """Every problem of the spec and all its items, raised together as one SpecError. With
    `parts_to`, the items are also written there as parts of the job's chunk size (`chunk_size`
    overrides the models'), in the same pass: what `imgjobs submit` publishes. With `check_local`,
    local inputs must exist and a local output must be writable, as seen from this machine; each
    local input that exists is then also written to `local_inputs`, where given, as a LocalInput JSON
    line, for `validate --check-inputs` to decode. With `embedded_roots` (the operator's
    IMGJOBS_LOCAL_INPUT_ROOTS, "" for none), a local input must also be one that an embedded run's
    workers may read: under those folders or the job's own (embedded_input_roots)."""
    spec, root = _read_spec(spec_path)
    recipe, problems = plan_recipe(spec, registry, spec_path.parent, str(spec_path))
    items_path = items_path_of(spec, spec_path)
    shards: _ShardRows | None = None
    unusable: str | None = None
    if is_shard_source(spec.items, spec_path.parent):
        try:
            shards = _ShardRows(shard_uris(spec.items, spec_path.parent), spec, strict=check_local)
        except ConfigError as exc:
            unusable = str(exc).removeprefix("items: ")
    else:
        unusable = _unusable_items_file(items_path)
    if unusable is not None:
        problems.append(Problem(str(spec_path), None, "items", unusable))
    prompts = PromptChecks(spec)
    problems.extend(Problem(str(spec_path), None, field, message) for field, message in prompts.spec_problems)
    problems = _on_spec_lines(problems, str(spec_path), root)
    if unusable is not None:
        raise SpecError(problems)
    warnings = [
        str(problem)
        for problem in _on_spec_lines(
            [Problem(str(spec_path), None, field, message) for field, message in prompts.spec_warnings],
            str(spec_path),
            root,
        )
    ]

    output = output_of(spec, spec_path)
    unwritable = output_problem(output) if check_local else None
    if unwritable is not None:
        problems.extend(
            _on_spec_lines([Problem(str(spec_path), None, "output", unwritable)], str(spec_path), root)
        )
    roots = (
        LocalRoots(real_folders(embedded_input_roots(embedded_roots, spec_path, items_path)))
        if check_local and embedded_roots is not None
        else None
    )
    # The id covers what the job will run: the spec, the resolved models, where relative paths point
    # and where outputs go, then every item. Not the priority: the same work sent at another priority is
    # the same job.
    digest = _JobDigest(
        spec_identity(spec).encode() + json.dumps([plan.model_dump(mode="json") for plan in recipe]).encode(),
        str(items_path.parent),
        output,
    )
    duplicates = _DuplicateIds()
    resolver = ParamsResolver(spec, recipe)
    item_problems: list[Problem] = []
    unreadable: dict[int, str] = {}  # index in item_problems -> the input's real path
    long_prompts = 0
    local_count, first_local = 0, None
    stopped: Problem | None = None
    total = 0
    file = str(items_path)
    if spec.sharded:  # an output shard is one chunk's items (workers/shard_sink.py)
        size = spec.shard_size or DEFAULT_SHARD_SIZE
    else:
        size = chunk_size_for(recipe, chunk_size) if recipe else 1
    writer = PartWriter(parts_to, size, items_path.parent) if parts_to is not None else None
    rows = (
        shards.rows(digest)
        if shards is not None
        else ((file, line, row) for line, row in _raw_rows(items_path, digest))
    )
    for file, line, row in rows:
        if isinstance(row, str):
            item_problems.append(Problem(file, line, None, row))
            continue
        item, found = _check_item(resolver, file, line, row)
        item_problems.extend(found)
        if item is not None:
            if prompts.weighted and (item.prompt is not None or item.negative_prompt is not None):
                for field, message in prompts.item_problems(item.prompt, item.negative_prompt):
                    item_problems.append(Problem(file, line, field, message))
            if prompts.plain and item.prompt is not None:
                warning = prompts.item_warning(item.prompt)
                if warning is not None:
                    long_prompts += 1
                    if long_prompts <= MAX_WARNINGS:
                        warnings.append(str(Problem(file, line, *warning)))
            image, control = item.image, item.control_image
            if (image is not None and not image.startswith(REMOTE_SCHEMES)) or control is not None:
                local = image if _names_local_file(image) else control if _names_local_file(control) else None
                if local is not None:
                    local_count += 1
                    first_local = first_local or local
                    digest.relative_paths = digest.relative_paths or _relative(image) or _relative(control)
        if check_local and item is not None:
            item_dir = items_path.parent
            missing = local_input_problems(item, item_dir)
            item_problems.extend(Problem(file, line, field, message) for field, message in missing)
            # A sample's shard was read to index it; its `image` names a member, not a file.
            for field, uri in (
                () if item.sample else (("image", item.image), ("control_image", item.control_image))
            ):
                path = absolute_path(uri, item_dir)
                if path is None or field in {name for name, _ in missing}:
                    continue
                if roots is not None and not roots.allows(path):
                    unreadable[len(item_problems)] = os.path.realpath(path)
                    message = (
                        f"{path}{_reaches(uri or path, path)}: {NOT_UNDER_ROOTS}: workers will refuse it"
                    )
                    item_problems.append(Problem(file, line, field, message))
                elif local_inputs is not None:
                    local_inputs.write(LocalInput(file=file, line=line, field=field, path=path).to_line())
        if item is not None:
            duplicates.add(item.id)
            if writer is not None and not item_problems:
                writer.add(item, row if isinstance(row, bytes) else None)
        total += 1
        if total > MAX_ITEMS:
            stopped = Problem(file, line, None, f"more than {MAX_ITEMS} items; split the job")
            break
        if len(item_problems) >= MAX_PROBLEMS:
            stopped = Problem(file, line, None, f"stopped after {MAX_PROBLEMS} problems")
            break
    job_id = f"{spec.name}-{digest.hexdigest()[:JOB_HASH_CHARS]}"
    if unreadable and roots is not None:
        # Workers may also read the job's own output folder (what earlier stages wrote there).
        job_folder = LocalRoots(real_folders(layout.job_root(output, job_id)))
        item_problems = [
            problem
            for index, problem in enumerate(item_problems)
            if index not in unreadable or not job_folder.allows(unreadable[index])
        ]
    budget = MAX_PROBLEMS - len(item_problems)
    if shards is not None:
        item_problems.extend(shards.problems)
        repeats = duplicates.problems(resolver, shards.ids(), budget, None)
        shards.close()
    else:
        last_line = stopped.line if stopped is not None else None
        reread = ((str(items_path), line, row) for line, row in _raw_rows(items_path, hashlib.sha256()))
        repeats = duplicates.problems(resolver, reread, budget, last_line)
    item_problems.extend(repeats)
    if stopped is None and repeats and len(repeats) >= budget:
        stopped = Problem(file, repeats[-1].line, None, f"stopped after {MAX_PROBLEMS} problems")
    problems.extend(sorted(item_problems, key=lambda problem: problem.line or 0))
    if stopped is not None:
        problems.append(stopped)
    if total == 0 and not problems:
        problems.append(Problem(file, None, None, "no items"))
    if writer is not None:
        writer.close()
    if problems:
        raise SpecError(problems)
    if long_prompts > MAX_WARNINGS:
        warnings.append(f"{file}: {long_prompts - MAX_WARNINGS} more item(s) whose prompt may be cut short")
    return ValidatedJob(
        spec=spec,
        spec_path=spec_path.resolve(),
        items_path=items_path,
        output=output,
        job_id=job_id,
        total=total,
        recipe=tuple(recipe),
        chunk_size=size,
        parts=writer,
        warnings=(*warnings, *(shards.notes if shards is not None else ())),
        local_inputs=local_count,
        first_local_input=first_local,
    )


def _reaches(uri: str, path: str) -> str:
    """Where a path that leaves the allowed folders leads, when its text does not say so."""
    real = os.path.realpath(path)
    if real == os.path.normpath(path):
        return ""
    through = "a symbolic link" if ".." not in Path(uri).parts else "'..'"
    return f" (through {through}, it is {real})"


def check_job(
    spec_path: Path, registry: Registry, decode: bool = False, embedded_roots: str | None = None
) -> ValidatedJob:
    """The job validated as `imgjobs validate` does, as seen from this machine: local inputs exist and
    a local output can be written (with `embedded_roots`, as validate_job says, where an embedded run's
    workers may read them); with `decode`, local inputs are decoded too, as workers will."""
    if not decode:
        return validate_job(spec_path, registry, check_local=True, embedded_roots=embedded_roots)
    with tempfile.TemporaryFile("w+", encoding="utf-8") as local_inputs:
        problems: list[Problem] = []
        try:
            validated = validate_job(
                spec_path,
                registry,
                check_local=True,
                local_inputs=local_inputs,
                embedded_roots=embedded_roots,
            )
        except SpecError as exc:
            problems = list(exc.problems)
        local_inputs.seek(0)
        problems += _undecodable_inputs(local_inputs)
    if problems:
        # The spec's problems first, then the manifest's by line, as validation alone orders them.
        raise SpecError(
            sorted(problems, key=lambda problem: (problem.file != str(spec_path), problem.line or 0))
        )
    return validated


def _undecodable_inputs(local_inputs: TextIO) -> list[Problem]:
    """The local inputs workers could not decode, each a problem of its manifest line. Decoded by
    workers/check_inputs.py, in its own interpreter: the producer never imports the workers' code."""
    if importlib.util.find_spec("workers") is None:
        raise ConfigError(
            "--check-inputs decodes with the workers' code, which this installation lacks (the producer "
            "image); run it where imgjobs's workers are installed"
        )
    checked = subprocess.run(
        [sys.executable, "-m", "workers.check_inputs"],
        stdin=local_inputs,
        capture_output=True,
        text=True,
        check=False,
    )
    if checked.returncode != 0:
        raise ImgjobsError(f"--check-inputs: decoding the inputs failed:\n{checked.stderr[-2000:]}")
    failed = [json.loads(line) for line in checked.stdout.splitlines()]
    return [Problem(entry["file"], entry["line"], entry["field"], entry["error"]) for entry in failed]
