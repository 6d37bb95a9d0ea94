"""bench/gpu_throughput.py stays runnable for a session with a GPU: its --tiny mode runs every part
(plain diffusers, the engine through the chunk path, the other families) on the CPU."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

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


def test_gpu_throughput_benchmark_smoke(tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, "bench/gpu_throughput.py", "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
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
    assert "| engine_img_per_s |" in ran.stdout  # the markdown table

    written = json.loads((tmp_path / "gpu_throughput.json").read_text())
    assert {key: written["summary"][key] for key in last} == last
    assert {key: value for key, value in written["final"].items() if key != "wall_s"} == {
        key: value for key, value in last.items() if key != "wall_s"
    }
    rows = {row["what"]: row for row in written["rows"]}
    assert not [row for row in written["rows"] if "error" in row]
    engine = rows["sd15_engine"]
    # One chunk of four calls at static_batch 4, as the worker runs a chunk; its duty cycle is logged.
    assert engine["items"] == 16 and engine["chunks"] == 1 and engine["static_batch"] == 4
    assert 0 < engine["duty_cycle"] <= 1 and last["engine_duty_cycle"] == engine["duty_cycle"]
    # On the CPU the UNet runs inside the calls, which it does not fill (text encoder, VAE).
    assert 0 < engine["unet_share"] < engine["duty_cycle"]
    assert last["engine_unet_share"] == engine["unet_share"]
    assert rows["sd15_engine_load"]["warmup_s"] > 0  # the engine warmed up before the stream
    assert rows["flops"]["per_image_tflop"] > 0


def test_a_run_stopped_by_a_time_limit_still_prints_what_it_measured(tmp_path: Path) -> None:
    """The device tool ends a call at its limit: the inner `timeout` sends SIGTERM first."""
    bench = subprocess.Popen(
        [sys.executable, "bench/gpu_throughput.py", "--tiny", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    assert bench.stdout is not None
    lines: list[str] = []
    for line in bench.stdout:  # stop it in the engine, once a first rate is measured
        lines.append(line)
        if '"what": "sd15_engine_load"' in line:  # (b)'s rate is kept by now
            bench.send_signal(signal.SIGTERM)
            break
    lines += bench.stdout.readlines()
    assert bench.wait(60) == 124
    last = json.loads(lines[-1])
    assert set(KEYS) <= set(last) and last["diffusers_b1_img_per_s"] > 0
    assert json.loads((tmp_path / "gpu_throughput.json").read_text())["rows"][-1]["what"] == "stopped"
