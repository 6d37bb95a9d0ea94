"""Settings from the environment (IMGJOBS_*), passed down explicitly; nothing reads os.environ elsewhere.

Credentials stay where the standard mechanisms put them: the Redis password inside the broker
URL, S3 keys in boto3's own chain (AWS_* variables, ~/.aws, instance roles). We never copy them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.errors import ConfigError, InputImageError
from schemas.messages import PRIORITY_STEPS

ENV_PREFIX = "IMGJOBS_"
CELERY_BROKER_ENV = "CELERY_BROKER_URL"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    broker_url: str | None = Field(None, description="redis:// or rediss:// URL; unset means embedded")
    models: Path | None = Field(None, description="models.yaml registry file")
    schedules: Path | None = Field(None, description="schedules.yaml for `imgjobs schedule`")
    state_dir: Path | None = Field(
        None,
        description="where embedded runs keep their broker's data and workers' logs, a folder per job; "
        "unset: $XDG_STATE_HOME/imgjobs, else ~/.local/state/imgjobs",
    )
    chunk_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="items per Celery task for every job; unset: the smallest chunk_size among the job's "
        "models (registry, default 64). A worker runs a chunk in pipeline calls of its model's batch size",
    )
    io_threads: int | None = Field(
        None,
        ge=0,
        le=64,
        description="threads per worker that fetch and decode inputs and encode and write outputs while "
        "the pipeline runs; 0 does that in line; unset: 4 for a model on a GPU, 0 for one on the CPU",
    )
    task_time_limit_s: int = Field(3600, ge=10, description="hard limit for one chunk")
    model_load_timeout_s: int = Field(1800, ge=10, description="how long a worker may take to load its model")
    max_image_bytes: int = Field(64 * 2**20, ge=1024, description="largest input file accepted")
    max_image_pixels: int = Field(64 * 2**20, ge=64, description="largest decoded input, in pixels")
    http_timeout_s: float = Field(30.0, gt=0)
    http_allow_private: bool = Field(
        False, description="let http(s) inputs reach private, loopback and link-local addresses"
    )
    local_input_roots: str | None = Field(
        None,
        description="folders (separated by ':') under which workers read local input paths; unset: "
        "none, so a job can read no local file of a worker's host (an embedded run allows its job's folder)",
    )
    max_deliveries: int = Field(
        3, ge=1, le=100, description="deliveries of one chunk before it is dead-lettered as poison"
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="serve Prometheus metrics on this port (workers, `imgjobs metrics`)"
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="worker logs: one JSON object per line, or text"
    )
    torch_threads: int | None = Field(None, ge=1, description="CPU threads per worker; unset lets torch pick")
    # A GPU worker's allocator and kernel settings, applied when its process starts (workers.models.
    # apply_gpu_settings); a worker whose model runs on the CPU leaves torch as it is.
    cuda_expandable_segments: bool = Field(
        True,
        description="set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, unless PYTORCH_CUDA_ALLOC_CONF "
        "or PYTORCH_ALLOC_CONF is set: a long-lived worker meets many shapes (sizes, batches halved after "
        "running out of memory), which fragment CUDA's cached blocks; growable segments reuse them",
    )
    cudnn_benchmark: bool | None = Field(
        None,
        description="cuDNN times its convolution algorithms for each new input shape and keeps the "
        "fastest; unset: on for a model with static_batch (one shape, timed once), off otherwise (every "
        "new shape would pay a search of up to seconds, with extra memory)",
    )
    tf32: bool = Field(
        True,
        description="TensorFloat-32 for float32 matrix products and convolutions on GPUs that have it "
        "(Ampere and later): float32 paths (a float32 model, a VAE decoded in float32) run on tensor cores "
        "with 10 mantissa bits, more than an 8-bit image holds",
    )
    worker_failure_file: Path | None = Field(
        None,
        description="where a worker whose model cannot load writes why, in one line, before it exits; "
        "`imgjobs run` sets it for its local workers to report that line",
    )
    model_cache: Path | None = Field(
        None,
        description="where workers keep the models (and adapters) they download from s3:// sources; "
        "unset: $XDG_CACHE_HOME/imgjobs/models, else ~/.cache/imgjobs/models",
    )

    @property
    def input_roots(self) -> tuple[str, ...]:
        """IMGJOBS_LOCAL_INPUT_ROOTS as real paths (symbolic links resolved, as inputs are)."""
        return real_folders(self.local_input_roots)

    @property
    def visibility_timeout_s(self) -> int:
        # Above the hard time limit, or Redis hands a still-running chunk to a second worker (celery#5935).
        return self.task_time_limit_s * 2

    @classmethod
    def from_env(cls) -> Settings:
        try:
            return cls()
        except ValidationError as exc:
            problems = "; ".join(
                f"{ENV_PREFIX}{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
                for err in exc.errors()
            )
            raise ConfigError(f"invalid environment: {problems}") from None


def worker_broker_url(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """The broker of the workers' Celery app: IMGJOBS_BROKER_URL, else CELERY_BROKER_URL, the variable of
    Celery's own tools (which `celery --broker` sets), so that `celery -A workers.app inspect ...` works
    with either.

    Only the worker app falls back to it. For the `imgjobs` commands an unset IMGJOBS_BROKER_URL means
    an embedded run, and a CELERY_BROKER_URL left in a shell for another project must not send a job
    to that project's broker."""
    env = os.environ if environ is None else environ
    url = settings.broker_url or env.get(CELERY_BROKER_ENV)
    if not url:
        raise ConfigError(
            f"no broker configured: set {ENV_PREFIX}BROKER_URL (or {CELERY_BROKER_ENV}) to the workers' "
            "redis:// URL; start workers with `imgjobs worker --model NAME`"
        )
    return url


def redact_url(url: str) -> str:
    """The URL with any password replaced, fit for logs and error messages. Not urlsplit: it finds no
    password in "redis://:pa/ss@host" (an unencoded '/', '?' or '#' ends its netloc early), so here
    everything up to the last '@' counts as credentials; a user name before ':' is kept."""
    scheme, separator, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not separator or not at:
        return url
    user, colon, _password = credentials.partition(":")
    shown = f"{user}:***" if colon else "***"
    return f"{scheme}://{shown}@{host}"


def celery_config(settings: Settings, broker_url: str) -> dict[str, Any]:
    """One Celery configuration for the producer and the workers, so both ends agree."""
    return {
        "broker_url": broker_url,
        # Celery prefers a CELERY_BROKER_URL in the environment (which `celery --broker` also sets) to
        # broker_url, but not to these two, which every connection it opens reads: so the URL given
        # here wins, and the state in Redis and the chunks on the queues stay on one broker.
        "broker_read_url": broker_url,
        "broker_write_url": broker_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit_s,
        # The soft limit raises inside the task, which then records the chunk's items as failed; the
        # hard limit is the backstop, and a chunk killed by it is not acked: it comes back after the
        # visibility timeout, and the delivery count ends the loop.
        "task_soft_time_limit": settings.task_time_limit_s - min(60, settings.task_time_limit_s // 10),
        "task_acks_on_failure_or_timeout": False,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            # kombu looks for messages of vanished workers every 10 s but by default scans Redis only on
            # every 10th look, so a lost chunk came back up to 100 s after its visibility timeout.
            "unacked_restore_throttle": 1,
            # One list per job priority (schemas.messages.PRIORITY_STEPS), and no others for workers
            # to poll; kombu's default, [0, 3, 6, 9], would add a fourth that nothing sends to.
            "priority_steps": sorted(PRIORITY_STEPS.values()),
        },
        # Keep a chunk running through a broker reconnect (Celery 6 flips this default to True, which
        # would kill the pool process and its loaded model); it is redelivered and skipped if need be.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_retry_on_startup": True,
        # Model loading happens in the pool process at start; Celery's default allows it 4 s.
        "worker_proc_alive_timeout": settings.model_load_timeout_s,
        "worker_hijack_root_logger": False,
        "task_default_queue": "imgjobs.default",
    }


def real_folders(folders: str | None) -> tuple[str, ...]:
    """Folders separated by ':' as real paths (symbolic links resolved, as inputs are)."""
    return tuple(os.path.realpath(folder) for folder in (folders or "").split(os.pathsep) if folder)


# What a worker says of a local input it may not read.
NOT_UNDER_ROOTS = "not under a folder workers may read local inputs from (IMGJOBS_LOCAL_INPUT_ROOTS)"


@dataclass(frozen=True)
class LocalRoots:
    """The folders a worker may read local inputs from: the operator's (IMGJOBS_LOCAL_INPUT_ROOTS) and
    the job's own output folder, where earlier stages leave what the next one reads. Anyone who may
    submit a job could otherwise copy any image of a worker's disk into an output bucket. Validation
    asks the same of an embedded run's inputs before it starts (jobs/manifest.py)."""

    folders: tuple[str, ...]

    @classmethod
    def of(cls, settings: Settings, job_folder: str | None = None) -> LocalRoots:
        own = (os.path.realpath(job_folder),) if job_folder else ()
        return cls(settings.input_roots + own)

    def allows(self, path: str | os.PathLike[str]) -> bool:
        real = os.path.realpath(path)  # a symbolic link inside a root may point anywhere, ".." too
        return any(real == folder or real.startswith(folder.rstrip("/") + "/") for folder in self.folders)

    def check(self, uri: str, path: Path) -> None:
        if not self.allows(path):
            raise InputImageError(f"{uri}: {NOT_UNDER_ROOTS}")
