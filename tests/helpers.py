"""Small builders for job files in tests."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import TypeAdapter

from schemas.job import StageSpec, stage_name
from schemas.messages import StagePlan
from schemas.registry import ModelEntry, ResolvedModel


def write_image(
    path: Path, size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (120, 30, 200)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    for x in range(size[0]):
        image.putpixel((x, x % size[1]), (255, 255, 255))
    image.save(path)
    return path


def write_job(
    folder: Path,
    items: Sequence[Mapping[str, object]],
    *,
    model: str = "tiny-sd",
    output: str = "out",
    stage: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    name: str = "test-job",
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "items.jsonl").open("w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item) + "\n")
    spec = {
        "version": 1,
        "name": name,
        "output": output,
        "items": "items.jsonl",
        "defaults": defaults if defaults is not None else {"size": [32, 32], "negative_prompt": "blurry"},
        "stages": [
            stage or {"type": "img2img", "model": model, "strength": 0.75, "guidance_scale": 7.5, "steps": 4}
        ],
    }
    path = folder / "job.json"
    path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return path


def stage_plan(
    stage: Mapping[str, object],
    model: ResolvedModel,
    *,
    index: int = 0,
    handover: str = "none",
    save: tuple[str, ...] = ("image",),
    controlnet: ResolvedModel | None = None,
    depth_model: ResolvedModel | None = None,
) -> StagePlan:
    spec = TypeAdapter(StageSpec).validate_python({"model": model.name, **stage})
    return StagePlan.model_validate(
        {
            "index": index,
            "name": stage_name(index, spec),
            "spec": spec,
            "model": model,
            "handover": handover,
            "save": save,
            "controlnet": controlnet,
            "depth_model": depth_model,
        }
    )


def local_model(name: str, folder: Path, **entry: object) -> ResolvedModel:
    return ResolvedModel(
        name=name, entry=ModelEntry.model_validate({"source": str(folder), "dtype": "float32", **entry})
    )
