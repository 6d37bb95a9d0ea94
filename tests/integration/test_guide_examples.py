"""Every example of the diffusers image-to-image guide as a job, across separate worker processes
(one per model), against real Redis and the S3 server on loopback."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from jobs.embedded import EmbeddedRedis
from jobs.registry import Registry
from jobstate.store import JobStore
from kits.processes import Workers, imgjobs
from kits.reports import Page
from workers.demo import write_demo
from workers.scoring import dhash

pytestmark = pytest.mark.slow

WORKER_MODELS = [
    "tiny-sd",
    "tiny-sd-style",
    "tiny-sdxl-refiner",
    "tiny-kandinsky22",
    "tiny-sd-x2-latent-upscaler",
    "tiny-sd-x4-upscaler",
]


class Guide:
    def __init__(self, demo: Path, bucket: str, broker_url: str, workers: Workers) -> None:
        self.demo, self.bucket, self.broker_url, self.workers = demo, bucket, broker_url, workers
        self.s3 = boto3.client("s3")

    def run(self, example: str) -> tuple[str, list[dict[str, Any]]]:
        """Submit examples/<example>.json with inputs and outputs on S3; wait; return (job id, results)."""
        spec = json.loads((self.demo / "examples" / f"{example}.json").read_text())
        rows = [
            json.loads(line)
            for line in (self.demo / spec["items"].removeprefix("../")).read_text().splitlines()
        ]
        for row in rows:
            if "image" in row:
                row["image"] = f"s3://{self.bucket}/{row['image']}"
        items = self.demo / "examples" / f"{example}.s3.jsonl"
        items.write_text("".join(json.dumps(row) + "\n" for row in rows))
        spec |= {"output": f"s3://{self.bucket}/out", "items": items.name}
        path = self.demo / "examples" / f"{example}.s3.json"
        path.write_text(json.dumps(spec))
        env = {
            "IMGJOBS_BROKER_URL": self.broker_url,
            "IMGJOBS_MODELS": str(self.demo / "models.yaml"),
            "IMGJOBS_CHUNK_SIZE": "2",
        }
        submitted = imgjobs("submit", str(path), env=env)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        client = redis.Redis.from_url(self.broker_url, decode_responses=True)
        deadline = time.monotonic() + 300
        while not JobStore(client).status(job_id).finished:
            assert time.monotonic() < deadline, self.workers.logs()
            time.sleep(0.2)
        body = self.s3.get_object(Bucket=self.bucket, Key=f"out/{job_id}/results.jsonl")["Body"].read()
        results = [json.loads(line) for line in body.decode().splitlines()]
        assert [r["id"] for r in results] == [row["id"] for row in rows]
        failures = [(r["id"], r["error"]) for r in results if r["status"] != "succeeded"]
        assert not failures, f"{failures}\n{self.workers.logs()}"
        return job_id, results

    def image(self, uri: str) -> Image.Image:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return Image.open(io.BytesIO(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()))

    def keys(self, job_id: str, item_id: str) -> list[str]:
        listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=f"out/{job_id}/{item_id}/")
        return sorted(obj["Key"].rsplit("/", 1)[1] for obj in listed.get("Contents", []))


@pytest.fixture(scope="module")
def guide(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[Guide]:
    root = tmp_path_factory.mktemp("guide")
    demo = write_demo(root / "demo").parent
    bucket = "guide-examples"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for path in (demo / "inputs").iterdir():
        s3.upload_file(str(path), bucket, f"inputs/{path.name}")
    registry = Registry.load(demo / "models.yaml")
    pool = Workers(root)
    with EmbeddedRedis(root / "redis") as server:
        try:
            for model in WORKER_MODELS:
                pool.start(model, server.url, registry)
            pool.wait_ready(timeout=240)
            yield Guide(demo, bucket, server.url, pool)
        finally:
            pool.stop()


def test_sd15_img2img_and_its_report_in_a_browser(guide: Guide, tmp_path: Path) -> None:
    job_id, results = guide.run("sd15-img2img")
    for result in results:
        assert guide.image(result["outputs"]["s0-img2img"]).size == (64, 64)
    assert guide.keys(job_id, "0000") == ["s0-img2img.png"]
    report = guide.s3.get_object(Bucket=guide.bucket, Key=f"out/{job_id}/report.html")["Body"].read().decode()
    assert report.count('<section class="item') == 12 and report.count("data:image/jpeg;base64,") == 24
    header = Page(report)
    assert header.counts() == {"items": "12", "succeeded": "12", "failed": "0", "cancelled": "0"}
    assert header.tables["stages"][1] == [
        "s0-img2img",
        "img2img",
        "tiny-sd",
        "steps=8, strength=0.8",
        "ddim: 6 steps, 12 UNet evaluations an item",  # tiny-sd's own scheduler; guidance doubles
        "image",
        "none",
    ]
    # Nothing failed: no failed items' page, and none linked.
    assert "failed items: none" in header.text and not [link for link in header.links if "failed-" in link]
    listed = guide.s3.list_objects_v2(Bucket=guide.bucket, Prefix=f"out/{job_id}/_report/")
    assert "Contents" not in listed

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here; .ci/run installs Debian's chromium package for this check")
    (tmp_path / "report.html").write_text(report)
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1000,1200",
            (tmp_path / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    screenshot = Image.open(shot).convert("RGB")
    assert screenshot.size == (1000, 1200)
    # The inlined thumbnails render: the page holds far more than the few colours of text on white.
    assert len(set(screenshot.getdata())) > 500


def test_sdxl_refiner_img2img(guide: Guide) -> None:
    _, results = guide.run("sdxl-refiner-img2img")
    assert all(guide.image(r["outputs"]["s0-img2img"]).size == (64, 64) for r in results)


def test_kandinsky22_img2img(guide: Guide) -> None:
    _, results = guide.run("kandinsky22-img2img")
    assert all(guide.image(r["outputs"]["s0-img2img"]).size == (64, 64) for r in results)


def test_text_image_image(guide: Guide) -> None:
    job_id, results = guide.run("text-image-image")
    for result in results:
        assert result["image"] is None
        assert [s["model"] for s in result["stages"]] == ["tiny-sd", "tiny-kandinsky22"]
        assert guide.image(result["outputs"]["s0-text2img"]).size == (64, 64)
        assert guide.image(result["outputs"]["s1-img2img"]).size == (64, 64)
    assert guide.keys(job_id, "0000") == ["s0-text2img.png", "s1-img2img.png"]


def test_image_image_image_hands_latents_across_three_workers(guide: Guide) -> None:
    job_id, results = guide.run("image-image-image")
    for result in results:
        assert [s["model"] for s in result["stages"]] == ["tiny-sd", "tiny-sd-style", "tiny-sd"]
        assert result["outputs"]["s0-img2img.latent"].endswith("/s0-img2img.safetensors")
    # s0 kept its latent (save: [latent]); s1's latent was only a handover and is gone; s2 saved its image.
    assert guide.keys(job_id, "0000") == ["s0-img2img.safetensors", "s1-img2img.png", "s2-img2img.png"]


def test_image_then_x2_then_x4_upscalers(guide: Guide) -> None:
    job_id, results = guide.run("upscale-x2-x4")
    for result in results:
        assert guide.image(result["outputs"]["s1-upscale"]).size == (64, 64)
        assert guide.image(result["outputs"]["s2-upscale"]).size == (256, 256)
    assert guide.keys(job_id, "0000") == ["s1-upscale.png", "s2-upscale.png"]


def test_controlnet_depth_then_style(guide: Guide) -> None:
    _, results = guide.run("controlnet-depth-then-style")
    for result in results:
        assert [s["model"] for s in result["stages"]] == ["tiny-sd", "tiny-sd-style"]
        assert guide.image(result["outputs"]["s1-img2img"]).size == (64, 64)


def test_compel_weighted_prompt(guide: Guide) -> None:
    _, results = guide.run("compel-weighted")
    assert results[0]["prompt"] == "a (cat)1.3 wizard, jungle--"
    assert guide.image(results[0]["outputs"]["s0-img2img"]).size == (64, 64)


def test_a_fast_sampler_and_a_few_step_preset_record_what_they_ran(guide: Guide) -> None:
    """DPM++ 2M Karras at 20 steps (strength 0.8: 16 run, two UNet rows each with guidance), and the
    LCM preset (4 steps, 3 run, guidance 1: one row each), through the workers: each results row and
    the report's header say what ran."""
    ran = {"fast-sampler": ("dpmpp_2m", "karras", 16, 32), "few-step-lcm": ("lcm", None, 3, 3)}
    for example, (sampler, schedule, steps, evaluations) in ran.items():
        job_id, results = guide.run(example)
        for result in results:
            (stage,) = result["stages"]
            assert (stage["sampler"], stage["schedule"]) == (sampler, schedule), example
            assert (stage["steps_run"], stage["unet_evaluations"]) == (steps, evaluations), example
            assert result["params"]["sampler"] == sampler
            assert guide.image(result["outputs"]["s0-img2img"]).size == (64, 64)
        assert results[0]["params"]["preset"] == ("lcm" if example == "few-step-lcm" else None)
        key = f"out/{job_id}/report.html"
        header = Page(guide.s3.get_object(Bucket=guide.bucket, Key=key)["Body"].read().decode())
        shown = (
            f"{sampler}{f' {schedule}' if schedule else ''}: {steps} steps, {evaluations} UNet evaluations"
        )
        assert header.tables["stages"][1][4] == f"{shown} an item", example


def test_scored_and_gated_rows_and_report(guide: Guide) -> None:
    """The demo's scoring example through real workers: every row's scores equal CLIP's own, the items
    below the gate re-rolled with their next seeds, and the report's scored pages, near-duplicates
    (two items repeated under other ids) included."""
    job_id, results = guide.run("scored-and-gated")
    items = {json.loads(line)["id"]: json.loads(line) for line in (guide.demo / "items-scored.jsonl").open()}
    clip = guide.demo / "models" / "tiny-clip"
    model = CLIPModel.from_pretrained(clip, dtype=torch.float32).eval()
    processor = CLIPProcessor.from_pretrained(clip, backend="pil")
    rerolled = 0
    for result in results:
        quality, item = result["quality"], items[result["id"]]
        output = guide.image(result["outputs"]["s0-img2img"]).convert("RGB")
        source = Image.open(guide.demo / item["image"]).convert("RGB")
        inputs = processor(text=[item["prompt"]], images=[output, source], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model(**inputs)
        assert quality["clip_score"] == pytest.approx(
            100 * max(float(out.image_embeds[0] @ out.text_embeds[0]), 0), abs=1e-3
        )
        assert quality["input_similarity"] == pytest.approx(
            float(out.image_embeds[0] @ out.image_embeds[1]), abs=2e-4
        )
        assert quality["phash"] == dhash(output)
        assert quality["low_score"] == (quality["clip_score"] < 15)
        if quality["attempts"]:
            rerolled += 1
            seeds = [attempt["seed"] for attempt in quality["attempts"]]
            assert seeds == [item["seed"] + n for n in range(len(seeds))] and quality["seed"] in seeds
    assert rerolled, "no item was below the gate"
    prefix = f"out/{job_id}/"
    listed = guide.s3.list_objects_v2(Bucket=guide.bucket, Prefix=f"{prefix}_report/")
    pages = {obj["Key"].removeprefix(prefix) for obj in listed["Contents"]}
    assert {
        "_report/worst-clip-score.html",
        "_report/worst-input-similarity.html",
        "_report/duplicates.html",
    } <= pages
    report = guide.s3.get_object(Bucket=guide.bucket, Key=f"{prefix}report.html")["Body"].read().decode()
    assert len(Page(report).of_tag("svg", "histogram")) == 2
    body = guide.s3.get_object(Bucket=guide.bucket, Key=f"{prefix}_report/duplicates.html")["Body"].read()
    groups = Page(body.decode())
    shown = [image["alt"] for image in groups.images]
    assert {"0000", "0000-again"} <= set(shown) and {"0005", "0005-again"} <= set(shown)
