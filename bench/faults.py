"""The fault-injection scenarios of tests/integration/test_faults.py, run once each and tabulated:
one row per fault with the items submitted, succeeded, failed (by reason), lost (must be 0),
completed items executed twice (must be 0) and the time to recover.

    python bench/faults.py [--only NAME ...] [--out DIR]

Real Redis, real worker processes of the tiny random-weight model, moto's S3 server on loopback
and, for the multi-host row, network namespaces (root only; skipped otherwise). Writes faults.json
in --out, prints a markdown table, and prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.registry import Registry  # noqa: E402
from kits import faults  # noqa: E402
from kits.helpers import moto_server  # noqa: E402
from kits.processes import Workers  # noqa: E402

Scenario = Callable[[faults.Lab], faults.FaultRow]

SCENARIOS: dict[str, Scenario] = {
    "worker-sigkill": lambda lab: faults.worker_death(lab, "sigkill"),
    "worker-sigterm": lambda lab: faults.worker_death(lab, "sigterm"),
    "poison-chunk": lambda lab: faults.worker_death(lab, "poison"),
    "redis-restart": lambda lab: faults.redis_restart(lab, strict=False),
    "s3-errors": faults.s3_faults,
    # Every output write fails for 40 s: past boto3's 8 attempts, so the task's own retries take over.
    "s3-outage": lambda lab: faults.s3_faults(
        lab,
        name="s3-outage",
        kinds=("ServiceUnavailable", "SlowDown", "InternalError"),
        fraction=1.0,
        window_s=40,
        methods=("PUT",),
        path_contains="/s0-img2img.png",
        label="S3 refusing every output write for 40 s",
        timeout=240,
    ),
    # Two requests get no answer until the workers' 60 s read timeout has passed.
    "s3-timeouts": lambda lab: faults.s3_faults(
        lab,
        name="s3-timeouts",
        kinds=("stall",),
        first=2,
        fraction=0.0,
        window_s=30,
        stall_s=65,
        label="S3 read timeouts (2 requests unanswered past the 60 s client timeout)",
        timeout=240,
    ),
    "s3-truncated": lambda lab: faults.s3_faults(
        lab,
        name="s3-truncated",
        kinds=("truncate",),
        first=3,
        fraction=0.0,
        window_s=20,
        methods=("GET",),
        path_contains="/in/",
        label="S3 input downloads cut off half-way (3 GETs)",
        timeout=60,
        strict=False,
    ),
    "s3-results-write": lambda lab: faults.s3_faults(
        lab,
        name="s3-results",
        kinds=("ServiceUnavailable", "SlowDown", "InternalError"),
        fraction=1.0,
        window_s=45,
        methods=("PUT",),
        path_contains="results.jsonl",
        label="S3 refusing the results.jsonl write for 45 s",
        timeout=150,
        strict=False,
    ),
    "bad-images": faults.bad_images,
    "malformed-manifests": lambda lab: faults.malformed_manifests(lab)[0],
    "duplicate-submission": faults.duplicate_submission,
    "multi-host": faults.multi_host,
}


def cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, dict):
        return ", ".join(f"{count} {reason}" for reason, count in value.items()) or "0"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="run only these scenarios")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", tempfile.gettempdir())))
    args = parser.parse_args()
    names = args.only or list(SCENARIOS)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="imgjobs-faults-") as tmp:
        root = Path(tmp)
        from workers.tiny_models import write_tiny_sd

        model = write_tiny_sd(root / "models" / "tiny-sd")
        models_yaml = root / "models" / "models.yaml"
        models_yaml.write_text(f"models:\n  tiny-sd:\n    source: {model}\n    dtype: float32\n")
        registry = Registry.load(models_yaml)
        credentials = {"AWS_ACCESS_KEY_ID": "bench-key-id", "AWS_SECRET_ACCESS_KEY": "bench-secret"}
        with moto_server(root / "moto.log", credentials) as endpoint:
            for name in names:
                if name == "multi-host" and (reason := faults.netns_unavailable()):
                    print(f"{name}: skipped: {reason}", file=sys.stderr)
                    continue
                workers = Workers(root / name)
                lab = faults.Lab(root / name, models_yaml, registry, workers, s3_endpoint=endpoint)
                started = time.monotonic()
                print(f"{name} ...", file=sys.stderr, flush=True)
                try:
                    result = SCENARIOS[name](lab).as_dict()
                except Exception as exc:  # a scenario that breaks is a row too: that is the finding
                    traceback.print_exc()
                    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    result = {"fault": name, "error": f"{type(exc).__name__}: {first}"[:300]}
                finally:
                    workers.stop()
                result["scenario"] = name
                result["wall_s"] = round(time.monotonic() - started, 1)
                rows.append(result)
                print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)

    summary = {
        "rows": rows,
        "lost": sum(r.get("lost", 0) for r in rows),
        "executed_twice": sum(r.get("executed_twice", 0) for r in rows),
        "broken": [r["scenario"] for r in rows if "error" in r or not r["finished"]],
        "cpus": os.cpu_count(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faults.json").write_text(json.dumps(summary, indent=2))
    print(
        "| fault | items submitted | succeeded | failed (reason) | lost | completed items executed twice "
        "| time to recover (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['fault']} | — | — | — | — | — | did not finish: {r['error']} |")
            continue
        recover = cell(r["recover_s"]) if r["finished"] else "never: the job did not finish"
        print(
            f"| {r['fault']} | {r['submitted']} | {r['succeeded']} | {cell(r['failed'])} | {r['lost']} "
            f"| {r['executed_twice']} | {recover} |"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
