"""Benchmarks stay runnable: a short smoke run of each, checking the shape of what they print."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kits.processes import ROOT

pytestmark = pytest.mark.slow


def bench(script: str, *args: str) -> dict[str, Any]:
    """The JSON object a benchmark prints last, once it has exited 0."""
    ran = subprocess.run(
        [sys.executable, f"bench/{script}", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    last: dict[str, Any] = json.loads(ran.stdout.strip().splitlines()[-1])
    return last


def test_overhead_benchmark_smoke(tmp_path: Path) -> None:
    options = ("--items", "40", "--producer-items", "300", "--chunk-size", "8", "--out", str(tmp_path))
    last = bench("overhead.py", *options)
    for key in (
        "items_per_s",
        "baseline_items_per_s",
        "ratio",
        "producer_items_per_s",
        "producer_peak_rss_mb",
    ):
        assert last[key] > 0, key
    assert isinstance(last["overhead_ms_per_item"], float)
    assert json.loads((tmp_path / "overhead.json").read_text()) == last


def test_report_benchmark_smoke(tmp_path: Path) -> None:
    last = bench("report.py", "--items", "3", "--work-dir", str(tmp_path))
    # report.html alone: every item succeeded, so no failed-items page is written.
    assert (last["items"], last["pages"]) == (3, 1) and last["report_s"] > 0 and last["png_bytes"] > 0
    assert list(tmp_path.iterdir()) == []  # what it wrote is gone


def test_host_prep_benchmark_smoke() -> None:
    last = bench("host_prep.py", "--repeats", "1", "--batch", "2", "--sizes", "16,32")
    assert [row["size"] for row in last["rows"]] == [16, 32]
    for row in last["rows"]:
        assert row["same_tensor"] is True
        assert row["before_main_thread_ms"] > 0 and row["after_lookup_on_cpu_ms"] > 0


def test_scoring_benchmark_smoke() -> None:
    last = bench(
        "scoring.py", "--reps", "1", "--batch", "2", "--size", "32", "--steps", "2", "--threads", "1"
    )
    assert last["shapes"] == "tiny" and last["batch"] == 2
    for key in (
        "stage_s_per_item",
        "scoring_s_per_item",
        "ratio",
        "preprocess_s_per_item",
        "dhash_s_per_item",
    ):
        assert last[key] > 0, key
