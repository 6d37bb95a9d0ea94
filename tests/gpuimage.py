"""The device machines' image, simulated here: a site folder that holds only the distributions the
image has (bench/gpu_image_packages.txt) and those carried to it as wheels (bench/gpu_wheels.txt),
each linked from this environment's site-packages, for `python -S` to run against. A module that the
GPU run would miss is then missing here too, with nothing fetched.

It checks presence, not versions: this environment's torch and transformers stand in for the image's
(2.11 and 5.17 there), and its versions may need what the image's do not: huggingface-hub 2 needs
httpx2 where the image's 1.33 needs httpx. So the image's packages come with what they require
here, except what the project itself needs beyond the image (its dependencies and theirs, up to an
image package): that must come as a carried wheel, and is what a run against this site finds
missing. typer here requires pydantic, for one, which the image has not.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sysconfig
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
IMAGE_PACKAGES = ROOT / "bench" / "gpu_image_packages.txt"
CARRIED_WHEELS = ROOT / "bench" / "gpu_wheels.txt"


def canonical(name: str) -> str:
    """A distribution's name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def image_packages() -> set[str]:
    return {canonical(line) for line in _lines(IMAGE_PACKAGES)}


def carried_wheels() -> dict[str, str]:
    """name -> version, as pinned in bench/gpu_wheels.txt (`name==version` lines)."""
    pins: dict[str, str] = {}
    for line in _lines(CARRIED_WHEELS):
        name, separator, version = line.partition("==")
        if not separator or not version.strip():
            raise ValueError(f"{CARRIED_WHEELS.name}: {line!r} is not name==version")
        pins[canonical(name)] = version.strip()
    return pins


def installed() -> dict[str, importlib.metadata.Distribution]:
    """This environment's distributions, by canonical name."""
    site = sysconfig.get_paths()["purelib"]
    return {canonical(dist.metadata["Name"]): dist for dist in importlib.metadata.distributions(path=[site])}


def requirement_names(lines: list[str]) -> list[str]:
    """The names of the requirements that apply here (extras and other platforms' left out)."""
    names = []
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.append(canonical(requirement.name))
    return names


def with_requirements(names: set[str], stop: frozenset[str] = frozenset()) -> set[str]:
    """`names` and, transitively, what each requires here; the requirements of a name in `stop` are
    not followed."""
    found = installed()
    todo, closed = sorted(names), set(names)
    while todo:
        name = todo.pop()
        dist = found.get(name)
        if dist is None or name in stop:
            continue
        for needed in requirement_names(dist.requires or []):
            if needed not in closed:
                closed.add(needed)
                todo.append(needed)
    return closed


def project_needs() -> set[str]:
    """What the project needs beyond the image: its dependencies and theirs, up to image packages."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    image = frozenset(image_packages())
    return with_requirements(set(requirement_names(project["dependencies"])), stop=image) - image


def simulated_names() -> set[str]:
    """What the simulated image holds: its packages with what they require here (less what the project
    needs beyond the image), and the carried wheels."""
    image = image_packages()
    return image | (with_requirements(image) - project_needs()) | carried_wheels().keys()


def build_site(folder: Path, names: set[str]) -> list[str]:
    """Link into `folder` every top-level module, package and .dist-info folder of the distributions
    `names` that this environment has; returns the names it does not have (the image may hold
    packages the project never installs)."""
    folder.mkdir(parents=True, exist_ok=True)
    found = installed()
    for name in sorted(names & found.keys()):
        dist = found[name]
        base = Path(str(dist.locate_file("")))
        tops = {path.parts[0] for path in dist.files or ()}
        # `..` leads out of site-packages (console scripts); a top-level __pycache__ is shared.
        for top in sorted(tops - {"..", "__pycache__"}):
            link = folder / top
            if not link.exists() and (base / top).exists():
                link.symlink_to(base / top)
    return sorted(names - found.keys())


def simulated_env(site: Path) -> dict[str, str]:
    """The environment for `python -S`: the site folder and the repository on the path, nothing else."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    env["PYTHONNOUSERSITE"] = "1"
    return env
