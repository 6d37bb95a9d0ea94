"""What report.html and its pages cost a job's end: write_report over N items, each with one
512x512 PNG output in the job's folder (smooth noise, which compresses and decodes like a photo), on
the local storage a worker writes to.

    python bench/report.py [--items 10000] [--work-dir DIR]

Prints one JSON object: items, the PNG's bytes, the pages written and the seconds write_report took.
Inputs, outputs and pages live in --work-dir: /dev/shm by default where there is one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kits.benches import add_folders, work_dir  # noqa: E402
from kits.reports import JOB_ID, succeeded, write_report_of  # noqa: E402

SIDE = 512


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=10_000)
    add_folders(parser, result=False)
    args = parser.parse_args()
    args.work_dir = work_dir(args)

    base = Path(tempfile.mkdtemp(prefix="imgjobs-report-", dir=args.work_dir))
    try:
        noise = np.random.default_rng(0).integers(0, 255, (SIDE // 8, SIDE // 8, 3), dtype=np.uint8)
        picture = base / "output.png"
        Image.fromarray(noise).resize((SIDE, SIDE), Image.Resampling.BICUBIC).save(picture)
        data = picture.read_bytes()
        output = base / "out"
        results = []
        for index in range(args.items):
            item_id = f"i{index:06d}"
            path = output / JOB_ID / item_id / "s0-img2img.png"
            path.parent.mkdir(parents=True)
            path.write_bytes(data)
            results.append(succeeded(item_id, {"s0-img2img": str(path)}))
        started = time.perf_counter()
        pages = write_report_of(output, results)
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        json.dumps(
            {"items": args.items, "png_bytes": len(data), "pages": len(pages), "report_s": round(seconds, 3)}
        )
    )


if __name__ == "__main__":
    main()
