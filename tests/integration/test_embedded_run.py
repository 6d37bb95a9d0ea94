"""`imgjobs demo` / `imgjobs run` on the embedded default: its own Redis and worker processes, and
outputs equal to diffusers called directly on each item."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForImage2Image
from PIL import Image

from kits.helpers import write_image, write_job
from kits.processes import imgjobs
from schemas.settings import Settings
from workers.imageio import load_input

pytestmark = pytest.mark.slow


def test_demo_runs_and_matches_diffusers_item_by_item(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    ran = imgjobs("demo", "--dir", str(demo_dir))
    assert ran.returncode == 0, ran.stderr + ran.stdout
    assert "succeeded" in ran.stdout and "embedded mode" in ran.stderr

    results_files = list((demo_dir / "out").glob("*/results.jsonl"))
    assert len(results_files) == 1
    results = [json.loads(line) for line in results_files[0].read_text().splitlines()]
    items = [json.loads(line) for line in (demo_dir / "items.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == [i["id"] for i in items] and len(items) == 12
    assert all(r["status"] == "succeeded" for r in results)

    def direct(name: str) -> Any:
        pipeline = AutoPipelineForImage2Image.from_pretrained(
            demo_dir / "models" / name, torch_dtype=torch.float32
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    sd, style = direct("tiny-sd"), direct("tiny-sd-style")
    for item, result in zip(items, results, strict=True):
        first, second = (stage["params"] for stage in result["stages"])
        source = load_input(str(demo_dir / item["image"]), tuple(first["size"]), Settings())

        def call(
            pipeline: Any,
            image: Any,
            params: dict[str, Any],
            prompt: str,
            output_type: str,
            seed: int = item["seed"],
        ) -> Any:
            return pipeline(
                prompt=prompt,
                image=image,
                negative_prompt="ugly, blurry",
                strength=params["strength"],
                guidance_scale=params["guidance_scale"],
                num_inference_steps=params["steps"],
                generator=torch.Generator().manual_seed(seed),
                output_type=output_type,
            ).images

        # The chain as a user would write it with diffusers alone: latents handed from one model to the next.
        latents = call(sd, source, first, item["prompt"], "latent")
        expected = {
            "s0-img2img": call(sd, source, first, item["prompt"], "pil")[0],
            "s1-img2img": call(style, latents, second, f"{item['prompt']}, charliebo artstyle", "pil")[0],
        }
        for name, image in expected.items():
            ours = np.asarray(Image.open(result["outputs"][name]), dtype=np.int16)
            # One uint8 level of slack: a batched call rounds floats in another order than a single one.
            assert np.abs(ours - np.asarray(image, dtype=np.int16)).max() <= 1, (item["id"], name)


def test_run_exits_1_when_an_item_fails_and_records_it(tmp_path: Path, models_yaml: Path) -> None:
    write_image(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    rows = [
        {"id": "a", "image": "in/a.png", "prompt": "x"},
        {"id": "empty", "image": "in/empty.png", "prompt": "x"},
        {"id": "gone", "image": "in/gone.png", "prompt": "x"},
    ]
    spec = write_job(tmp_path, rows)
    ran = imgjobs("run", str(spec), "--models", str(models_yaml))
    finished = time.time()
    assert ran.returncode == 1, ran.stderr
    assert "failed" in ran.stdout
    assert re.search(r"InputImageError\s*│\s*2\s*│\s*empty", ran.stdout), "the summary groups failures"
    (results_file,) = (tmp_path / "out").glob("*/results.jsonl")
    results = {r["id"]: r for r in map(json.loads, results_file.read_text().splitlines())}
    assert results["a"]["status"] == "succeeded"
    assert results["empty"]["error"]["type"] == results["gone"]["error"]["type"] == "InputImageError"

    # The run's state stays: `failures` and `retry` of its job id need no broker.
    job_id = results_file.parent.name
    again = imgjobs("run", str(spec), "--models", str(models_yaml))  # only the summary, and what to do
    assert (
        again.returncode == 1 and f"`imgjobs retry {job_id}` runs its 2 failed item(s) again" in again.stderr
    )
    failed = [json.loads(line)["id"] for line in imgjobs("failures", job_id, "--json").stdout.splitlines()]
    assert sorted(failed) == ["empty", "gone"]
    misspelt = imgjobs("failures", job_id, "--reason", "InputImageErorr")
    assert misspelt.returncode == 2 and misspelt.stderr == (
        "error: --reason InputImageErorr: no item fails with an error of that type; "
        "did you mean 'InputImageError'?\n"
    )
    (listed,) = json.loads(imgjobs("jobs", "--json").stdout)  # the embedded runs of the state folder
    mistyped = imgjobs("status", job_id[:-1] + "x")
    assert mistyped.returncode == 2 and mistyped.stderr.startswith(f"error: no job '{job_id[:-1]}x': ")
    assert mistyped.stderr.endswith(f"; did you mean {job_id!r}?\n"), mistyped.stderr
    assert (listed["job_id"], listed["state"], listed["failed"]) == (job_id, "failed", 2)
    logged = imgjobs("logs", job_id)
    assert logged.returncode == 0 and "InputImageError" in logged.stdout, logged.stderr
    assert "worker log line(s) name the job" in logged.stdout and "worker-tiny-sd-0.log: " in logged.stdout
    kept = Path(results["a"]["outputs"]["s0-img2img"]).stat().st_mtime_ns
    write_image(tmp_path / "in" / "gone.png")  # the missing input arrives
    retried_at = time.time()
    retried = imgjobs("retry", job_id, "--reason", "InputImageError")
    assert retried.returncode == 1, retried.stderr  # "empty" fails again
    assert "2 failed item(s) run again" in retried.stderr
    (listed,) = json.loads(imgjobs("jobs", "--json").stdout)
    assert listed["stopped_s"] >= retried_at - finished, "the time it was finished is not its running time"
    results = {r["id"]: r for r in map(json.loads, results_file.read_text().splitlines())}
    assert (results["gone"]["status"], results["empty"]["status"]) == ("succeeded", "failed")
    assert Path(results["a"]["outputs"]["s0-img2img"]).stat().st_mtime_ns == kept, "a was not run again"


def test_resize_stage_runs_on_the_cpu_worker_and_feeds_the_next_stage(
    tmp_path: Path, models_yaml: Path
) -> None:
    write_image(tmp_path / "in" / "wide.png", size=(120, 60))
    rows = [{"id": "a", "image": "in/wide.png", "prompt": "x"}]
    spec = write_job(
        tmp_path,
        rows,
        stage={"type": "resize", "size": [48, 48], "format": "jpeg", "quality": 80, "save": ["image"]},
    )
    data = json.loads(spec.read_text())
    data["stages"].append({"type": "img2img", "model": "tiny-sd", "strength": 0.5, "steps": 4})
    spec.write_text(json.dumps(data))
    ran = imgjobs("run", str(spec), "--models", str(models_yaml))
    assert ran.returncode == 0, ran.stderr + ran.stdout
    (results_file,) = (tmp_path / "out").glob("*/results.jsonl")
    (result,) = map(json.loads, results_file.read_text().splitlines())
    assert [s["model"] for s in result["stages"]] == ["cpu", "tiny-sd"]
    resized = Image.open(result["outputs"]["s0-resize"])
    assert (resized.format, resized.size) == ("JPEG", (48, 48))
    assert Image.open(result["outputs"]["s1-img2img"]).size == (48, 48)


def test_an_embedded_run_reads_the_local_inputs_of_its_own_folder_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IMGJOBS_LOCAL_INPUT_ROOTS", raising=False)  # no folder of the operator's
    folder = tmp_path / "job"
    write_image(folder / "in" / "a.png", size=(24, 24))
    outside = write_image(tmp_path / "elsewhere" / "b.png", size=(24, 24))
    rows = [{"id": "a", "image": "in/a.png"}, {"id": "b", "image": str(outside)}]
    spec = write_job(folder, rows, stage={"type": "resize", "model": "cpu"}, defaults={"size": [16, 16]})
    ran = imgjobs("run", str(spec))
    assert ran.returncode == 1, ran.stderr  # b failed
    (results_file,) = (folder / "out").glob("*/results.jsonl")
    results = {row["id"]: row for row in map(json.loads, results_file.read_text().splitlines())}
    assert results["a"]["status"] == "succeeded"
    assert results["b"]["status"] == "failed"
    assert "IMGJOBS_LOCAL_INPUT_ROOTS" in results["b"]["error"]["message"]

    # As the message says: set it, and retry.
    roots = {"IMGJOBS_LOCAL_INPUT_ROOTS": str(outside.parent)}
    retried = imgjobs("retry", results_file.parent.name, env=roots)
    assert retried.returncode == 0, retried.stderr
    results = {row["id"]: row for row in map(json.loads, results_file.read_text().splitlines())}
    assert results["b"]["status"] == "succeeded", results["b"]
