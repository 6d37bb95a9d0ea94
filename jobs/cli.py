"""The `imgjobs` command line: each command reads its flags, asks its session (jobs/session.py) for
the job, and prints what it finds (jobs/console.py)."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, NoReturn

import redis
import typer
from kombu.exceptions import OperationalError

from jobs import redrive, scheduler
from jobs.broker import celery_command, worker_arguments, worker_command
from jobs.console import (
    HelpGroup,
    err,
    help_for_people,
    out,
    print_estimate,
    print_failure_groups,
    print_failures,
    print_jobs,
    print_models,
    print_notes,
    print_schedules,
    print_status,
    print_summary,
    print_workers,
)
from jobs.consumers import live_workers
from jobs.embedded import Interrupted, stopped_by_signals
from jobs.estimate import estimate
from jobs.flags import (
    DryRunOption,
    JobArgument,
    JobIdArgument,
    Listing,
    ModelsOption,
    PriorityOption,
    ReasonOption,
    RetryChoice,
)
from jobs.manifest import ValidatedJob, check_job, embedded_roots
from jobs.metrics import BrokerCollector
from jobs.producer import prepared
from jobs.producer import submit as submit_job
from jobs.registry import Registry
from jobs.session import POLL_S, JobHandle, Session, Stopped, open_session
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
from jobstate.connection import connect_redis
from jobstate.store import JobStore
from schemas.errors import (
    BrokerUnavailableError,
    ConfigError,
    ImgjobsError,
    SpecError,
    StorageRefusedError,
    UnknownJobError,
)
from schemas.progress import JobState, JobStatus
from schemas.schedule import parse_duration
from schemas.settings import Settings

app = typer.Typer(
    cls=HelpGroup,
    help="Batch image-to-image jobs with diffusers on Celery workers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_SIGNAL = 128  # + the signal's number, as shells report a command a signal stopped
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
    """Check the job spec and every item, as seen from this machine; print every problem with file,
    line and field. Local inputs must exist (with --check-inputs, decode as workers will), a local
    output must be writable, and the local model folders the job uses must be diffusers folders with
    their variant's weights."""
    settings = Settings.from_env()
    registry = _registry(models, settings, check_sources=True)
    validated = check_job(job, registry, decode=check_inputs, embedded_roots=embedded_roots(settings))
    print_notes(validated, distributed=bool(settings.broker_url))
    out.print(f"ok: {validated.total} item(s), job id {validated.job_id}")


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
    priority: PriorityOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Validate, then enqueue the job on IMGJOBS_BROKER_URL; prints the job id. With --dry-run,
    validate and plan it, and estimate its time from the rates workers have recorded."""
    session = open_session()
    broker = None if dry_run else session.remote()
    with ExitStack() as stack:
        listing = None
        if from_ is not None:
            if job is not None:
                raise ConfigError("give a job spec or --from, not both")
            listing = Listing(
                from_,
                model,
                output,
                prompt,
                stage,
                name,
                param or [],
                size,
                dataset,
                output_format,
                shard_size,
            )
            temporary = tempfile.TemporaryDirectory(prefix="imgjobs-listing-")
            job = listing.write_job(save_to or Path(stack.enter_context(temporary)))
        elif job is None:
            raise ConfigError("give a job spec, or --from with --model and --output")
        try:
            registry = _registry(models, session.settings)
            validated = stack.enter_context(prepared(job, registry, session.settings, priority))
        except SpecError as exc:
            raise listing.named_by_flags(exc, job) if listing is not None else exc from None
        print_notes(validated, distributed=True)
        if broker is None:
            _print_estimate(validated, session)
            return
        submission = submit_job(validated, session.settings, broker.url)
    if submission.already_submitted:
        err.print(f"job {submission.job_id} was already submitted; see `imgjobs status {submission.job_id}`")
    print(submission.job_id)


def _print_estimate(job: ValidatedJob, session: Session) -> None:
    """The dry run's plan and estimate, from the rates the workers that would run it recorded."""
    with session.rates(job.job_id) as book:
        print_estimate(job.job_id, job.total, estimate(job, book.rates if book else lambda _model: {}))
    if book is None:
        err.print("no broker (IMGJOBS_BROKER_URL): no recorded rates to estimate time from")


def _failure_groups(job: JobHandle, status: JobStatus) -> list[FailureGroup]:
    return failures_by_reason(redrive.failures(job.store, status.job_id)) if status.failed else []


def _summary_exit(job: JobHandle, status: JobStatus, finished_before: bool = False) -> NoReturn:
    """The finished job's summary and failures, where its workers' logs are, and `run`'s exit status."""
    print_summary(status, _failure_groups(job, status))
    if job.logs is not None:
        err.print(f"worker logs: {job.logs}")
    if finished_before and status.failed:  # running it again only shows this
        again = f"`imgjobs retry {status.job_id}` runs its {status.failed} failed item(s) again"
        err.print(f"job {status.job_id} had finished before; {again}")
    raise typer.Exit(0 if status.state == JobState.SUCCEEDED else EXIT_FAILED)


@app.command()
def run(
    job: JobArgument,
    models: ModelsOption = None,
    workers_per_model: Annotated[int, typer.Option(min=1, max=16, help="local workers for each model")] = 1,
    priority: PriorityOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Run a job to the end. With no IMGJOBS_BROKER_URL, start an embedded Redis and local workers,
    keeping their state so that running the job again resumes it. With --dry-run, validate, plan
    and estimate it as `submit --dry-run` does."""
    session = open_session()
    # Embedded, the models load here. A missing input still fails its item alone, as distributed.
    registry = _registry(models, session.settings, check_sources=session.loads_models)
    with stopped_by_signals(), ExitStack() as stack:
        with session.validating(job):
            validated = stack.enter_context(
                prepared(job, registry, session.settings, priority, check_local=dry_run)
            )
        print_notes(validated, distributed=session.distributed)
        if dry_run:
            _print_estimate(validated, session)
            return
        with session.new_job(validated, registry) as handle:
            submission = submit_job(validated, session.settings, handle.broker_url)
            if submission.already_submitted:
                err.print(f"job {submission.job_id} was submitted before on this broker; following it")
            elif submission.resumed:
                err.print(f"job {submission.job_id}: resumed")
            before = handle.status()
            if not before.finished and handle.start_workers(validated.models, workers_per_model):
                err.print(f"embedded mode: state in {handle.home}, {len(handle.workers)} local worker(s)")
            err.print(f"job {submission.job_id}: {submission.total} item(s)")
            status = handle.follow()
            _summary_exit(handle, status, finished_before=before.finished)


@app.command()
def status(
    job_id: JobIdArgument,
    watch: Annotated[bool, typer.Option("--watch", help="follow until the job finishes")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON object (one per poll with --watch)")
    ] = False,
) -> None:
    """Show a job's state and counts. With --watch, exit as `run` does once the job finishes: 0 if
    every item succeeded, 1 otherwise."""
    again = f"`imgjobs status {job_id} --watch` follows it again"
    with open_session().job(job_id) as job, job.watching(again):
        stopped = job.status().state == JobState.STOPPED
        if stopped:  # watching it would wait for ever
            err.print(f"job {job_id}: stopped: nothing runs it now; {job.resume}")
        if not watch or stopped:
            final = _status_lines(job, as_json)
            if not watch:
                return
        elif as_json:
            final = _status_lines(job, as_json, watch=True)
        else:
            final = job.follow(again)
            print_summary(final)
    raise typer.Exit(0 if final.state == JobState.SUCCEEDED else EXIT_FAILED)


def _status_lines(job: JobHandle, as_json: bool, watch: bool = False) -> JobStatus:
    meter = RateMeter()
    consumers = job.consumer_watch() if watch else None
    while True:
        current = job.status()
        if as_json:
            print(json.dumps(status_document(current, meter.rate(current))), flush=True)
        else:
            print_status(current)
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
    statuses = list(open_session().statuses())
    listed = newest_first(statuses, JobFilter(state=state, name=name, since=since_time), limit)
    if as_json:
        print(json.dumps([status_document(status, average_rate(status)) for status in listed]))
        return
    print_jobs(listed, len(statuses))
    if any(status.state == JobState.STOPPED for status in listed):
        err.print("stopped: nothing runs them now; `imgjobs status JOB` says how to resume each")


@app.command("workers")
def list_workers(
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list of worker objects")] = False,
) -> None:
    """The workers that answer now, asked through Celery's remote control: host, model, device,
    memory, uptime and the chunk each runs, with its job and progress. With no IMGJOBS_BROKER_URL,
    those of the embedded runs running now."""
    found = [worker for app_, store in open_session().brokers() for worker in live_workers(app_, store)]
    if as_json:
        print(json.dumps([dataclasses.asdict(worker) for worker in found]))
        return
    print_workers(found)


@app.command()
def failures(
    job_id: JobIdArgument,
    reason: ReasonOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="one ItemResult JSON object per line")] = False,
) -> None:
    """List a job's failed items with their reasons."""
    with open_session().job(job_id) as job:
        failed = sorted(redrive.failures(job.store, job_id, reason), key=lambda result: result.id)
    if as_json:
        for result in failed:
            print(result.model_dump_json())
        return
    print_failures(job_id, failed)


@app.command()
def logs(
    job_id: JobIdArgument,
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
    with open_session().job(job_id) as job:
        status = job.status()
        groups = failures_by_reason(redrive.failures(job.store, job_id))
    out.print(f"job {job_id}: {status.state.value}, {status.succeeded} succeeded, {status.failed} failed")
    print_failure_groups(groups)
    folders = [folder for folder in (job.logs, log_dir) if folder is not None and folder.is_dir()]
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


@app.command()
def retry(
    job_id: JobIdArgument,
    reason: ReasonOption = None,
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
    chosen = RetryChoice.of(reason, ids, ids_from, set_ or [])
    with stopped_by_signals(), open_session().job(job_id, own=True) as job:
        meta = job.store.meta(job_id)
        here = job.start_workers(list({plan.model.name: plan.model for plan in meta.recipe}.values()))
        count = redrive.retry(
            job.store, job_id, chosen.reason, job.send_chunks, job.send_end, chosen.ids, chosen.overrides
        )
        if not here:  # the broker's workers run them
            err.print(f"job {job_id}: {count} failed item(s) enqueued again")
            return
        err.print(f"job {job_id}: {count} failed item(s) run again, by {len(job.workers)} local worker(s)")
        status = job.follow(f"`imgjobs retry {job_id}` goes on") if count else job.status()
        _summary_exit(job, status)


@app.command()
def cancel(job_id: JobIdArgument) -> None:
    """Cancel a job: items not started are cancelled at once (JobCancelledError), queued chunks are
    dropped, and running ones stop at their next pipeline call."""
    with open_session().job(job_id) as job:
        verdict = redrive.cancel(job.store, job_id, job.send_end)
        status = job.status()
        if not status.finished and job.start_workers([]):
            # No process runs the job now: its end is written here, by a cpu worker of this command's.
            status = job.follow(f"`imgjobs cancel {job_id}` again writes its end")
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
    store = JobStore(open_session().remote().client())
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
    broker = open_session().remote()
    resolved = _registry(models, broker.settings, check_sources=True).resolve(model, base_dir=Path.cwd())
    connect_redis(broker.url)  # fail here, in one line, rather than in Celery's retry loop
    argv, env = worker_command(resolved, loglevel, quiet=broker.settings.log_format == "json")
    # Replace this process, so signals from a supervisor reach Celery directly.
    os.execve(sys.executable, argv, env)


@app.command()
def metrics(
    port: Annotated[int | None, typer.Option(help="default: $IMGJOBS_METRICS_PORT, else 9108")] = None,
) -> None:
    """Serve Prometheus metrics of the broker (queue depth per model, items of unfinished jobs)."""
    from prometheus_client import REGISTRY, start_http_server

    broker = open_session().remote()
    REGISTRY.register(BrokerCollector(broker.client()))
    chosen = port or broker.settings.metrics_port or DEFAULT_METRICS_PORT
    start_http_server(chosen)
    err.print(f"serving metrics on :{chosen}/metrics")
    while True:
        time.sleep(3600)


@app.command("models")
def list_models(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="only these: names, or diffusers folders named directly", show_default=False),
    ] = None,
    models: ModelsOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print {name: entry} as JSON")] = False,
) -> None:
    """List the model registry, the built-in entries and those of models.yaml, each with where it comes
    from; with names, those only, resolved as a stage's `model` is (a folder named directly too)."""
    registry = _registry(models, Settings.from_env())
    chosen = [registry.resolve(name, base_dir=Path.cwd()) for name in names or sorted(registry.entries)]
    listed = [(model, registry.origin(model.name)) for model in chosen]
    if as_json:
        print(
            json.dumps(
                {model.name: {**model.entry.model_dump(mode="json"), "from": at} for model, at in listed}
            )
        )
        return
    print_models(listed)


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
    cls=HelpGroup, help="Scheduled pipelines from IMGJOBS_SCHEDULES (schedules.yaml).", no_args_is_help=True
)
app.add_typer(schedule_app, name="schedule")


@schedule_app.command("list")
def schedule_list() -> None:
    """The schedules: cadence, source and output; last and next firing, last job, objects seen."""
    session = open_session()
    schedules = scheduler.load_schedules(session.settings).schedules
    client = session.shared_client()
    print_schedules([(entry, scheduler.standing(client, entry) if client else None) for entry in schedules])


@schedule_app.command("run-now")
def schedule_run_now(name: Annotated[str, typer.Argument(show_default=False)]) -> None:
    """Fire one schedule now, here: submit a job for its new objects and print the job id."""
    settings = Settings.from_env()
    job_id = scheduler.fire(scheduler.entry_named(scheduler.load_schedules(settings), name), settings)
    if job_id is None:
        err.print(f"schedule {name}: nothing new")
        return
    print(job_id)


def _exec_celery(argv: list[str]) -> None:
    broker = open_session().remote()
    broker.client()
    scheduler.load_schedules(broker.settings)  # a bad file fails here, in one line
    os.execv(sys.executable, argv)


@schedule_app.command("beat")
def schedule_beat(loglevel: Annotated[str, typer.Option(help="Celery log level")] = "info") -> None:
    """Celery beat with RedBeat: fires each schedule; run one (RedBeat's lock keeps others idle)."""
    _exec_celery(celery_command("jobs.schedule_app", "beat", "--loglevel", loglevel))


@schedule_app.command("worker")
def schedule_worker(loglevel: Annotated[str, typer.Option(help="Celery log level")] = "info") -> None:
    """Runs the firings beat sends: listing the source and submitting jobs (no model, no torch)."""
    arguments = worker_arguments(scheduler.SCHEDULE_QUEUE, "solo", loglevel)
    _exec_celery(celery_command("jobs.schedule_app", *arguments))


help_for_people(app, schedule_app)


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
    except Stopped as exc:
        err.print(str(exc), markup=False)
        sys.exit(EXIT_SIGNAL + exc.signum)
    except ImgjobsError as exc:
        err.print(f"error: {exc}", markup=False)
        sys.exit(EXIT_FAILED)
    except (redis.RedisError, OperationalError) as exc:  # the broker went away in the middle of a command
        err.print(f"error: lost the broker: {exc}", markup=False)
        sys.exit(EXIT_FAILED)
    except Interrupted as exc:
        err.print("interrupted")
        sys.exit(EXIT_SIGNAL + exc.signum)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
