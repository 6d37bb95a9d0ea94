"""The job spec (job.yaml) and one manifest item, as the user writes them.

Precedence of a per-item parameter: the item's own value, then the stage's, then the job's
`defaults`, then the built-in default below. `resolve_*` in this module is the one place it lives.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

# Item ids become storage key segments, so they are restricted to a portable, traversal-free
# alphabet rather than escaped: what the user sees in results.jsonl is the key they get.
ITEM_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
JOB_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
IMAGE_URI_SCHEMES = ("file://", "s3://", "http://", "https://")

BUILTIN_STRENGTH = 0.8
BUILTIN_GUIDANCE_SCALE = 7.5
BUILTIN_STEPS = 50
BUILTIN_SIZE = (512, 512)
MAX_SIDE = 4096


def _check_item_id(value: str) -> str:
    if not ITEM_ID_PATTERN.match(value) or ".." in value:
        raise ValueError(
            "must be 1-128 characters of letters, digits, '.', '_' or '-', start with a letter or digit, "
            "and not contain '..'"
        )
    return value


def _check_image_uri(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if "\x00" in value:
        raise ValueError("must not contain NUL")
    if "://" in value and not value.startswith(IMAGE_URI_SCHEMES):
        raise ValueError(f"unsupported scheme in {value!r}; use a local path, {', '.join(IMAGE_URI_SCHEMES)}")
    if value.startswith("s3://") and "/" not in value[len("s3://") :].strip("/"):
        raise ValueError("s3:// URI needs a bucket and a key")
    return value


def _parse_size(value: object) -> object:
    """Accept "512x512" as well as [512, 512], since CSV manifests carry strings."""
    if isinstance(value, str):
        width, sep, height = value.lower().partition("x")
        if not sep or not width.strip().isdigit() or not height.strip().isdigit():
            raise ValueError(f"size must look like 512x512 or [512, 512], got {value!r}")
        return (int(width), int(height))
    return value


def _check_size(value: tuple[int, int]) -> tuple[int, int]:
    width, height = value
    for side in (width, height):
        if side % 8 or not 8 <= side <= MAX_SIDE:
            raise ValueError(f"width and height must be multiples of 8 between 8 and {MAX_SIDE}, got {value}")
    return value


ItemId = Annotated[str, AfterValidator(_check_item_id)]
ImageUri = Annotated[str, AfterValidator(_check_image_uri)]
Size = Annotated[tuple[int, int], BeforeValidator(_parse_size), AfterValidator(_check_size)]
Strength = Annotated[float, Field(gt=0.0, le=1.0)]
GuidanceScale = Annotated[float, Field(ge=0.0, le=50.0)]
Steps = Annotated[int, Field(ge=1, le=1000)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Defaults(_Strict):
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: Seed | None = None
    size: Size | None = None
    strength: Strength | None = None
    guidance_scale: GuidanceScale | None = None
    steps: Steps | None = None


class Img2ImgStage(_Strict):
    type: Literal["img2img"]
    model: str = Field(min_length=1)
    strength: Strength | None = None
    guidance_scale: GuidanceScale | None = None
    steps: Steps | None = None
    negative_prompt: str | None = None


StageSpec = Img2ImgStage


def _check_job_name(value: str) -> str:
    if not JOB_NAME_PATTERN.match(value):
        raise ValueError("must be 1-63 lowercase letters, digits or '-', starting with a letter or digit")
    return value


def _check_output(value: str) -> str:
    if "://" in value and not value.startswith(("s3://", "file://")):
        raise ValueError("must be a local directory, file:// or s3://bucket/prefix")
    if value.startswith("s3://") and not value[len("s3://") :].strip("/"):
        raise ValueError("s3:// output needs a bucket")
    return value


class JobSpec(_Strict):
    version: Literal[1]
    name: Annotated[str, AfterValidator(_check_job_name)]
    output: Annotated[str, Field(min_length=1), AfterValidator(_check_output)]
    items: str = Field(min_length=1)
    defaults: Defaults = Defaults()
    stages: list[StageSpec] = Field(min_length=1, max_length=1)


class Item(_Strict):
    id: ItemId
    image: ImageUri
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: Seed | None = None
    size: Size | None = None
    strength: Strength | None = None
    guidance_scale: GuidanceScale | None = None
    steps: Steps | None = None


T = TypeVar("T")


def _first(*values: T | None, fallback: T) -> T:
    for value in values:
        if value is not None:
            return value
    return fallback


class ResolvedParams(_Strict):
    """Everything that must be equal for items to share one batched pipeline call."""

    strength: Strength
    guidance_scale: GuidanceScale
    steps: Steps
    size: Size

    @model_validator(mode="after")
    def _at_least_one_step(self) -> ResolvedParams:
        # diffusers runs int(steps * strength) denoising steps and fails when that is zero.
        if int(self.steps * self.strength) < 1:
            raise ValueError(
                f"steps x strength must give at least one denoising step (steps={self.steps}, "
                f"strength={self.strength})"
            )
        return self


def resolve_params(item: Item, stage: StageSpec, defaults: Defaults) -> ResolvedParams:
    return ResolvedParams(
        strength=_first(item.strength, stage.strength, defaults.strength, fallback=BUILTIN_STRENGTH),
        guidance_scale=_first(
            item.guidance_scale,
            stage.guidance_scale,
            defaults.guidance_scale,
            fallback=BUILTIN_GUIDANCE_SCALE,
        ),
        steps=_first(item.steps, stage.steps, defaults.steps, fallback=BUILTIN_STEPS),
        size=_first(item.size, defaults.size, fallback=BUILTIN_SIZE),
    )


def resolve_prompt(item: Item, defaults: Defaults) -> str:
    return _first(item.prompt, defaults.prompt, fallback="")


def resolve_negative_prompt(item: Item, stage: StageSpec, defaults: Defaults) -> str | None:
    return _first(item.negative_prompt, stage.negative_prompt, defaults.negative_prompt, fallback=None)


def resolve_seed(item: Item, defaults: Defaults) -> int:
    return _first(item.seed, defaults.seed, fallback=0)
