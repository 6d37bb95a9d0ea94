"""Small builders for job files, models and stage plans, and moto's S3 server, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import TypeAdapter

from jobs.embedded import free_port
from jobs.manifest import ValidatedJob, validate_job
from jobs.registry import Registry
from schemas.job import Item, StageSpec, stage_name
from schemas.messages import StagePlan
from schemas.registry import BUILTIN_MODELS, ModelEntry, ResolvedModel

CPU = ResolvedModel(name="cpu", entry=BUILTIN_MODELS["cpu"])


@contextmanager
def moto_server(log_path: Path, credentials: Mapping[str, str]) -> Iterator[str]:
    """moto's S3 server on a free loopback port, with AWS_* of this process (and of the processes it
    starts) pointing at it; yields the endpoint and restores the environment after."""
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    settings = {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1", **credentials}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        process.wait(10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# README, How work moves (3): an item's output equals what diffusers gives for it alone up to float
# rounding, since matrix kernels (CPU and GPU) sum in an order that depends on the batch's shape, the
# threads and the processor (AVX2, AVX-512, AMX): within 1e-4 of the [0, 1] range per value, so within
# one 8-bit level in a written PNG. Comparisons across batch shapes or thread counts use these; only one
# of the same computation on the same shape may ask for equal numbers.
ROUNDING_ATOL = 1e-4
PNG_LEVELS = 1


def write_image(
    path: Path, size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (120, 30, 200)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    for x in range(size[0]):
        image.putpixel((x, x % size[1]), (255, 255, 255))
    image.save(path)
    return path


def write_job(
    folder: Path,
    items: Sequence[Mapping[str, object]],
    *,
    model: str = "tiny-sd",
    output: str = "out",
    stage: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    name: str = "test-job",
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "items.jsonl").open("w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item) + "\n")
    spec = {
        "version": 1,
        "name": name,
        "output": output,
        "items": "items.jsonl",
        "defaults": defaults if defaults is not None else {"size": [32, 32], "negative_prompt": "blurry"},
        "stages": [
            stage or {"type": "img2img", "model": model, "strength": 0.75, "guidance_scale": 7.5, "steps": 4}
        ],
    }
    path = folder / "job.json"
    path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return path


def stage_plan(
    stage: Mapping[str, object],
    model: ResolvedModel,
    *,
    index: int = 0,
    handover: str = "none",
    save: tuple[str, ...] = ("image",),
    controlnet: ResolvedModel | None = None,
    depth_model: ResolvedModel | None = None,
) -> StagePlan:
    spec = TypeAdapter(StageSpec).validate_python({"model": model.name, **stage})
    return StagePlan.model_validate(
        {
            "index": index,
            "name": stage_name(index, spec),
            "spec": spec,
            "model": model,
            "handover": handover,
            "save": save,
            "controlnet": controlnet,
            "depth_model": depth_model,
        }
    )


def local_model(name: str, folder: Path, **entry: object) -> ResolvedModel:
    return ResolvedModel(
        name=name, entry=ModelEntry.model_validate({"source": str(folder), "dtype": "float32", **entry})
    )


def validated_parts(
    spec: Path, registry: Registry, chunk_size: int = 8
) -> tuple[ValidatedJob, list[list[Item]]]:
    """The job validated as submit validates it, with the items of each part it wrote."""
    folder = spec.parent / "parts"
    job = validate_job(spec, registry, folder, chunk_size)
    assert job.parts is not None
    parts = []
    for part in range(job.parts.parts):
        lines = (folder / job.parts.name(part)).read_text().splitlines()
        parts.append([Item.model_validate_json(line) for line in lines])
    return job, parts
