"""Models from object storage, through real `imgjobs worker` processes against the S3 server on loopback:
a model folder and a LoRA published to a bucket are downloaded once into IMGJOBS_MODEL_CACHE and give
what the same files give locally; a restarted worker reuses the copy (its ETags unchanged); a changed
object is downloaded afresh; a download cut off (by a broken connection, or by killing the worker) is
never used."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import redis
import torch
import yaml
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from jobs.embedded import EmbeddedRedis, LocalWorker
from jobs.registry import Registry
from jobstate.store import JobStore
from kits.faultproxy import FaultProxy
from kits.helpers import write_image, write_job
from kits.processes import Workers, imgjobs
from workers.model_cache import MANIFEST, PARTIAL_PREFIX
from workers.tiny_models import write_tiny_lora, write_tiny_sd

pytestmark = pytest.mark.slow

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
ITEM = {"id": "i0", "prompt": "a cat", "seed": 3}


def publish(folder: Path, bucket: str, prefix: str) -> None:
    """What `aws s3 sync folder s3://bucket/prefix/` does: every file under its relative key."""
    s3 = boto3.client("s3")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


@dataclass
class Store:
    root: Path
    bucket: str
    cache: Path
    models: Path
    broker_url: str
    workers: Workers
    registry: Registry

    def start(self, endpoint: str | None = None) -> LocalWorker:
        env = {"IMGJOBS_MODEL_CACHE": str(self.cache)}
        if endpoint is not None:
            env["AWS_ENDPOINT_URL"] = endpoint
        return self.workers.start("remote", self.broker_url, self.registry, env)

    def copies(self, name: str) -> list[Path]:
        """The complete copies of a source in the cache (a folder each, with its manifest)."""
        return sorted(path.parent for path in self.cache.glob(f"s3/{name}-*/*/{MANIFEST}"))

    def partials(self) -> list[Path]:
        return sorted(self.cache.glob(f"s3/*/{PARTIAL_PREFIX}*"))

    def run(self, name: str) -> np.ndarray:
        folder = self.root / "jobs" / name
        rows = [{**ITEM, "image": str(self.root / "inputs" / "i0.png")}]
        stage = {"type": "img2img", "model": "remote", "steps": 4, "strength": 0.75, "guidance_scale": 7.5}
        spec = write_job(folder, rows, output=str(self.root / "out"), name=name, stage=stage)
        env = {"IMGJOBS_BROKER_URL": self.broker_url, "IMGJOBS_MODELS": str(self.models)}
        submitted = imgjobs("submit", str(spec), env=env)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        store = JobStore(redis.Redis.from_url(self.broker_url, decode_responses=True))
        deadline = time.monotonic() + 240
        while (
            not store.status(job_id).finished or not (self.root / "out" / job_id / "results.jsonl").exists()
        ):
            assert time.monotonic() < deadline, self.workers.logs()
            time.sleep(0.2)
        results = (self.root / "out" / job_id / "results.jsonl").read_text().splitlines()
        assert [json.loads(line)["status"] for line in results] == ["succeeded"], results
        image: np.ndarray = np.asarray(Image.open(self.root / "out" / job_id / "i0" / "s0-img2img.png"))
        return image.astype(np.int16)


@pytest.fixture
def store(tmp_path: Path, s3_bucket: str) -> Iterator[Store]:
    models = tmp_path / "models.yaml"
    entry = {
        "source": f"s3://{s3_bucket}/models/tiny-sd/",
        "dtype": "float32",
        "loras": [{"source": f"s3://{s3_bucket}/loras/style.safetensors", "weight": 0.7}],
    }
    models.write_text(yaml.safe_dump({"models": {"remote": entry}}), encoding="utf-8")
    write_image(tmp_path / "inputs" / "i0.png", (32, 32))
    pool = Workers(tmp_path)
    with EmbeddedRedis(tmp_path / "redis") as server:
        try:
            yield Store(
                tmp_path, s3_bucket, tmp_path / "cache", models, server.url, pool, Registry.load(models)
            )
        finally:
            pool.stop()


def fingerprint(copy: Path) -> dict[str, tuple[int, int]]:
    """Each file of a copy: (inode, mtime), which a second download would change."""
    return {
        str(path): (path.stat().st_ino, path.stat().st_mtime_ns) for path in copy.rglob("*") if path.is_file()
    }


def direct(model: Path, lora: Path, image: Path) -> np.ndarray:
    pipeline = StableDiffusionImg2ImgPipeline.from_pretrained(model, torch_dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(lora, adapter_name="style")
    pipeline.set_adapters(["style"], [0.7])
    result: Any = pipeline(
        prompt=ITEM["prompt"],
        negative_prompt="blurry",
        image=Image.open(image).convert("RGB"),
        strength=0.75,
        guidance_scale=7.5,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    )
    pixels: np.ndarray = (result.images[0] * 255).round().astype(np.int16)
    return pixels


def test_models_and_adapters_come_from_the_bucket_once_and_never_half(store: Store, tmp_path: Path) -> None:
    local = write_tiny_sd(tmp_path / "local" / "tiny-sd")
    lora = write_tiny_lora(tmp_path / "local" / "style", local, seed=1)
    publish(local, store.bucket, "models/tiny-sd")
    boto3.client("s3").upload_file(
        str(lora / "pytorch_lora_weights.safetensors"), store.bucket, "loras/style.safetensors"
    )

    # First start: both downloaded into the cache, then loaded from there (the job runs).
    assert store.copies("tiny-sd") == store.copies("style.safetensors") == []
    worker = store.start()
    first = store.run("from-s3")
    assert int(np.abs(first - direct(local, lora, store.root / "inputs" / "i0.png")).max()) <= 1
    [model_copy] = store.copies("tiny-sd")
    [lora_copy] = store.copies("style.safetensors")
    assert (model_copy / WEIGHTS).read_bytes() == (local / WEIGHTS).read_bytes()
    kept = fingerprint(model_copy) | fingerprint(lora_copy)
    worker.stop()

    # A restart finds the same ETags: the same copies, not a file of them written again.
    worker = store.start()
    assert int(np.abs(store.run("from-s3-again") - first).max()) == 0
    assert store.copies("tiny-sd") == [model_copy] and store.copies("style.safetensors") == [lora_copy]
    assert fingerprint(model_copy) | fingerprint(lora_copy) == kept, "nothing was downloaded again"
    worker.stop()

    # A new UNet is published. A download whose connection breaks in it fails the start and leaves nothing.
    changed = write_tiny_sd(tmp_path / "changed" / "tiny-sd", seed=7)
    boto3.client("s3").upload_file(str(changed / WEIGHTS), store.bucket, f"models/tiny-sd/{WEIGHTS}")
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"], stall_s=30) as proxy:
        proxy.arm(["truncate"], first=1000, methods=("GET",), path_contains=WEIGHTS)
        worker = store.start(proxy.url)
        assert worker.process.wait(240) == 1, worker.log_tail(60)
        assert "download failed" in (worker.failure() or ""), worker.log_tail(60)  # what it says, in one line
        assert store.copies("tiny-sd") == [model_copy] and store.partials() == []
        worker.stop()

        # Killed while downloading: the partial folder stays behind, and is never a copy.
        proxy.arm(["stall"], first=1000, methods=("GET",), path_contains=WEIGHTS)
        worker = store.start(proxy.url)
        deadline = time.monotonic() + 240
        while not any(path.rglob("model_index.json") for path in store.partials()):
            assert worker.alive() and time.monotonic() < deadline, worker.log_tail(60)
            time.sleep(0.2)
        os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait(30)
        worker.stop()
        assert store.partials() and store.copies("tiny-sd") == [model_copy]
        proxy.disarm()

    # Next start: a fresh download of the new version; the old copy and the leftovers are removed.
    worker = store.start()
    second = store.run("from-s3-changed")
    [new_copy] = store.copies("tiny-sd")
    assert new_copy != model_copy and store.partials() == []
    assert (new_copy / WEIGHTS).read_bytes() == (changed / WEIGHTS).read_bytes()
    assert store.copies("style.safetensors") == [lora_copy]  # its object did not change
    assert np.abs(second - first).max() > 3, "the new UNet changes the image"
    published = shutil.copytree(local, tmp_path / "published")
    shutil.copyfile(changed / WEIGHTS, published / WEIGHTS)
    assert int(np.abs(second - direct(published, lora, store.root / "inputs" / "i0.png")).max()) <= 1
