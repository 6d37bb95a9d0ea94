"""Where the commands find their jobs, decided once per command: one Session, from the settings.

    RemoteSession    IMGJOBS_BROKER_URL's broker, whose workers run jobs wherever they are
    EmbeddedSession  no broker configured: each job keeps a broker of its own in the state folder
                     (jobs/embedded.py), started by the command that needs it, with local workers

A command asks its session for a job (JobHandle): the job's state (a JobStore), how to send it work,
the local workers running it here (none where the broker's workers do), where they log, how to
resume it, and how to follow it to its end. The commands (jobs/cli.py) never ask which kind of
session they have.
"""

from __future__ import annotations

import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path

import redis
import yaml
from celery import Celery
from kombu.exceptions import OperationalError

from jobs.broker import producer_app, require_broker_url
from jobs.console import err, progress_bar
from jobs.consumers import ConsumerWatch, consumed_queues
from jobs.embedded import (
    EmbeddedState,
    Interrupted,
    LocalWorker,
    state_root,
    validating_runs,
    validation_note,
)
from jobs.manifest import MAX_SPEC_BYTES, ValidatedJob, embedded_input_roots
from jobs.producer import send_chunks
from jobs.registry import Registry
from jobs.views import average_rate, job_name, suggested_ids
from jobstate.connection import connect_redis
from jobstate.meta import JobMeta
from jobstate.rates import RateBook
from jobstate.store import JobStore
from schemas.errors import ConfigError, ImgjobsError, UnknownJobError
from schemas.job import JOB_ID_PATTERN
from schemas.messages import END_JOB_TASK, Chunk, JobEnd
from schemas.progress import JobStatus
from schemas.registry import ResolvedModel
from schemas.settings import Settings, redact_url

POLL_S = 0.5


class Stopped(ImgjobsError):
    """A signal stopped the command while it followed a job; the message says how far the job got."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class BrokerLost(ImgjobsError):
    """The broker that holds the job's state went away while a command followed the job."""


class JobHandle:
    """One job as a command holds it, on a broker whose own workers run it."""

    logs: Path | None = None  # where the workers that run it here log
    home: Path | None = None  # where its state is kept on this machine

    def __init__(
        self, job_id: str, store: JobStore, broker_url: str, settings: Settings, resume: str
    ) -> None:
        self.job_id = job_id
        self.store = store
        self.broker_url = broker_url
        self.settings = settings
        self.resume = resume  # what goes on with the job should this command stop, and how to follow it
        self.broker_name = f"the broker at {redact_url(broker_url)}"
        self.workers: list[LocalWorker] = []
        self._app: Celery | None = None

    @property
    def app(self) -> Celery:
        if self._app is None:
            self._app = producer_app(self.settings, self.broker_url)
        return self._app

    def status(self) -> JobStatus:
        return self.store.status(self.job_id)

    def send_chunks(self, meta: JobMeta, chunks: Sequence[Chunk]) -> None:
        send_chunks(self.app, meta, chunks)

    def send_end(self, end: JobEnd) -> None:
        self.app.send_task(END_JOB_TASK, **end.send_options())

    def start_workers(self, models: Sequence[ResolvedModel], per_model: int = 1) -> bool:
        """Start local workers for `models` (and `cpu`, for the job's end) where this command runs the
        job's work itself; False where other workers run it."""
        return False

    def consumer_watch(self) -> ConsumerWatch | None:
        """What says so when the job makes no progress and no worker takes a queue it waits on."""
        return ConsumerWatch(self.store.meta(self.job_id), lambda: consumed_queues(self.app))

    def follow(self, again: str | None = None) -> JobStatus:
        """Progress bars until the job finishes."""
        with self.watching(again):
            return self._watch()

    @contextmanager
    def watching(self, again: str | None = None) -> Iterator[None]:
        """For a block that follows the job: stopped by a signal, or by the loss of its broker, it says so
        in one line, with how far the job got, and `again` (what goes on, how to resume)."""
        try:
            yield
        except (KeyboardInterrupt, Interrupted) as exc:
            signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
            try:
                status = self.status()
                done = f"{status.done}/{status.total} finished"
            except (ImgjobsError, redis.RedisError):
                done = "stopped"
            raise Stopped(f"interrupted: {done}; {again or self.resume}", signum) from None
        except (redis.ConnectionError, redis.TimeoutError, OperationalError) as exc:
            for worker in self.workers:
                worker.kill()  # a warm shutdown would wait on the broker that is gone
            raise BrokerLost(f"lost {self.broker_name}: {exc}; {again or self.resume}") from None

    def _watch(self) -> JobStatus:
        consumers = self.consumer_watch()
        with progress_bar() as progress:
            status = self.status()
            job_bar = progress.add_task(status.name, total=status.total, rate=0.0, failed="failed 0")
            stage_bars = (
                {
                    stage.name: progress.add_task(f"  {stage.name}", total=status.total, rate=0.0, failed="")
                    for stage in status.stages
                }
                if len(status.stages) > 1
                else {}
            )
            retrying = None
            while True:
                status = self.status()
                failed = f"failed {status.failed}"
                progress.update(job_bar, completed=status.done, rate=average_rate(status), failed=failed)
                for stage in status.stages:
                    if stage.name in stage_bars:
                        rate = average_rate(status, stage.done)
                        progress.update(stage_bars[stage.name], completed=stage.done, rate=rate)
                if status.finished:
                    return status
                if status.retrying and status.retrying != retrying:  # else the bars stand still, unexplained
                    progress.console.print(f"retrying {status.retrying}", markup=False)
                retrying = status.retrying
                for warning in consumers.warnings(status) if consumers else []:
                    progress.console.print(warning, markup=False)
                self._check_workers()
                time.sleep(POLL_S)

    def _check_workers(self) -> None:
        """A model that cannot load stops the job at once: its stage would wait for ever."""
        reasons = [worker.failure() for worker in self.workers if not worker.alive()]
        if any(reasons):
            said = "; ".join(dict.fromkeys(reason for reason in reasons if reason))
            raise ConfigError(f"{said} (worker logs: {self.logs})")
        if self.workers and not any(worker.alive() for worker in self.workers):
            tails = "\n".join(worker.log_tail() for worker in self.workers)
            raise ImgjobsError(f"every local worker exited before the job finished; last log lines:\n{tails}")


class EmbeddedJob(JobHandle):
    """A job with a broker of its own in the state folder. Its work runs in local workers that this
    command starts, unless another `imgjobs` process runs the job now (`runs_here` False)."""

    def __init__(
        self,
        state: EmbeddedState,
        broker_url: str,
        settings: Settings,
        resume: str,
        *,
        stack: ExitStack,
        registry: Path | None,
        runs_here: bool,
    ) -> None:
        super().__init__(state.job_id, JobStore(connect_redis(broker_url)), broker_url, settings, resume)
        self.broker_name = f"the job's embedded Redis (its log: {state.folder / 'redis' / 'redis.log'})"
        self.state = state
        self.logs = state.logs
        self.home = state.folder
        self.runs_here = runs_here
        self._stack = stack
        self._registry = registry

    def start_workers(self, models: Sequence[ResolvedModel], per_model: int = 1) -> bool:
        if not self.runs_here:
            return False
        names = {model.name for model in models}
        if "cpu" not in names:
            models = [*models, Registry.load(self._registry).resolve("cpu")]
        count = len(models) * per_model
        # The folders the operator allows now, as the failures of a first run told them to set them.
        roots = [self.settings.local_input_roots or "", self.state.input_roots() or ""]
        env = {"IMGJOBS_LOCAL_INPUT_ROOTS": os.pathsep.join(root for root in roots if root)}
        # Local workers share this machine's cores; more torch threads than cores only spin.
        threads = self.settings.torch_threads or max(1, (os.cpu_count() or 1) // count)
        env["IMGJOBS_TORCH_THREADS"] = str(threads)
        for model in models:
            for index in range(per_model):
                log = self.state.logs / f"worker-{model.queue.removeprefix('imgjobs.')}-{index}.log"
                worker = LocalWorker(
                    model, self.broker_url, self._registry, log, env=env, die_with_parent=True
                )
                self.workers.append(self._stack.enter_context(worker))
        self.store.resume(self.job_id)
        return True

    def consumer_watch(self) -> ConsumerWatch | None:
        return None  # its workers are those of the `imgjobs` process that runs it, which watches them


class Session(ABC):
    """Where this command's jobs are; `open_session` picks one of the two below."""

    settings: Settings
    loads_models = False  # the job's models load on this machine: their local sources are checked here
    distributed = False  # the job's workers may be on other hosts

    def remote(self) -> RemoteSession:
        """The broker of IMGJOBS_BROKER_URL, for the commands that need one."""
        raise ConfigError(
            "no broker configured: set IMGJOBS_BROKER_URL=redis://host:6379/0 (or use `imgjobs run`)"
        )

    def shared_client(self) -> redis.Redis | None:
        """A client of the broker every job shares; None where each job has its own."""
        return None

    def validating(self, spec: Path) -> AbstractContextManager[None]:
        """For the block in which `imgjobs run` validates the job of `spec`."""
        return nullcontext()

    @abstractmethod
    def brokers(self) -> Iterator[tuple[Celery, JobStore]]:
        """The brokers whose workers run jobs now, each as a Celery app and the job-state owner."""

    @abstractmethod
    def new_job(self, job: ValidatedJob, registry: Registry) -> AbstractContextManager[JobHandle]:
        """The job about to be submitted, for the block."""

    @abstractmethod
    def job(self, job_id: str, *, own: bool = False) -> AbstractContextManager[JobHandle]:
        """A submitted job, for the block; with `own`, this command runs its work (`imgjobs retry`)."""

    @abstractmethod
    def statuses(self) -> Iterator[JobStatus]:
        """Every job this session knows of, in no particular order."""

    @abstractmethod
    def rates(self, job_id: str) -> AbstractContextManager[RateBook | None]:
        """What the workers that would run the job recorded of their rates; None if nothing is known."""


class RemoteSession(Session):
    distributed = True

    def __init__(self, settings: Settings, url: str) -> None:
        self.settings = settings
        self.url = url
        self._client: redis.Redis | None = None

    def remote(self) -> RemoteSession:
        return self

    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = connect_redis(self.url)
        return self._client

    def shared_client(self) -> redis.Redis | None:
        return self.client()

    def _handle(self, job_id: str) -> JobHandle:
        resume = f"the job goes on; follow it with `imgjobs status {job_id} --watch`"
        return JobHandle(job_id, JobStore(self.client()), self.url, self.settings, resume)

    @contextmanager
    def new_job(self, job: ValidatedJob, registry: Registry) -> Iterator[JobHandle]:
        yield self._handle(job.job_id)

    @contextmanager
    def job(self, job_id: str, *, own: bool = False) -> Iterator[JobHandle]:
        store = JobStore(self.client())
        if store.find(job_id) is None:
            hint = suggested_ids(job_id, store.job_ids())
            raise UnknownJobError(f"no job {job_id!r} on this broker" + (f"; {hint}" if hint else ""))
        yield self._handle(job_id)

    def statuses(self) -> Iterator[JobStatus]:
        return JobStore(self.client()).statuses()

    def brokers(self) -> Iterator[tuple[Celery, JobStore]]:
        yield producer_app(self.settings, self.url), JobStore(self.client())

    @contextmanager
    def rates(self, job_id: str) -> Iterator[RateBook | None]:
        yield RateBook(self.client())


class EmbeddedSession(Session):
    loads_models = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = state_root(settings.state_dir)

    @contextmanager
    def new_job(self, job: ValidatedJob, registry: Registry) -> Iterator[JobHandle]:
        state = EmbeddedState(self.root, job.job_id)
        with ExitStack() as stack:
            url = stack.enter_context(state.broker(registry.path, own=True))
            state.remember_run(job.spec_path, self._input_roots(job))
            resume = f"run `imgjobs run {job.spec_path}` again to resume"
            yield EmbeddedJob(
                state, url, self.settings, resume, stack=stack, registry=registry.path, runs_here=True
            )

    @staticmethod
    def _input_roots(job: ValidatedJob) -> str:
        """The job's own folders, which its items' relative paths start from: its local inputs there are
        read whatever IMGJOBS_LOCAL_INPUT_ROOTS says."""
        return embedded_input_roots(None, job.spec_path, job.items_path)

    @contextmanager
    def job(self, job_id: str, *, own: bool = False) -> Iterator[JobHandle]:
        state = EmbeddedState(self.root, job_id)
        if not state.exists():
            for pid, spec in validating_runs(self.root):
                if _job_name_in(spec) == job_name(job_id):
                    raise UnknownJobError(
                        f"no job {job_id!r} yet: `imgjobs run {spec}` (pid {pid}) is validating a job of "
                        "its name, whose id and state it has once every item is read; try again then"
                    )
            hint = suggested_ids(job_id, self._job_ids())
            raise UnknownJobError(
                f"no job {job_id!r}: no embedded run of it in {state.folder.parent}, and no broker is set "
                "(IMGJOBS_BROKER_URL)" + (f"; {hint}" if hint else "")
            )
        with ExitStack() as stack:
            url = stack.enter_context(state.broker(own=own))
            resume = f"run `imgjobs run {state.spec() or 'SPEC'}` again to resume"
            runs_here = not state.running_elsewhere
            yield EmbeddedJob(
                state, url, self.settings, resume, stack=stack, registry=state.registry(), runs_here=runs_here
            )

    def validating(self, spec: Path) -> AbstractContextManager[None]:
        return validation_note(self.root, spec)

    def _job_ids(self) -> list[str]:
        """The jobs of the embedded runs kept in the state folder."""
        folder = self.root / "jobs"
        found = sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []
        return [
            job_id
            for job_id in found
            if JOB_ID_PATTERN.match(job_id) and EmbeddedState(self.root, job_id).exists()
        ]

    def brokers(self) -> Iterator[tuple[Celery, JobStore]]:
        """The brokers of the embedded runs that run now (in other processes), with their workers."""
        for job_id in self._job_ids():
            url = EmbeddedState(self.root, job_id).running_broker()
            if url is not None:
                yield producer_app(self.settings, url), JobStore(connect_redis(url))

    def statuses(self) -> Iterator[JobStatus]:
        """The job of each embedded run kept in the state folder, read from its own broker (which this
        starts when no `imgjobs run` of it runs now)."""
        for job_id in self._job_ids():
            try:
                with self.job(job_id) as job:
                    status = job.status()
            except (ConfigError, UnknownJobError) as exc:
                err.print(f"warning: embedded run {self.root / 'jobs' / job_id}: {exc}", markup=False)
                continue
            yield status

    @contextmanager
    def rates(self, job_id: str) -> Iterator[RateBook | None]:
        """An embedded run's rates are those its own workers recorded, kept in its state: a job run
        before (or stopped part-way) is estimated from them, a new one has none."""
        state = EmbeddedState(self.root, job_id)
        if not state.exists():
            yield None
            return
        with state.broker() as url:
            yield RateBook(connect_redis(url))


def _job_name_in(spec: Path) -> str | None:
    """The `name` a job spec gives, read as the spec is (YAML or JSON); None where it gives none."""
    try:
        with spec.open("rb") as handle:
            parsed = yaml.safe_load(handle.read(MAX_SPEC_BYTES))
    except (OSError, yaml.YAMLError):
        return None
    name = parsed.get("name") if isinstance(parsed, dict) else None
    return name if isinstance(name, str) else None


def open_session(settings: Settings | None = None) -> Session:
    """IMGJOBS_BROKER_URL's broker when it is set, else the embedded runs of the state folder."""
    settings = settings or Settings.from_env()
    if settings.broker_url:
        return RemoteSession(settings, require_broker_url(settings))
    return EmbeddedSession(settings)
