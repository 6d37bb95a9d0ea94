"""bench/gpu_throughput.py stays runnable for a session with a GPU: its --tiny mode runs every part
(plain diffusers, the engine through the chunk path, the safety checker's row, the other families) on
the CPU, in an interpreter that sees only the device image's packages and the carried wheels
(tests/gpuimage.py), with the device command's environment. A new import on the chunk path that
neither provides fails here, not in the GPU session's first minute."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kits.processes import ROOT
from tests import gpuimage

pytestmark = pytest.mark.slow

KEYS = (
    "engine_img_per_s",
    "recipe_img_per_s",
    "diffusers_b1_img_per_s",
    "diffusers_batched_img_per_s",
    "unet_tflops",
    "floor_fraction",
    "device",
)
# What the device command in bench/RESULTS.md sets: no hub (the machine reaches nothing), no hub kernels.
DEVICE_ENV = {"USE_HUB_KERNELS": "0", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def image_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("gpu-image-site")
    gpuimage.build_site(site, gpuimage.simulated_names())
    return site


def bench(site: Path, out: Path) -> tuple[list[str], dict[str, str]]:
    command = [sys.executable, "-S", "bench/gpu_throughput.py", "--tiny", "--out", str(out)]
    return command, gpuimage.simulated_env(site) | DEVICE_ENV


def test_gpu_throughput_benchmark_smoke(image_site: Path, tmp_path: Path) -> None:
    command, env = bench(image_site, tmp_path)
    ran = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, check=False)
    assert ran.returncode == 0, ran.stderr[-3000:]
    lines = ran.stdout.strip().splitlines()
    last = json.loads(lines[-1])
    for key in KEYS:
        assert key in last, key
    assert last["device"] == "cpu" and last["tiny"] is True
    # On a CPU the guide's recipe (model CPU offload) cannot run; everything else must have.
    assert last["recipe_img_per_s"] is None
    for key in KEYS[:-1]:
        if key != "recipe_img_per_s":
            assert isinstance(last[key], float) and last[key] > 0, key
    for family in ("sdxl_refiner", "x4_upscaler"):
        assert last[f"{family}_engine_img_per_s"] > 0 and last[f"{family}_diffusers_b2_img_per_s"] > 0
    assert last["checker_chunk_ratio"] > 0 and 0 < last["engine_unet_share"] <= 1
    assert last["engine_compiles_in_stream"] == 0
    assert "| engine_img_per_s |" in ran.stdout  # the markdown table

    written = json.loads((tmp_path / "gpu_throughput.json").read_text())
    assert {key: written["summary"][key] for key in last} == last
    assert {key: value for key, value in written["final"].items() if key != "wall_s"} == {
        key: value for key, value in last.items() if key != "wall_s"
    }
    rows = {row["what"]: row for row in written["rows"]}
    assert not [row for row in written["rows"] if "error" in row]
    assert rows["env"]["use_hub_kernels"] == "0"
    order = [row["what"] for row in written["rows"]]
    # The pair the run is for comes first: the compiled baseline (c), then the engine (d).
    assert (
        order.index("sd15_diffusers_batched_compiled")
        < order.index("sd15_engine")
        < order.index("sd15_diffusers_b1")
    )
    engine = rows["sd15_engine"]
    # One chunk of four calls at static_batch 4, as the worker runs a chunk; its duty cycle is logged.
    assert engine["items"] == 16 and engine["chunks"] == 1 and engine["static_batch"] == 4
    assert 0 < engine["duty_cycle"] <= 1 and last["engine_duty_cycle"] == engine["duty_cycle"]
    # On the CPU the UNet runs inside the calls, which it does not fill (text encoder, VAE).
    assert 0 < engine["unet_share"] < engine["duty_cycle"]
    assert last["engine_unet_share"] == engine["unet_share"]
    assert rows["sd15_engine_load"]["warmup_s"] > 0  # the engine warmed up before the stream
    assert rows["flops"]["per_image_tflop"] > 0
    # The same loaded engine with SD 1.5's safety checker, over one chunk, beside the run without.
    checked = rows["sd15_engine_checker"]
    assert checked["items"] == 16 and checked["chunks"] == 1
    assert rows["sd15_checker_cost"]["ratio"] == last["checker_chunk_ratio"]


def test_a_run_stopped_by_a_time_limit_still_prints_what_it_measured(
    image_site: Path, tmp_path: Path
) -> None:
    """The device tool ends a call at its limit: the inner `timeout` sends SIGTERM first."""
    command, env = bench(image_site, tmp_path)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env
    )
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:  # stop it in the engine, once a first rate is measured
        lines.append(line)
        if '"what": "sd15_engine_load"' in line:  # (c)'s rate is kept by now
            process.send_signal(signal.SIGTERM)
            break
    lines += process.stdout.readlines()
    assert process.wait(60) == 124
    last = json.loads(lines[-1])
    assert set(KEYS) <= set(last) and last["diffusers_batched_img_per_s"] > 0
    assert json.loads((tmp_path / "gpu_throughput.json").read_text())["rows"][-1]["what"] == "stopped"


def test_the_carried_wheels_are_what_this_environment_tests_and_the_command_reads_the_list() -> None:
    """Also what the bench does not import: each carried wheel's own requirements are in the image or
    carried (compel, say, imported only for weighted prompts)."""
    found = gpuimage.installed()
    pins = gpuimage.carried_wheels()
    assert "kombu" in pins and "amqp" in pins and "vine" in pins  # jobs/embedded.py's import chain
    differ = {
        name: (version, found[name].version if name in found else None) for name, version in pins.items()
    }
    assert {name: pair for name, pair in differ.items() if pair[0] != pair[1]} == {}, (
        "bench/gpu_wheels.txt: pin each wheel to the version this environment tests with"
    )
    results = (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    download = re.search(r"pip download [^`]*?-r bench/gpu_wheels\.txt", results, re.S)
    assert download, "the documented download command reads bench/gpu_wheels.txt"
    image = gpuimage.image_packages()
    assert {"torch", "transformers", "accelerate", "safetensors", "numpy", "pillow"} <= image
    assert not {"diffusers", "kombu", "celery", "pydantic", "redis", "boto3"} & image
    unmet = {
        (name, needed)
        for name in pins
        for needed in gpuimage.requirement_names(found[name].requires or [])
        if needed not in image | pins.keys()
    }
    # diffusers declares importlib-metadata but imports it only on Python before 3.8 (utils/import_utils.py).
    assert unmet == {("diffusers", "importlib-metadata")}
