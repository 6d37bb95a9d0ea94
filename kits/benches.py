"""What the benchmark scripts share: the folders they write their result to (--out) and work in
(--work-dir), and how they print a result."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

SHARED_MEMORY = Path("/dev/shm")


def add_folders(parser: argparse.ArgumentParser, *, result: bool = True) -> None:
    """--out (where the result's JSON goes: $OUT, as the device machine sets it, else the temporary
    folder) and --work-dir (inputs, outputs and Redis; see work_dir)."""
    if result:
        parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", tempfile.gettempdir())))
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where inputs, outputs and Redis live (default: /dev/shm if there is one, else the "
        "system's temporary folder)",
    )


def work_dir(args: argparse.Namespace) -> Path | None:
    """--work-dir, else /dev/shm where it is writable: RAM-backed, so a benchmark of imgjobs' own costs
    does not measure the disk. None means the system's temporary folder."""
    if args.work_dir is None and SHARED_MEMORY.is_dir() and os.access(SHARED_MEMORY, os.W_OK):
        return SHARED_MEMORY
    path: Path | None = args.work_dir
    return path


def print_measures(result: Mapping[str, object]) -> None:
    """A result as a markdown table of measures, then as one JSON line, the line scripts read."""
    print("| measure | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value} |")
    print(json.dumps(result))
