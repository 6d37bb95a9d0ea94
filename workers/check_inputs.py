"""`imgjobs validate --check-inputs` decodes every local input here, in an interpreter of its own so
that the producer never imports the workers' image code: each input as workers will decode it, with
the same limits (IMGJOBS_MAX_IMAGE_BYTES, IMGJOBS_MAX_IMAGE_PIXELS).

Reads LocalInput JSON lines (jobs/manifest.py) on stdin; writes one line for each input that cannot
be used, the same object with its `error`."""

from __future__ import annotations

import json
import sys

from schemas.errors import ConfigError, InputImageError, StorageError
from schemas.settings import Settings
from workers.imageio import decode_image, fetch_bytes


def main() -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for raw in sys.stdin:
        local = json.loads(raw)
        try:
            decode_image(fetch_bytes(local["path"], settings), local["path"], settings).close()
        except (InputImageError, StorageError) as exc:
            print(json.dumps({**local, "error": str(exc)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
