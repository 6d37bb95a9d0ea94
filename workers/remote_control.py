"""What a worker answers `imgjobs workers`, through Celery's remote control (a broadcast over the
broker, answered by the worker's main process, as `inspect active_queues` is): its model, where it
runs it and with how much memory, since when, and the tasks it runs now.

The model lives in the pool process, which the main process forks: it leaves its device and the
accelerator memory it holds in a small block of memory shared before the fork, which the main
process reads when asked. The main process never touches the accelerator itself: a CUDA context
made before the fork would break the pool process's."""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import time
from typing import Any

from celery.worker import state as worker_state
from celery.worker.control import inspect_command

from schemas.messages import RUN_CHUNK_TASK, WORKER_MODEL_ENV, WORKER_REPORT, WorkerModel

REPORT_BYTES = 512
_started_at = time.time()
# Made at import, in the main process, before the pool process is forked: shared with it.
_from_pool = multiprocessing.Array(ctypes.c_char, REPORT_BYTES)


def tell_main_process(device: str) -> None:
    """In the pool process, once its model is loaded and after each chunk: its device and the
    accelerator memory it holds, for the main process to answer with."""
    gpu_bytes = None
    if device.startswith("cuda"):
        import torch

        gpu_bytes = int(torch.cuda.memory_reserved())
    data = json.dumps({"device": device, "gpu_bytes": gpu_bytes}).encode()
    with _from_pool.get_lock():
        _from_pool.value = data[: REPORT_BYTES - 1]


def _rss_bytes(pid: int) -> int:
    """The resident memory of a process (Linux' /proc); 0 where it cannot be read."""
    try:
        return int(open(f"/proc/{pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _running(request: Any) -> dict[str, Any]:
    """One task in hand: the chunk it is (its message's fields), or a job's end, and since when."""
    payload = request.args[0] if request.args else {}
    task = dict(payload) if isinstance(payload, dict) else {}
    task["task"] = "chunk" if request.name == RUN_CHUNK_TASK else "end"
    task["started_at"] = request.time_start
    return task


@inspect_command(name=WORKER_REPORT)
def report(state: Any, **_: Any) -> dict[str, Any]:
    """imgjobs: this worker's model, device, memory, uptime and the tasks it runs."""
    raw = os.environ.get(WORKER_MODEL_ENV)
    model = WorkerModel.model_validate_json(raw).name if raw else None
    with _from_pool.get_lock():
        from_pool = json.loads(_from_pool.value or b"{}")
    pool = state.consumer.pool.info.get("processes", []) if state.consumer.pool else []
    return {
        "model": model,
        "device": from_pool.get("device"),  # None until the model has loaded
        "rss_bytes": sum(_rss_bytes(pid) for pid in [os.getpid(), *pool]),
        "gpu_bytes": from_pool.get("gpu_bytes"),
        "uptime_s": round(time.time() - _started_at, 1),
        "tasks": [_running(request) for request in list(worker_state.active_requests)],
    }
