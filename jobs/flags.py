"""What the commands' flags say, checked: KEY=VALUE pairs, what `imgjobs retry` runs again and with
what changed, and the job `imgjobs submit --from` builds from a listing and its flags. Each wrong
value is a ConfigError that names its flag."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import ValidationError

from jobs.console import err
from jobs.registry import did_you_mean
from jobs.shards import SHARD_SUFFIXES, write_shards_job
from jobs.sources import write_listing_job
from schemas.errors import ConfigError, ImgjobsError, ItemError, Problem, SpecError
from schemas.job import JOB_ID_PATTERN, RETRY_SETTABLE, Item, Priority


def key_values(pairs: list[str], flag: str = "--param") -> dict[str, object]:
    """KEY=VALUE pairs, each value read as a YAML scalar (4 -> int, 0.5 -> float, text -> str)."""
    parsed: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {pair!r}: expected KEY=VALUE")
        try:
            parsed[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{flag} {pair!r}: not a valid value: {getattr(exc, 'problem', exc)}") from None
    return parsed


def check_job_id(value: str) -> str:
    """A job id argument: a job's name and hash, which never names a path."""
    if not JOB_ID_PATTERN.match(value):
        raise ConfigError(
            f"{value!r} is not a job id: a job's id is its name (lowercase letters, digits and '-') and a "
            "hash, as `imgjobs submit` and `imgjobs jobs` print it"
        )
    return value


def _error_types(root: type[ImgjobsError] = ImgjobsError) -> set[str]:
    return {root.__name__}.union(*(_error_types(sub) for sub in root.__subclasses__()))


def error_type(reason: str | None) -> str | None:
    """--reason: the name of an error type results record (the tree of schemas/errors.py)."""
    known = _error_types()
    if reason is None or reason in known:
        return reason
    types = sorted(_error_types(ItemError) - {ItemError.__name__})
    hint = did_you_mean(reason, known) or f"the types items fail with: {', '.join(types)}"
    raise ConfigError(f"--reason {reason}: no item fails with an error of that type; {hint}")


@dataclass(frozen=True)
class RetryChoice:
    """`imgjobs retry --reason --ids --ids-from --set`: which failed items run again, changed how."""

    reason: str | None
    ids: frozenset[str] | None  # None: every failed item (of the reason)
    overrides: dict[str, object]

    @classmethod
    def of(cls, reason: str | None, ids: str | None, ids_from: Path | None, sets: list[str]) -> RetryChoice:
        return cls(reason, _retry_ids(ids, ids_from), _retry_overrides(sets))


def _retry_ids(ids: str | None, ids_from: Path | None) -> frozenset[str] | None:
    """--ids and --ids-from together: the items to retry, or None for every failed item."""
    if ids is None and ids_from is None:
        return None
    chosen = {part.strip() for part in (ids or "").split(",") if part.strip()}
    if ids_from is not None:
        try:
            text = ids_from.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--ids-from {ids_from}: {getattr(exc, 'strerror', None) or exc}") from None
        chosen |= {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}
    if not chosen:
        raise ConfigError("--ids/--ids-from: no item id given")
    return frozenset(chosen)


def _retry_overrides(pairs: list[str]) -> dict[str, object]:
    """--set KEY=VALUE pairs as item fields (JSON values), each checked as a manifest row's field is."""
    overrides: dict[str, object] = {}
    for key, value in key_values(pairs, flag="--set").items():
        if key not in RETRY_SETTABLE:
            hint = did_you_mean(key, RETRY_SETTABLE) or f"it can change {', '.join(RETRY_SETTABLE)}"
            raise ConfigError(f"--set {key}: not a field retry can change; {hint}")
        try:
            checked = Item.model_validate({"id": "retry", key: value})
        except ValidationError as exc:
            raise ConfigError(f"--set {key}={value}: {exc.errors()[0]['msg']}") from None
        overrides[key] = checked.model_dump(mode="json")[key]
    return overrides


# The fields of the job `submit --from` generates, by the flag that set them.
LISTING_FLAGS = {
    "name": "--name",
    "output": "--output",
    "dataset": "--dataset",
    "output_format": "--output-format",
    "shard_size": "--shard-size",
    "defaults.size": "--size",
    "stages.0.type": "--stage",
    "stages.0.model": "--model",
}


@dataclass(frozen=True)
class Listing:
    """`imgjobs submit --from PATTERN` and the flags that make its job."""

    pattern: str
    model: str | None
    output: str | None
    prompt: str | None
    stage: str
    name: str
    params: list[str]
    size: str | None
    dataset: bool
    output_format: str | None = None
    shard_size: int | None = None

    def write_job(self, folder: Path) -> Path:
        """job.json and items.jsonl in `folder`, one item per image the pattern lists; the spec's path."""
        if self.model is None or self.output is None:
            raise ConfigError("--from needs --model and --output")
        # A local output is relative to where the command runs, not to the generated job's folder.
        where = self.output if "://" in self.output else str(Path(self.output).resolve())
        stage_spec = {"type": self.stage, "model": self.model, **key_values(self.params)}
        spec = {
            "version": 1,
            "name": self.name,
            "output": where,
            "stages": [stage_spec],
            "dataset": self.dataset,
        }
        if self.size is not None:
            spec["defaults"] = {"size": self.size}
        spec |= {"output_format": self.output_format} if self.output_format else {}
        spec |= {"shard_size": self.shard_size} if self.shard_size is not None else {}
        if self.pattern.lower().endswith(SHARD_SUFFIXES):
            job, count = write_shards_job(folder, self.pattern, spec, self.prompt)
            err.print(f"--from {self.pattern}: {count} input shard(s)")
        else:
            job, count = write_listing_job(folder, self.pattern, spec, self.prompt)
            err.print(f"--from {self.pattern}: {count} image(s)")
        return job

    def named_by_flags(self, exc: SpecError, spec_file: Path) -> SpecError:
        """The problems of the job it generated, each named by the flag behind its field: the job file
        validation names is a temporary one, gone when the command ends."""
        parameters = key_values(self.params)

        def flag_of(field: str | None) -> str:
            key = (field or "").removeprefix("stages.0.")
            if field and field.startswith("stages.0.") and key in parameters:
                return f"--param {key}"
            if field == "stages.0":  # the stage as a whole: what its parameters make of it, or its type
                return "--param" if parameters else "--stage"
            return LISTING_FLAGS.get(field or "", "--from")

        renamed = [
            Problem(flag_of(problem.field), None, None, problem.message)
            if problem.file == str(spec_file)
            else problem
            for problem in exc.problems
        ]
        return SpecError(renamed)


# The options and arguments several commands share.
ModelsOption = Annotated[
    Path | None,
    typer.Option("--models", help="models.yaml registry (default: $IMGJOBS_MODELS)", show_default=False),
]
DryRunOption = Annotated[
    bool,
    typer.Option("--dry-run", help="validate, plan and estimate the job; send and write nothing"),
]
JobArgument = Annotated[Path, typer.Argument(help="job spec, YAML or JSON", show_default=False)]
JobIdArgument = Annotated[str, typer.Argument(show_default=False, callback=check_job_id)]
ReasonOption = Annotated[
    str | None,
    typer.Option(help="only failures of this error type, e.g. InputImageError", callback=error_type),
]
PriorityOption = Annotated[
    Priority | None,
    typer.Option(help="workers take high jobs' chunks first, low last; default: the spec's, else normal"),
]
