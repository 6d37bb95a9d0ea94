"""The `imgjobs` command line."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import IO, Annotated

import redis
import typer
import yaml
from pydantic import ValidationError
from rich.table import Table

from jobs import redrive, scheduler
from jobs.broker import connect_redis, producer_app, require_broker_url
from jobs.console import (
    err,
    local_time,
    out,
    print_estimate,
    print_failure_groups,
    print_failures,
    print_jobs,
    print_summary,
    progress_bar,
)
from jobs.consumers import ConsumerWatch, consumed_queues
from jobs.embedded import EmbeddedState, Interrupted, LocalWorker, state_root, stopped_by_signals
from jobs.estimate import estimate
from jobs.manifest import ValidatedJob, embedded_input_roots, embedded_roots, validate_job
from jobs.metrics import BrokerCollector
from jobs.producer import prepared, send_chunks, sender
from jobs.producer import submit as submit_job
from jobs.registry import Registry, did_you_mean
from jobs.shards import SHARD_SUFFIXES, write_shards_job
from jobs.sources import write_listing_job
from jobs.views import (
    FailureGroup,
    JobFilter,
    RateMeter,
    average_rate,
    failures_by_reason,
    log_lines_naming,
    newest_first,
    parse_since,
    status_document,
)
from jobstate.rates import RateBook
from jobstate.store import JobStore
from schemas.errors import (
    BrokerUnavailableError,
    ConfigError,
    ImgjobsError,
    Problem,
    SpecError,
    StorageRefusedError,
    UnknownJobError,
)
from schemas.job import RETRY_SETTABLE, Item, Priority
from schemas.messages import JOB_END_QUEUE, WORKER_MODEL_ENV, WorkerModel
from schemas.progress import JobState, JobStatus
from schemas.registry import ResolvedModel
from schemas.schedule import parse_duration
from schemas.settings import Settings

app = typer.Typer(
    help="Batch image-to-image jobs with diffusers on Celery workers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_SIGNAL = 128  # + the signal's number, as shells report a command a signal stopped
POLL_S = 0.5
DEFAULT_METRICS_PORT = 9108


def _print_version(wanted: bool) -> None:
    if wanted:
        print(f"imgjobs {package_version('imgjobs')}")
        raise typer.Exit(0)


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", help="print the version and exit", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    """Batch image-to-image jobs with diffusers on Celery workers."""


ModelsOption = Annotated[
    Path | None,
    typer.Option("--models", help="models.yaml registry (default: $IMGJOBS_MODELS)", show_default=False),
]
DryRunOption = Annotated[
    bool,
    typer.Option("--dry-run", help="validate, plan and estimate the job; send and write nothing"),
]
JobArgument = Annotated[Path, typer.Argument(help="job spec, YAML or JSON", show_default=False)]


def _registry(models: Path | None, settings: Settings, check_sources: bool = False) -> Registry:
    """The registry; with check_sources, on a machine that loads its models (or validates for one),
    a local source that cannot load is an error as the job resolves it."""
    registry = Registry.load(models or settings.models)
    registry.check_sources = check_sources
    return registry


@app.command()
def validate(
    job: JobArgument,
    models: ModelsOption = None,
    check_inputs: Annotated[
        bool,
        typer.Option("--check-inputs", help="also decode every local input, as workers will (slower)"),
    ] = False,
) -> None:
    """Check the job spec and every item; print every problem with file, line and field. Local
    inputs must exist (with --check-inputs, decode), a local output must be writable, and every
    model's source must load."""
    settings = Settings.from_env()
    registry = _registry(models, settings, check_sources=True)
    roots = embedded_roots(settings)
    if not check_inputs:
        validated = validate_job(job, registry, check_local=True, embedded_roots=roots)
    else:
        with tempfile.TemporaryFile("w+", encoding="utf-8") as local_inputs:
            problems: list[Problem] = []
            try:
                validated = validate_job(
                    job, registry, check_local=True, local_inputs=local_inputs, embedded_roots=roots
                )
            except SpecError as exc:
                problems = list(exc.problems)
            local_inputs.seek(0)
            problems += _undecodable_inputs(local_inputs)
        if problems:
            # The spec's problems first, then the manifest's by line, as validation alone orders them.
            raise SpecError(
                sorted(problems, key=lambda problem: (problem.file != str(job), problem.line or 0))
            )
    _print_notes(validated, distributed=bool(settings.broker_url))
    out.print(f"ok: {validated.total} item(s), job id {validated.job_id}")


def _print_notes(job: ValidatedJob, distributed: bool) -> None:
    for note in job.notes(distributed):
        err.print(f"warning: {note}", markup=False, highlight=False)


def _undecodable_inputs(local_inputs: IO[str]) -> list[Problem]:
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


@app.command()
def submit(
    job: Annotated[Path | None, typer.Argument(help="job spec, YAML or JSON", show_default=False)] = None,
    models: ModelsOption = None,
    from_: Annotated[
        str | None,
        typer.Option("--from", help="build the job from a listing: 's3://bucket/in/*.png' or a local glob"),
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="with --from: every item's prompt")] = None,
    stage: Annotated[str, typer.Option(help="with --from: the stage type")] = "img2img",
    model: Annotated[str | None, typer.Option(help="with --from: the stage's model")] = None,
    output: Annotated[str | None, typer.Option(help="with --from: output directory or s3:// prefix")] = None,
    name: Annotated[str, typer.Option(help="with --from: the job's name")] = "listing",
    param: Annotated[
        list[str] | None,
        typer.Option(help="with --from: a stage parameter, KEY=VALUE (repeatable), e.g. steps=30"),
    ] = None,
    size: Annotated[
        str | None, typer.Option(help="with --from: the size inputs are fitted to, e.g. 512x512")
    ] = None,
    dataset: Annotated[bool, typer.Option(help="with --from: also write an imagefolder dataset")] = False,
    output_format: Annotated[
        str | None,
        typer.Option("--output-format", help="with --from: files (default), webdataset or parquet shards"),
    ] = None,
    shard_size: Annotated[
        int | None, typer.Option("--shard-size", help="with --from: items per output shard")
    ] = None,
    save_to: Annotated[
        Path | None,
        typer.Option("--save-to", help="with --from: keep the generated job.json and items.jsonl here"),
    ] = None,
    priority: Annotated[
        Priority | None,
        typer.Option(help="workers take high jobs' chunks first, low last; default: the spec's, else normal"),
    ] = None,
    dry_run: DryRunOption = False,
) -> None:
    """Validate, then enqueue the job on IMGJOBS_BROKER_URL; prints the job id. With --dry-run,
    validate and plan it, and estimate its time from the rates workers have recorded."""
    settings = Settings.from_env()
    broker_url = require_broker_url(settings) if settings.broker_url or not dry_run else None
    with ExitStack() as stack:
        if from_ is not None:
            if job is not None:
                raise ConfigError("give a job spec or --from, not both")
            if model is None or output is None:
                raise ConfigError("--from needs --model and --output")
            folder = save_to or Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="imgjobs-listing-"))
            )
            # A local output is relative to where the command runs, not to the generated job's folder.
            where = output if "://" in output else str(Path(output).resolve())
            parameters = _parameters(param or [])
            stage_spec = {"type": stage, "model": model, **parameters}
            spec = {"version": 1, "name": name, "output": where, "stages": [stage_spec], "dataset": dataset}
            if size is not None:
                spec["defaults"] = {"size": size}
            spec |= {"output_format": output_format} if output_format else {}
            spec |= {"shard_size": shard_size} if shard_size is not None else {}
            if from_.lower().endswith(SHARD_SUFFIXES):
                job, count = write_shards_job(folder, from_, spec, prompt)
                err.print(f"--from {from_}: {count} input shard(s)")
            else:
                job, count = write_listing_job(folder, from_, spec, prompt)
                err.print(f"--from {from_}: {count} image(s)")
        elif job is None:
            raise ConfigError("give a job spec, or --from with --model and --output")
        try:
            validated = stack.enter_context(prepared(job, _registry(models, settings), settings, priority))
        except SpecError as exc:
            raise _named_by_flags(exc, job, parameters) if from_ is not None else exc from None
        _print_notes(validated, distributed=True)
        if dry_run:
            _print_estimate(validated, broker_url)
            return
        assert broker_url is not None
        submission = submit_job(validated, settings, broker_url)
    if submission.already_submitted:
        err.print(f"job {submission.job_id} was already submitted; see `imgjobs status {submission.job_id}`")
    print(submission.job_id)


def _print_estimate(job: ValidatedJob, broker_url: str | None) -> None:
    """The dry run's plan and estimate, with rates read from `broker_url` (none without one)."""
    book = RateBook(connect_redis(broker_url)) if broker_url else None
    print_estimate(job.job_id, job.total, estimate(job, book.rates if book else lambda _model: {}))
    if book is None:
        err.print("no broker (IMGJOBS_BROKER_URL): no recorded rates to estimate time from")


def _dry_run_embedded(job: ValidatedJob, settings: Settings) -> None:
    """An embedded run's rates are those its own workers recorded, kept in its state: a job run before
    (or stopped part-way) is estimated from them, a new one has none."""
    state = EmbeddedState(state_root(settings.state_dir), job.job_id)
    if not state.exists():
        _print_estimate(job, None)
        return
    with state.broker() as url:
        _print_estimate(job, url)


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


def _named_by_flags(exc: SpecError, spec_file: Path, parameters: dict[str, object]) -> SpecError:
    """The problems of the job `submit --from` generated, each named by the flag behind its field:
    the job file validation names is a temporary one, gone when the command ends."""

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


def _parameters(pairs: list[str], flag: str = "--param") -> dict[str, object]:
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


def _consumer_watch(settings: Settings, broker_url: str, store: JobStore, job_id: str) -> ConsumerWatch:
    app = producer_app(settings, broker_url)
    return ConsumerWatch(store.meta(job_id), lambda: consumed_queues(app))


def _watch(
    store: JobStore,
    job_id: str,
    workers: list[LocalWorker] | None = None,
    consumers: ConsumerWatch | None = None,
) -> JobStatus:
    """Progress bars until the job finishes: the job's, and one per stage when it has several."""
    with progress_bar() as progress:
        status = store.status(job_id)
        job_bar = progress.add_task(status.name, total=status.total, rate=0.0, failed="failed 0")
        stage_bars = (
            {
                stage.name: progress.add_task(f"  {stage.name}", total=status.total, rate=0.0, failed="")
                for stage in status.stages
            }
            if len(status.stages) > 1
            else {}
        )
        while True:
            status = store.status(job_id)
            progress.update(
                job_bar, completed=status.done, rate=average_rate(status), failed=f"failed {status.failed}"
            )
            for stage in status.stages:
                if stage.name in stage_bars:
                    progress.update(
                        stage_bars[stage.name], completed=stage.done, rate=average_rate(status, stage.done)
                    )
            if status.finished:
                return status
            for warning in consumers.warnings(status) if consumers else []:
                progress.console.print(warning, markup=False)
            # A model that cannot load stops the run at once: its stage would wait for ever.
            reasons = [worker.failure() for worker in workers or [] if not worker.alive()]
            if any(reasons):
                logs = (workers or [])[0].log_path.parent
                said = "; ".join(dict.fromkeys(reason for reason in reasons if reason))
                raise ConfigError(f"{said} (worker logs: {logs})")
            if workers is not None and not any(worker.alive() for worker in workers):
                tails = "\n".join(w.log_tail() for w in workers)
                raise ImgjobsError(
                    f"every local worker exited before the job finished; last log lines:\n{tails}"
                )
            time.sleep(POLL_S)


def _failure_groups(store: JobStore, status: JobStatus) -> list[FailureGroup]:
    return failures_by_reason(redrive.failures(store, status.job_id)) if status.failed else []


class RunInterrupted(ImgjobsError):
    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def _job_models(models: list[ResolvedModel], registry: Registry) -> list[ResolvedModel]:
    """The models to start local workers for: the job's, and `cpu`, whose workers write jobs' ends."""
    names = {model.name for model in models}
    return models if "cpu" in names else [*models, registry.resolve("cpu")]


def _local_workers(
    stack: ExitStack,
    models: list[ResolvedModel],
    registry: Path | None,
    broker_url: str,
    state: EmbeddedState,
    settings: Settings,
    per_model: int = 1,
) -> list[LocalWorker]:
    count = len(models) * per_model
    env = {"IMGJOBS_LOCAL_INPUT_ROOTS": state.input_roots() or settings.local_input_roots or ""}
    # Local workers share this machine's cores; more torch threads than cores only spin.
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // count)
    return [
        stack.enter_context(
            LocalWorker(
                model,
                broker_url,
                registry,
                state.logs / f"worker-{model.queue.removeprefix('imgjobs.')}-{index}.log",
                env=env | {"IMGJOBS_TORCH_THREADS": str(threads)},
                die_with_parent=True,
            )
        )
        for model in models
        for index in range(per_model)
    ]


def _embedded_input_roots(settings: Settings, job: ValidatedJob) -> str:
    """What an embedded run's workers may read local inputs from: the job's own folders (the spec's
    and the manifest's, which relative paths start from) and any the operator set."""
    return embedded_input_roots(settings.local_input_roots, job.spec_path, job.items_path)


def _follow(
    store: JobStore,
    job_id: str,
    workers: list[LocalWorker] | None,
    consumers: ConsumerWatch | None,
    again: str,
) -> JobStatus:
    """_watch, saying how far the job got when a signal stops it."""
    try:
        return _watch(store, job_id, workers, consumers)
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        try:
            status = store.status(job_id)
            done = f"{status.done}/{status.total} finished"
        except (ImgjobsError, redis.RedisError):
            done = "stopped"
        raise RunInterrupted(f"interrupted: {done}; {again}", signum) from None


@app.command()
def run(
    job: JobArgument,
    models: ModelsOption = None,
    workers_per_model: Annotated[int, typer.Option(min=1, max=16, help="local workers for each model")] = 1,
    priority: Annotated[
        Priority | None,
        typer.Option(help="workers take high jobs' chunks first, low last; default: the spec's, else normal"),
    ] = None,
    dry_run: DryRunOption = False,
) -> None:
    """Run a job to the end. With no IMGJOBS_BROKER_URL, start an embedded Redis and local workers,
    keeping their state so that running the job again resumes it. With --dry-run, validate, plan
    and estimate it as `submit --dry-run` does."""
    settings = Settings.from_env()
    # Embedded, the models load here. A missing input still fails its item alone, as distributed.
    registry = _registry(models, settings, check_sources=not settings.broker_url)
    logs: Path | None = None
    with stopped_by_signals(), ExitStack() as stack:
        validated = stack.enter_context(prepared(job, registry, settings, priority, check_local=dry_run))
        _print_notes(validated, distributed=bool(settings.broker_url))
        if dry_run:
            if settings.broker_url:
                _print_estimate(validated, require_broker_url(settings))
            else:
                _dry_run_embedded(validated, settings)
            return
        workers: list[LocalWorker] | None = None
        state: EmbeddedState | None = None
        if settings.broker_url:
            broker_url = require_broker_url(settings)
        else:
            state = EmbeddedState(state_root(settings.state_dir), validated.job_id)
            broker_url = stack.enter_context(state.broker(registry.path, own=True))
            logs = state.logs
        store = JobStore(connect_redis(broker_url))
        submission = submit_job(validated, settings, broker_url)
        if submission.already_submitted:
            err.print(f"job {submission.job_id} was submitted before on this broker; following it")
        elif submission.resumed:
            err.print(f"job {submission.job_id}: resumed")
        if state is not None and not store.status(submission.job_id).finished:
            state.remember_input_roots(_embedded_input_roots(settings, validated))
            workers = _local_workers(
                stack,
                _job_models(validated.models, registry),
                registry.path,
                broker_url,
                state,
                settings,
                workers_per_model,
            )
            err.print(f"embedded mode: state in {state.folder}, {len(workers)} local worker(s)")
        err.print(f"job {submission.job_id}: {submission.total} item(s)")
        consumers: ConsumerWatch | None = None
        if state is not None:
            again = f"run `imgjobs run {job}` again to resume"
        else:  # the broker's workers go on with it
            again = f"the job goes on; follow it with `imgjobs status {submission.job_id} --watch`"
            consumers = _consumer_watch(settings, broker_url, store, submission.job_id)
        status = _follow(store, submission.job_id, workers, consumers, again)
        groups = _failure_groups(store, status)
    print_summary(status, groups)
    if logs is not None:
        err.print(f"worker logs: {logs}")
    raise typer.Exit(0 if status.state == JobState.SUCCEEDED else EXIT_FAILED)


@dataclass(frozen=True)
class JobBroker:
    url: str
    idle: EmbeddedState | None = None  # an embedded job's state, when no process runs the job now


@contextmanager
def _job_broker(settings: Settings, job_id: str) -> Iterator[JobBroker]:
    """The broker that has the job: IMGJOBS_BROKER_URL's, else the job's embedded one."""
    if settings.broker_url:
        yield JobBroker(require_broker_url(settings))
        return
    state = EmbeddedState(state_root(settings.state_dir), job_id)
    if not state.exists():
        raise ConfigError(
            "no broker configured: set IMGJOBS_BROKER_URL=redis://host:6379/0; and no embedded run of "
            f"job {job_id!r} in {state.folder.parent}"
        )
    with state.broker() as url:
        yield JobBroker(url, None if state.running_elsewhere else state)


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(show_default=False)],
    watch: Annotated[bool, typer.Option("--watch", help="follow until the job finishes")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON object (one per poll with --watch)")
    ] = False,
) -> None:
    """Show a job's state and counts. With --watch, exit as `run` does once the job finishes: 0 if
    every item succeeded, 1 otherwise."""
    settings = Settings.from_env()
    with _job_broker(settings, job_id) as broker:
        store = JobStore(connect_redis(broker.url))
        if broker.idle is not None and watch and not store.status(job_id).finished:
            # An embedded job no `imgjobs run` runs now: watching it would wait for ever.
            err.print(f"job {job_id}: nothing runs it now; `imgjobs run` of its spec resumes it")
            watch = False
        if not watch:
            _status_lines(store, job_id, None, as_json)
            return
        # An embedded run's own workers are its `imgjobs run`'s to watch.
        consumers = _consumer_watch(settings, broker.url, store, job_id) if settings.broker_url else None
        if as_json:
            final = _status_lines(store, job_id, consumers, as_json, watch=True)
        else:
            again = f"`imgjobs status {job_id} --watch` follows it again"
            final = _follow(store, job_id, None, consumers, again)
            print_summary(final)
    raise typer.Exit(0 if final.state == JobState.SUCCEEDED else EXIT_FAILED)


def _status_lines(
    store: JobStore, job_id: str, consumers: ConsumerWatch | None, as_json: bool, watch: bool = False
) -> JobStatus:
    meter = RateMeter()
    while True:
        current = store.status(job_id)
        if as_json:
            print(json.dumps(status_document(current, meter.rate(current))), flush=True)
        else:
            cancelled = f" (cancelled {current.cancelled})" if current.cancelled else ""
            out.print(
                f"{current.job_id}: {current.state.value}  total {current.total}  pending {current.pending}  "
                f"running {current.running}  succeeded {current.succeeded}  "
                f"failed {current.failed}{cancelled}"
            )
            if current.error:
                out.print(f"error: {current.error}", markup=False)
        if not watch or current.finished:
            return current
        for warning in consumers.warnings(current) if consumers else []:
            err.print(warning, markup=False)
        time.sleep(POLL_S)


@app.command("jobs")
def list_jobs(
    state: Annotated[JobState | None, typer.Option(help="only jobs in this state")] = None,
    name: Annotated[str | None, typer.Option(help="only jobs whose name matches, e.g. 'nightly-*'")] = None,
    since: Annotated[
        str | None,
        typer.Option(help="only jobs submitted since: a duration back (12h, 7d) or an ISO date or time"),
    ] = None,
    limit: Annotated[int, typer.Option(min=0, help="at most this many, newest first; 0: all")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list of job objects")] = False,
) -> None:
    """List jobs, newest first: IMGJOBS_BROKER_URL's, else the embedded runs in IMGJOBS_STATE_DIR."""
    try:
        since_time = parse_since(since) if since is not None else None
    except ValueError as exc:
        raise ConfigError(f"--since: {exc}") from None
    settings = Settings.from_env()
    chosen = JobFilter(state=state, name=name, since=since_time)
    if settings.broker_url:
        statuses = list(JobStore(connect_redis(require_broker_url(settings))).statuses())
    else:
        statuses = list(_embedded_statuses(settings))
    listed = newest_first(statuses, chosen, limit)
    if as_json:
        print(json.dumps([status_document(status, average_rate(status)) for status in listed]))
        return
    print_jobs(listed, len(statuses))


def _embedded_statuses(settings: Settings) -> Iterator[JobStatus]:
    """The job of each embedded run kept in the state folder, read from its own broker (which this
    starts when no `imgjobs run` of it runs now)."""
    folder = state_root(settings.state_dir) / "jobs"
    for job_folder in sorted(folder.iterdir()) if folder.is_dir() else []:
        state = EmbeddedState(folder.parent, job_folder.name)
        if not state.exists():
            continue
        try:
            with state.broker() as url:
                yield JobStore(connect_redis(url)).status(job_folder.name)
        except (ConfigError, UnknownJobError) as exc:
            err.print(f"warning: embedded run {job_folder}: {exc}", markup=False)


@app.command()
def failures(
    job_id: Annotated[str, typer.Argument(show_default=False)],
    reason: Annotated[str | None, typer.Option(help="only failures of this error type")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one ItemResult JSON object per line")] = False,
) -> None:
    """List a job's failed items with their reasons."""
    with _job_broker(Settings.from_env(), job_id) as broker:
        store = JobStore(connect_redis(broker.url))
        failed = sorted(redrive.failures(store, job_id, reason), key=lambda result: result.id)
    if as_json:
        for result in failed:
            print(result.model_dump_json())
        return
    print_failures(job_id, failed)


@app.command()
def logs(
    job_id: Annotated[str, typer.Argument(show_default=False)],
    lines: Annotated[int, typer.Option(min=0, help="worker log lines to show, the last ones")] = 40,
    log_dir: Annotated[
        Path | None,
        typer.Option(
            "--log-dir", help="worker logs to search as well: a folder of *.log files you collected"
        ),
    ] = None,
) -> None:
    """A job's failures grouped by reason, each with a count and an example item, then the worker log
    lines that name the job: an embedded run's own, and those under --log-dir."""
    settings = Settings.from_env()
    with _job_broker(settings, job_id) as broker:
        store = JobStore(connect_redis(broker.url))
        status = store.status(job_id)
        groups = failures_by_reason(redrive.failures(store, job_id))
    out.print(f"job {job_id}: {status.state.value}, {status.succeeded} succeeded, {status.failed} failed")
    print_failure_groups(groups)
    folders = [folder for folder in (_embedded_logs(settings, job_id), log_dir) if folder is not None]
    if not folders:
        err.print(
            "worker logs: where the workers write them (`docker compose logs`, `kubectl logs`); "
            "--log-dir searches a folder of logs collected from them"
        )
        return
    found = list(log_lines_naming(job_id, folders))
    out.print(f"{len(found)} worker log line(s) name the job" + (f"; the last {lines}:" if found else ""))
    for path, line in found[-lines:] if lines else []:
        out.print(f"{path.name}: {line}", markup=False)


def _embedded_logs(settings: Settings, job_id: str) -> Path | None:
    state = EmbeddedState(state_root(settings.state_dir), job_id)
    return state.logs if not settings.broker_url and state.logs.is_dir() else None


@app.command()
def retry(
    job_id: Annotated[str, typer.Argument(show_default=False)],
    reason: Annotated[
        str | None, typer.Option(help="only failures of this error type, e.g. InputImageError")
    ] = None,
    ids: Annotated[str | None, typer.Option(help="only these failed items: A,B,C")] = None,
    ids_from: Annotated[
        Path | None, typer.Option("--ids-from", help="only the failed items listed in FILE, an id a line")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="run with this item field changed, KEY=VALUE (repeatable), e.g. steps=30"),
    ] = None,
) -> None:
    """Run a job's failed items again, from the first stage; succeeded items are left as they are.
    A job run embedded (no IMGJOBS_BROKER_URL) is run again here, to its end."""
    settings = Settings.from_env()
    chosen = RetryChoice(reason, _retry_ids(ids, ids_from), _retry_overrides(set_ or []))
    if settings.broker_url:
        broker_url = require_broker_url(settings)
        count = _retry(JobStore(connect_redis(broker_url)), settings, broker_url, job_id, chosen)
        err.print(f"job {job_id}: {count} failed item(s) enqueued again")
        return
    state = EmbeddedState(state_root(settings.state_dir), job_id)
    if not state.exists():
        raise ConfigError(
            f"no broker configured, and no embedded run of job {job_id!r} in {state.folder.parent}"
        )
    registry = Registry.load(state.registry())
    with stopped_by_signals(), ExitStack() as stack:
        broker_url = stack.enter_context(state.broker(registry.path, own=True))
        store = JobStore(connect_redis(broker_url))
        meta = store.meta(job_id)
        job_models = list({plan.model.name: plan.model for plan in meta.recipe}.values())
        workers = _local_workers(
            stack, _job_models(job_models, registry), registry.path, broker_url, state, settings
        )
        count = _retry(store, settings, broker_url, job_id, chosen)
        err.print(f"job {job_id}: {count} failed item(s) run again, by {len(workers)} local worker(s)")
        status = (
            _follow(store, job_id, workers, None, f"`imgjobs retry {job_id}` goes on")
            if count
            else store.status(job_id)
        )
        groups = _failure_groups(store, status)
    print_summary(status, groups)
    err.print(f"worker logs: {state.logs}")
    raise typer.Exit(0 if status.state == JobState.SUCCEEDED else EXIT_FAILED)


@dataclass(frozen=True)
class RetryChoice:
    reason: str | None
    ids: frozenset[str] | None
    overrides: dict[str, object]


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
    for key, value in _parameters(pairs, flag="--set").items():
        if key not in RETRY_SETTABLE:
            hint = did_you_mean(key, RETRY_SETTABLE) or f"it can change {', '.join(RETRY_SETTABLE)}"
            raise ConfigError(f"--set {key}: not a field retry can change; {hint}")
        try:
            checked = Item.model_validate({"id": "retry", key: value})
        except ValidationError as exc:
            raise ConfigError(f"--set {key}={value}: {exc.errors()[0]['msg']}") from None
        overrides[key] = checked.model_dump(mode="json")[key]
    return overrides


def _retry(store: JobStore, settings: Settings, broker_url: str, job_id: str, chosen: RetryChoice) -> int:
    app_ = producer_app(settings, broker_url)
    return redrive.retry(
        store,
        job_id,
        chosen.reason,
        lambda meta, chunks: send_chunks(app_, meta, chunks),
        sender(settings, broker_url),
        ids=chosen.ids,
        overrides=chosen.overrides,
    )


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(show_default=False)]) -> None:
    """Cancel a job: items not started are cancelled at once (JobCancelledError), queued chunks are
    dropped, and running ones stop at their next pipeline call."""
    settings = Settings.from_env()
    with ExitStack() as stack:
        broker = stack.enter_context(_job_broker(settings, job_id))
        store = JobStore(connect_redis(broker.url))
        verdict = redrive.cancel(store, job_id, sender(settings, broker.url))
        status = store.status(job_id)
        if broker.idle is not None and not status.finished:
            # An embedded job no run runs now: its end is written here, by a cpu worker of its own.
            registry = Registry.load(broker.idle.registry())
            cpu = [registry.resolve("cpu")]
            workers = _local_workers(stack, cpu, registry.path, broker.url, broker.idle, settings)
            status = _follow(store, job_id, workers, None, f"`imgjobs cancel {job_id}` again writes its end")
    if verdict == "finished":
        err.print(f"job {job_id}: already finished ({status.state.value}); nothing to cancel")
        return
    if verdict == "already":
        err.print(f"job {job_id}: cancelled before")
    else:
        err.print(f"job {job_id}: cancelled; {status.cancelled} item(s) not started are cancelled")
    if status.running:
        err.print(f"job {job_id}: {status.running} item(s) running stop at their next pipeline call")


@app.command()
def prune(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            help="delete jobs finished longer ago than this: 90s, 15m, 12h, 30d",
            show_default=False,
        ),
    ],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only list the jobs it would delete")] = False,
) -> None:
    """Delete finished jobs from Redis; their outputs in storage stay. Prints each job id."""
    try:
        age_s = parse_duration(older_than)
    except ValueError as exc:
        raise ConfigError(f"--older-than: {exc}") from None
    cutoff = time.time() - age_s
    store = JobStore(connect_redis(require_broker_url(Settings.from_env())))
    pruned = store.prune(cutoff, dry_run)
    for job in pruned:
        print(job.job_id)
    since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(cutoff))
    err.print(f"{'would delete' if dry_run else 'deleted'} {len(pruned)} job(s) finished before {since}")


@app.command()
def worker(
    model: Annotated[
        str, typer.Option("--model", help="registry name or diffusers folder", show_default=False)
    ],
    models: ModelsOption = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "info",
) -> None:
    """Start a Celery worker that loads MODEL once and consumes only that model's queue."""
    settings = Settings.from_env()
    broker_url = require_broker_url(settings)
    resolved = _registry(models, settings, check_sources=True).resolve(model, base_dir=Path.cwd())
    connect_redis(broker_url)  # fail here, in one line, rather than in Celery's retry loop
    queue = resolved.queue
    # The CPU workers also write jobs' ends, so that no GPU waits on them.
    queues = f"{queue},{JOB_END_QUEUE}" if resolved.name == "cpu" else queue
    env = os.environ | {
        WORKER_MODEL_ENV: WorkerModel(name=resolved.name, entry=resolved.entry).model_dump_json()
    }
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        # Celery's banner is text on stdout: a JSON log has only JSON lines.
        *(["--quiet"] if settings.log_format == "json" else []),
        "worker",
        "--queues",
        queues,
        "--concurrency",
        "1",
        "--pool",
        "prefork",
        "--hostname",
        f"{queue}.{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        loglevel,
    ]
    # Replace this process, so signals from a supervisor reach Celery directly.
    os.execve(sys.executable, argv, env)


@app.command()
def metrics(
    port: Annotated[int | None, typer.Option(help="default: $IMGJOBS_METRICS_PORT, else 9108")] = None,
) -> None:
    """Serve Prometheus metrics of the broker (queue depth per model, items of unfinished jobs)."""
    from prometheus_client import REGISTRY, start_http_server

    settings = Settings.from_env()
    client = connect_redis(require_broker_url(settings))
    REGISTRY.register(BrokerCollector(client))
    chosen = port or settings.metrics_port or DEFAULT_METRICS_PORT
    start_http_server(chosen)
    err.print(f"serving metrics on :{chosen}/metrics")
    while True:
        time.sleep(3600)


@app.command("models")
def list_models(
    models: ModelsOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print {name: entry} as JSON")] = False,
) -> None:
    """List the model registry: built-in entries and those of models.yaml."""
    registry = _registry(models, Settings.from_env())
    if as_json:
        print(
            json.dumps(
                {name: entry.model_dump(mode="json") for name, entry in sorted(registry.entries.items())}
            )
        )
        return
    table = Table("name", "source", "dtype", "vae family", "description")
    for name, entry in sorted(registry.entries.items()):
        table.add_row(name, entry.source, entry.dtype, entry.vae_family or "", entry.description)
    out.print(table)


@app.command()
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="where to write the demo")] = Path("demo-out"),
    no_run: Annotated[bool, typer.Option("--no-run", help="only write the files")] = False,
) -> None:
    """Write tiny random-weight models, sample images, models.yaml and job.yaml, then run the job."""
    # A separate interpreter, so the producer never imports torch.
    written = subprocess.run(
        [sys.executable, "-m", "workers.demo", str(directory)], capture_output=True, text=True, check=False
    )
    if written.returncode != 0:
        raise ImgjobsError(f"writing the demo failed:\n{written.stderr[-2000:]}")
    job_path = Path(written.stdout.strip().splitlines()[-1])
    err.print(f"demo written to {directory}: {job_path.name}, models.yaml, items.jsonl, inputs/, models/")
    if not no_run:
        run(job_path, models=directory / "models.yaml")


schedule_app = typer.Typer(
    help="Scheduled pipelines from IMGJOBS_SCHEDULES (schedules.yaml).", no_args_is_help=True
)
app.add_typer(schedule_app, name="schedule")


@schedule_app.command("list")
def schedule_list() -> None:
    """The schedules: cadence, source and output; last and next firing, last job, objects seen."""
    settings = Settings.from_env()
    schedules = scheduler.load_schedules(settings).schedules
    client = connect_redis(require_broker_url(settings)) if settings.broker_url else None
    table = Table("name", "when", "source", "output", "last fired", "next firing", "last job", "seen")
    for entry in schedules:
        when = f"cron {entry.cron} (UTC)" if entry.cron else f"every {entry.every_s}s"
        if client is None:  # no broker: the file alone
            table.add_row(entry.name, when, entry.source, entry.output, "?", "?", "?", "?")
            continue
        standing = scheduler.standing(client, entry)
        next_firing = local_time(standing.next_firing_at) if standing.next_firing_at else "when beat starts"
        table.add_row(
            entry.name,
            when,
            entry.source,
            entry.output,
            local_time(standing.last_fired_at) or "never",
            next_firing,
            standing.last_job_id or "",
            str(standing.seen),
        )
    out.print(table)


@schedule_app.command("run-now")
def schedule_run_now(name: Annotated[str, typer.Argument(show_default=False)]) -> None:
    """Fire one schedule now, here: submit a job for its new objects and print the job id."""
    settings = Settings.from_env()
    job_id = scheduler.fire(scheduler.entry_named(scheduler.load_schedules(settings), name), settings)
    if job_id is None:
        err.print(f"schedule {name}: nothing new")
        return
    print(job_id)


def _exec_celery(*arguments: str) -> None:
    settings = Settings.from_env()
    connect_redis(require_broker_url(settings))
    scheduler.load_schedules(settings)  # a bad file fails here, in one line
    argv = [sys.executable, "-m", "celery", "-A", "jobs.schedule_app", *arguments]
    os.execv(sys.executable, argv)


@schedule_app.command("beat")
def schedule_beat(loglevel: Annotated[str, typer.Option(help="Celery log level")] = "info") -> None:
    """Celery beat with RedBeat: fires each schedule; run one (RedBeat's lock keeps others idle)."""
    _exec_celery("beat", "--loglevel", loglevel)


@schedule_app.command("worker")
def schedule_worker(loglevel: Annotated[str, typer.Option(help="Celery log level")] = "info") -> None:
    """Runs the firings beat sends: listing the source and submitting jobs (no model, no torch)."""
    _exec_celery(
        "worker",
        "--queues",
        scheduler.SCHEDULE_QUEUE,
        "--concurrency",
        "1",
        "--pool",
        "solo",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        loglevel,
    )


def _tune_garbage_collector() -> None:
    # A submit makes and drops a few dozen small objects per item (pydantic models, dicts, JSON).
    # At Python's default thresholds the cycle collector runs every 700 of them and now and then walks
    # every object the imports made (pydantic's schemas, Celery, boto3): about 30 % of a large submit.
    # Freezing takes what exists now out of its sight, and a higher first threshold runs it less often.
    # Memory stays bounded: the streaming path makes few reference cycles.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def main() -> None:
    _tune_garbage_collector()
    try:
        app()
    except SpecError as exc:
        for problem in exc.problems:
            err.print(f"error: {problem}", markup=False)
        sys.exit(EXIT_INVALID)
    except (ConfigError, UnknownJobError, StorageRefusedError, BrokerUnavailableError) as exc:
        # A refused write is the job's output: a path through a file, no permission, a bad bucket.
        err.print(f"error: {exc}", markup=False)
        sys.exit(EXIT_INVALID)
    except RunInterrupted as exc:
        err.print(str(exc), markup=False)
        sys.exit(EXIT_SIGNAL + exc.signum)
    except ImgjobsError as exc:
        err.print(f"error: {exc}", markup=False)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
