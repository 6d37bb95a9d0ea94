"""Real-world checkpoint fields through `imgjobs submit`, real Redis and real `imgjobs worker`
processes (one per model), on tiny random-weight models, CPU, fp32: LoRA adapters (a stage's own,
switched on one worker, and a model's), a single-file checkpoint, a custom VAE and
`safety_checker: false`. Every output is checked against diffusers called directly, within 1/255."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
import yaml
from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline
from PIL import Image

from jobs.embedded import EmbeddedRedis, free_port
from jobs.registry import Registry
from jobstate.store import JobStore
from kits.helpers import write_image, write_job
from kits.metrics import sample, scrape
from kits.processes import Workers, imgjobs
from workers.tiny_models import (
    write_tiny_lora,
    write_tiny_sd,
    write_tiny_sd_with_safety_checker,
    write_tiny_single_file,
    write_tiny_vae,
)

pytestmark = pytest.mark.slow

MODELS = [
    "tiny-sd",
    "tiny-sd-styled",
    "tiny-sd-single",
    "tiny-sd-vae",
    "tiny-sd-checked",
    "tiny-sd-unchecked",
]
ITEMS: list[dict[str, Any]] = [
    {"id": f"i{n}", "prompt": f"a cat, take {n}", "seed": 10 + n} for n in range(3)
]
NEGATIVE = "blurry"
STEPS, STRENGTH, GUIDANCE = 4, 0.75, 7.5


@dataclass
class Shelf:
    root: Path
    models: Path
    broker_url: str
    workers: Workers
    metrics_port: int  # tiny-sd's worker's

    @property
    def sd(self) -> Path:
        return self.root / "models" / "tiny-sd"

    def lora(self, name: str) -> str:
        return str(self.root / "loras" / name)

    def run(self, name: str, stages: list[dict[str, Any]]) -> tuple[Path, list[dict[str, Any]]]:
        """Submit a job of ITEMS through these stages; wait for it; its folder and results."""
        folder = self.root / "jobs" / name
        rows = [{**item, "image": str(self.root / "inputs" / f"{item['id']}.png")} for item in ITEMS]
        spec = write_job(folder, rows, output=str(self.root / "out"), name=name)
        data = json.loads(spec.read_text())
        data["stages"] = stages
        spec.write_text(json.dumps(data))
        env = {
            "IMGJOBS_BROKER_URL": self.broker_url,
            "IMGJOBS_MODELS": str(self.models),
            "IMGJOBS_CHUNK_SIZE": "2",
        }
        submitted = imgjobs("submit", str(spec), env=env)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        store = JobStore(redis.Redis.from_url(self.broker_url, decode_responses=True))
        deadline = time.monotonic() + 300
        while not store.status(job_id).finished:
            assert time.monotonic() < deadline, self.workers.logs()
            time.sleep(0.2)
        results_file = self.root / "out" / job_id / "results.jsonl"
        deadline = time.monotonic() + 60
        while not results_file.exists():
            assert time.monotonic() < deadline, self.workers.logs()
            time.sleep(0.2)
        results = [json.loads(line) for line in results_file.read_text().splitlines()]
        failures = [(r["id"], r["error"]) for r in results if r["status"] != "succeeded"]
        assert not failures, f"{failures}\n{self.workers.logs()}"
        return self.root / "out" / job_id, results


@pytest.fixture(scope="module")
def shelf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shelf]:
    root = tmp_path_factory.mktemp("checkpoints")
    sd = write_tiny_sd(root / "models" / "tiny-sd")
    write_tiny_vae(root / "models" / "tiny-vae")
    write_tiny_single_file(sd, root / "models" / "tiny-sd.safetensors")
    write_tiny_sd_with_safety_checker(root / "models" / "checked")
    for name, seed in (("a", 1), ("b", 2)):
        write_tiny_lora(root / "loras" / name, sd, seed=seed, text_encoder=name == "b")
    for index, item in enumerate(ITEMS):
        write_image(root / "inputs" / f"{item['id']}.png", (32, 32), (40 + 60 * index, 120, 200 - 50 * index))
    common = {"dtype": "float32"}
    models = root / "models.yaml"
    registry_file = {
        "models": {
            "tiny-sd": {"source": "models/tiny-sd", **common},
            "tiny-sd-styled": {
                "source": "models/tiny-sd",
                "loras": [{"source": "loras/a", "weight": 0.8}],
                **common,
            },
            "tiny-sd-single": {"source": "models/tiny-sd.safetensors", "config": "models/tiny-sd", **common},
            "tiny-sd-vae": {"source": "models/tiny-sd", "vae": "models/tiny-vae", **common},
            "tiny-sd-checked": {"source": "models/checked", **common},
            "tiny-sd-unchecked": {"source": "models/checked", "safety_checker": False, **common},
        }
    }
    models.write_text(yaml.safe_dump(registry_file), encoding="utf-8")
    registry = Registry.load(models)
    pool = Workers(root)
    with EmbeddedRedis(root / "redis") as server:
        try:
            port = free_port()
            for model in MODELS:
                pool.start(
                    model,
                    server.url,
                    registry,
                    {"IMGJOBS_METRICS_PORT": str(port)} if model == "tiny-sd" else None,
                )
            pool.wait_ready(timeout=300)
            yield Shelf(root, models, server.url, pool, port)
        finally:
            pool.stop()


def pixels(path: Path | str) -> np.ndarray:
    image: np.ndarray = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
    return image


def direct(pipeline: Any, item: dict[str, Any], image: Image.Image) -> tuple[np.ndarray, bool]:
    """diffusers' own call for one item, as a uint8 image (rounded as output_type="pil" rounds), and
    whether its safety checker flagged it."""
    pipeline.set_progress_bar_config(disable=True)
    result = pipeline(
        prompt=item["prompt"],
        negative_prompt=NEGATIVE,
        image=image,
        strength=STRENGTH,
        guidance_scale=GUIDANCE,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(item["seed"]),
        output_type="np",
    )
    flags = getattr(result, "nsfw_content_detected", None)
    return (result.images[0] * 255).round().astype(np.int16), bool(flags and flags[0])


def with_adapters(pipeline: Any, adapters: list[tuple[str, float]]) -> Any:
    for index, (source, _) in enumerate(adapters):
        pipeline.load_lora_weights(source, adapter_name=f"direct{index}")
    if adapters:
        pipeline.set_adapters(
            [f"direct{i}" for i in range(len(adapters))], [weight for _, weight in adapters]
        )
    return pipeline


def assert_matches(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    # A batched call sums in another order than diffusers' single one: at most one level of 255 apart.
    difference = int(np.abs(ours - theirs).max())
    assert difference <= 1, f"{what}: {difference}/255 from diffusers"


def assert_outputs_match(shelf: Shelf, folder: Path, pipeline: Any) -> None:
    """Each item's output in the job's folder is what `pipeline` makes of its input, called directly."""
    for item in ITEMS:
        image = Image.open(shelf.root / "inputs" / f"{item['id']}.png").convert("RGB")
        assert_matches(
            pixels(folder / item["id"] / "s0-img2img.png"), direct(pipeline, item, image)[0], item["id"]
        )


def stage(model: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": "img2img",
        "model": model,
        "steps": STEPS,
        "strength": STRENGTH,
        "guidance_scale": GUIDANCE,
        **fields,
    }


def test_one_worker_switches_adapter_sets_between_stages_as_diffusers_would(shelf: Shelf) -> None:
    sets = [[(shelf.lora("a"), 0.7)], [(shelf.lora("a"), 0.4), (shelf.lora("b"), 1.0)], []]
    stages = [
        stage(
            "tiny-sd",
            loras=[{"source": s, "weight": w} for s, w in adapters],
            handover="image",
            save=["image"],
        )
        for adapters in sets
    ]
    stages[-1].pop("handover")
    folder, _ = shelf.run("lora-chain", stages)
    for item in ITEMS:
        previous = Image.open(shelf.root / "inputs" / f"{item['id']}.png").convert("RGB")
        for index, adapters in enumerate(sets):
            pipeline = with_adapters(
                StableDiffusionImg2ImgPipeline.from_pretrained(shelf.sd, torch_dtype=torch.float32), adapters
            )
            output = folder / item["id"] / f"s{index}-img2img.png"
            assert_matches(pixels(output), direct(pipeline, item, previous)[0], f"{item['id']} stage {index}")
            previous = Image.open(output).convert("RGB")
    chain = pixels(folder / "i0" / "s0-img2img.png")
    plain = shelf.run("lora-none", [stage("tiny-sd")])[0]
    assert np.abs(chain - pixels(plain / "i0" / "s0-img2img.png")).max() > 3, "the adapter changes the image"
    # One worker served all six chunks (two parts, three stages) on one resident model: each adapter was
    # loaded once, and it switched at most once a chunk (its metrics, from its pool process).
    metrics = scrape(shelf.metrics_port)
    assert sample(metrics, "imgjobs_adapter_loads_total", model="tiny-sd") == 2
    switches = sample(metrics, "imgjobs_adapter_switches_total", model="tiny-sd")
    assert 3 <= switches <= 6 + 1, switches  # six chunks, and the plain job after


def test_a_model_s_own_adapters_and_a_stage_s_added_ones(shelf: Shelf) -> None:
    folder, _ = shelf.run(
        "lora-model", [stage("tiny-sd-styled", loras=[{"source": shelf.lora("b"), "weight": 0.6}])]
    )
    pipeline = with_adapters(
        StableDiffusionImg2ImgPipeline.from_pretrained(shelf.sd, torch_dtype=torch.float32),
        [(shelf.lora("a"), 0.8), (shelf.lora("b"), 0.6)],
    )
    assert_outputs_match(shelf, folder, pipeline)


def test_a_single_file_checkpoint(shelf: Shelf) -> None:
    folder, _ = shelf.run("single-file", [stage("tiny-sd-single")])
    checkpoint = str(shelf.root / "models" / "tiny-sd.safetensors")
    pipeline = StableDiffusionImg2ImgPipeline.from_single_file(
        checkpoint, config=str(shelf.sd), torch_dtype=torch.float32
    )
    assert_outputs_match(shelf, folder, pipeline)


def test_a_custom_vae(shelf: Shelf) -> None:
    folder, _ = shelf.run("own-vae", [stage("tiny-sd-vae")])
    vae = AutoencoderKL.from_pretrained(shelf.root / "models" / "tiny-vae", torch_dtype=torch.float32)
    pipeline = StableDiffusionImg2ImgPipeline.from_pretrained(shelf.sd, vae=vae, torch_dtype=torch.float32)
    assert_outputs_match(shelf, folder, pipeline)


def test_the_safety_checker_flags_and_safety_checker_false_drops_it(shelf: Shelf) -> None:
    checked, checked_results = shelf.run("checked", [stage("tiny-sd-checked")])
    assert all(r["nsfw"] and r["stages"][-1]["nsfw"] for r in checked_results), checked_results
    assert pixels(checked / "i0" / "s0-img2img.png").max() == 0  # made black, as diffusers does
    unchecked, unchecked_results = shelf.run("unchecked", [stage("tiny-sd-unchecked")])
    assert not any(r["nsfw"] for r in unchecked_results)
    folder = shelf.root / "models" / "checked"
    pipeline = StableDiffusionImg2ImgPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    flagging = StableDiffusionImg2ImgPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    for item in ITEMS:
        image = Image.open(shelf.root / "inputs" / f"{item['id']}.png").convert("RGB")
        ours = pixels(unchecked / item["id"] / "s0-img2img.png")
        assert ours.max() > 0
        assert_matches(ours, direct(pipeline, item, image)[0], item["id"])
        assert direct(flagging, item, image)[1], "the checkpoint's own checker flags it"
