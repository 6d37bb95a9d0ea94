"""The job spec (job.yaml) and one manifest item, as the user writes them.

Precedence of a per-item parameter: the item's own value, then the stage's, then the job's
`defaults`, then the built-in default below. `resolve_*` in this module is the one place it lives.
"""

from __future__ import annotations

import operator
import re
import string
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from schemas.registry import LoraRef, duplicate_source

# Item ids become storage key segments, so they are restricted to a portable, traversal-free
# alphabet rather than escaped: what the user sees in results.jsonl is the key they get.
# \Z, not $: $ also matches before a final newline.
ITEM_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
JOB_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")
IMAGE_URI_SCHEMES = ("file://", "s3://", "http://", "https://")

BUILTIN_STRENGTH = 0.8
BUILTIN_GUIDANCE_SCALE = 7.5
BUILTIN_STEPS = 50
BUILTIN_SIZE = (512, 512)
MAX_SIDE = 4096


# Names the job itself uses at the top of its output prefix.
RESERVED_ITEM_IDS = frozenset({"results.jsonl", "report.html", "dataset"})


def _check_item_id(value: str) -> str:
    if not ITEM_ID_PATTERN.match(value) or ".." in value:
        raise ValueError(
            "must be 1-128 characters of letters, digits, '.', '_' or '-', start with a letter or digit, "
            "and not contain '..'"
        )
    if value in RESERVED_ITEM_IDS:
        raise ValueError(
            f"{value!r} is reserved for the job's own files ({', '.join(sorted(RESERVED_ITEM_IDS))})"
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

# How an input is brought to the target size:
# - crop: scale to cover the size, then center-crop (the built-in default, so outputs made before the
#   choice existed stay the same);
# - fit: resize to exactly the size; the aspect ratio is not kept (stretch);
# - pad: scale to fit inside the size keeping the aspect ratio, then pad centrally with black.
ResizePolicy = Literal["crop", "fit", "pad"]
BUILTIN_RESIZE: ResizePolicy = "crop"
RESIZE_DESCRIPTION = "crop (cover, then center-crop), fit (stretch) or pad (fit inside, pad with black)"


def without_none(data: dict[str, Any], key: str) -> dict[str, Any]:
    """A model's serialized fields without `key` where it is None: for fields added later that most
    objects leave unset, whose JSON (and what is digested or read from it) then stays as it was."""
    if key in data and data[key] is None:
        del data[key]
    return data


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
    resize: ResizePolicy | None = Field(
        None, description=f"how inputs reach the size: {RESIZE_DESCRIPTION}; default crop"
    )


def _check_prompt_template(value: str) -> str:
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    except ValueError as exc:
        raise ValueError(f"not a valid template: {exc}") from None
    if fields - {"prompt"}:
        raise ValueError(f"only {{prompt}} may be used, found {sorted(fields - {'prompt'})}")
    return value


PromptTemplate = Annotated[str, AfterValidator(_check_prompt_template)]
SaveKind = Literal["image", "latent"]
MAX_REROLLS = 8


class Reroll(_Strict):
    """Run an item whose output scored below a gate again, with its seed + 1, + 2, ... up to `reroll`
    more times (stopping at the first that passes), and keep the best-scoring output."""

    reroll: int = Field(ge=1, le=MAX_REROLLS, description="most extra runs of an item below a gate")


class ScoreSpec(_Strict):
    """Score each output of the stage on the worker that made it, and gate on the scores."""

    model: str = Field(
        min_length=1, description="registry name of a CLIP checkpoint (transformers CLIPModel)"
    )
    min_clip_score: float | None = Field(
        None, ge=0.0, le=100.0, description="CLIP score of output and prompt, 100 x max(cosine, 0)"
    )
    min_input_similarity: float | None = Field(
        None, ge=-1.0, le=1.0, description="cosine of the CLIP image embeddings of output and input"
    )
    on_low_score: Literal["flag", "fail"] | Reroll = Field(
        "flag",
        description="below a gate: flag (keep, marked), fail (LowScoreError) or {reroll: N} (the best of "
        "up to N more seeds, flagged if still below)",
    )

    @model_validator(mode="after")
    def _gate_needs_a_threshold(self) -> ScoreSpec:
        if self.on_low_score != "flag" and not self.gated:
            raise ValueError("on_low_score: fail and reroll need min_clip_score or min_input_similarity")
        return self

    @property
    def gated(self) -> bool:
        return self.min_clip_score is not None or self.min_input_similarity is not None

    @property
    def rerolls(self) -> int:
        """The most extra runs of one item: N of `{reroll: N}`, else 0."""
        return self.on_low_score.reroll if isinstance(self.on_low_score, Reroll) else 0


class _Stage(_Strict):
    model: str = Field(min_length=1, description="registry name or a diffusers folder")
    prompt_template: PromptTemplate = Field("{prompt}", description='e.g. "{prompt}, charliebo artstyle"')
    prompt_syntax: Literal["plain", "compel"] = Field(
        "plain", description="compel: weighting like (cat)1.3, jungle--"
    )
    negative_prompt: str | None = None
    guidance_scale: GuidanceScale | None = None
    steps: Steps | None = None
    save: tuple[SaveKind, ...] | None = Field(
        None, description="outputs to keep; default: the image for the last stage, nothing for the others"
    )
    handover: Literal["auto", "image", "latent"] = Field(
        "auto", description="how the output reaches the next stage; auto: latents when the models share a VAE"
    )
    loras: tuple[LoraRef, ...] = Field(
        (),
        description="LoRA adapters for this stage, added to its model's (a source the model lists too "
        "takes this weight)",
    )
    score: ScoreSpec | None = Field(
        None, description="CLIP score, input similarity and a perceptual hash of each output; gates"
    )

    @model_serializer(mode="wrap")
    def _score_only_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A job's id digests its spec as JSON: a stage that scores nothing keeps the JSON it had before
        # stages could score, so the ids of such jobs stay as they were.
        return without_none(handler(self), "score")

    @model_validator(mode="after")
    def _distinct_loras(self) -> _Stage:
        repeated = duplicate_source(self.loras)
        if repeated is not None:
            raise ValueError(f"loras: {repeated} is listed twice")
        return self


class Img2ImgStage(_Stage):
    type: Literal["img2img"]
    strength: Strength | None = None
    controlnet: str | None = Field(
        None, description="registry name of a ControlNetModel for this SD 1.x model"
    )
    controlnet_conditioning_scale: float = Field(1.0, ge=0.0, le=2.0)
    control: Literal["depth"] | None = Field(
        None, description="compute the control image from the input when an item has no control_image"
    )
    depth_model: str | None = Field(
        None, description="registry name of a transformers depth-estimation model"
    )
    aesthetic_score: float | None = Field(None, ge=0.0, le=10.0, description="SDXL refiner only")
    negative_aesthetic_score: float | None = Field(None, ge=0.0, le=10.0, description="SDXL refiner only")

    @model_validator(mode="after")
    def _check_control(self) -> Img2ImgStage:
        if self.control and not self.controlnet:
            raise ValueError("control needs a controlnet")
        if self.control == "depth" and not self.depth_model:
            raise ValueError("control: depth needs depth_model, a depth-estimation model")
        return self


class Text2ImgStage(_Stage):
    type: Literal["text2img"]


class UpscaleStage(_Stage):
    """The x2 latent upscaler or the x4 upscaler, as the model's pipeline says."""

    type: Literal["upscale"]
    noise_level: int | None = Field(
        None, ge=0, le=350, description="x4 upscaler: noise added to the low-res image"
    )

    @model_validator(mode="after")
    def _plain_prompts(self) -> UpscaleStage:
        if self.prompt_syntax != "plain":
            raise ValueError(
                "upscalers take plain prompts; prompt_syntax: compel is for img2img and text2img"
            )
        return self


class ResizeStage(_Strict):
    """CPU only: fit the input to a size and re-encode it. For preparing datasets, and it measures
    imgjobs' own overhead, since it costs next to nothing."""

    type: Literal["resize"]
    model: Literal["cpu"] = Field("cpu", description="resize runs on `imgjobs worker --model cpu`")
    size: Size | None = Field(None, description="default: the item's or the job's size")
    resize: ResizePolicy | None = Field(
        None, description=f"{RESIZE_DESCRIPTION}; default: the item's or the job's policy"
    )
    format: Literal["png", "jpeg", "webp"] = "png"
    quality: int = Field(90, ge=1, le=100, description="jpeg and webp")
    save: tuple[Literal["image"], ...] | None = None
    handover: Literal["auto", "image"] = "auto"


StageSpec = Annotated[Img2ImgStage | Text2ImgStage | UpscaleStage | ResizeStage, Field(discriminator="type")]


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


MAX_STAGES = 8

Priority = Literal["low", "normal", "high"]


class JobSpec(_Strict):
    version: Literal[1]
    name: Annotated[str, AfterValidator(_check_job_name)]
    output: Annotated[str, Field(min_length=1), AfterValidator(_check_output)]
    items: str = Field(min_length=1)
    defaults: Defaults = Defaults()
    stages: list[StageSpec] = Field(min_length=1, max_length=MAX_STAGES)
    dataset: bool = Field(
        False,
        description="also write dataset/{id}.png and dataset/metadata.jsonl: a Hugging Face imagefolder",
    )
    priority: Priority = Field(
        "normal", description="workers of a model take a high job's chunks before normal, normal before low"
    )


class Item(_Strict):
    id: ItemId
    image: ImageUri | None = Field(None, description="required unless the first stage is text2img")
    control_image: ImageUri | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: Seed | None = None
    size: Size | None = None
    strength: Strength | None = None
    guidance_scale: GuidanceScale | None = None
    steps: Steps | None = None
    noise_level: int | None = Field(None, ge=0, le=350)
    resize: ResizePolicy | None = None


T = TypeVar("T")


def _first(*values: T | None, fallback: T) -> T:
    for value in values:
        if value is not None:
            return value
    return fallback


class ResolvedParams(_Strict):
    """One stage's parameters for one item: items share a batched call only when these are equal.
    `size` is the size inputs are fitted to (first stage) or generated at (text2img); `resize` is how
    they are fitted to it (first stage and resize stages; later stages take their input as it is)."""

    size: Size
    resize: ResizePolicy = BUILTIN_RESIZE
    guidance_scale: GuidanceScale | None = None
    steps: Steps | None = None
    strength: Strength | None = None
    noise_level: int | None = None

    @model_validator(mode="after")
    def _at_least_one_step(self) -> ResolvedParams:
        # diffusers runs int(steps * strength) denoising steps and fails when that is zero.
        if self.strength is not None and self.steps is not None and int(self.steps * self.strength) < 1:
            raise ValueError(
                f"steps x strength must give at least one denoising step (steps={self.steps}, "
                f"strength={self.strength})"
            )
        return self


# The item fields that override a stage's parameters (by the same name): items equal in these resolve
# alike at every stage, which lets callers resolve once per distinct set rather than once per item.
PARAM_OVERRIDES = tuple(name for name in ResolvedParams.model_fields if name in Item.model_fields)
overrides_of = operator.attrgetter(*PARAM_OVERRIDES)  # a tuple of those, built in C


BUILTIN_UPSCALE_STEPS = 75
BUILTIN_UPSCALE_GUIDANCE_SCALE = 9.0
BUILTIN_NOISE_LEVEL = 20


# The item fields `imgjobs retry --set` may change: what a stage runs with, not what it reads.
RETRY_SETTABLE = (
    "prompt",
    "negative_prompt",
    "seed",
    "size",
    "strength",
    "guidance_scale",
    "steps",
    "noise_level",
    "resize",
)


def with_overrides(item: Item, overrides: Mapping[str, Any]) -> Item:
    """The item with fields `retry --set` changed, validated as a manifest row is."""
    return Item.model_validate({**item.model_dump(mode="json", exclude_none=True), **overrides})


def resolve_params(item: Item, stage: StageSpec, defaults: Defaults) -> ResolvedParams:
    """Item, then stage, then job defaults, then built-in defaults; an item's override applies to
    every stage that takes the parameter. Only resize stages have their own `size` and `resize`."""
    if isinstance(stage, ResizeStage):
        return ResolvedParams(
            size=_first(item.size, stage.size, defaults.size, fallback=BUILTIN_SIZE),
            resize=_first(item.resize, stage.resize, defaults.resize, fallback=BUILTIN_RESIZE),
        )
    upscale = isinstance(stage, UpscaleStage)
    return ResolvedParams(
        resize=_first(item.resize, defaults.resize, fallback=BUILTIN_RESIZE),
        guidance_scale=_first(
            item.guidance_scale,
            stage.guidance_scale,
            defaults.guidance_scale,
            fallback=BUILTIN_UPSCALE_GUIDANCE_SCALE if upscale else BUILTIN_GUIDANCE_SCALE,
        ),
        steps=_first(
            item.steps,
            stage.steps,
            defaults.steps,
            fallback=BUILTIN_UPSCALE_STEPS if upscale else BUILTIN_STEPS,
        ),
        size=_first(item.size, defaults.size, fallback=BUILTIN_SIZE),
        strength=(
            _first(item.strength, stage.strength, defaults.strength, fallback=BUILTIN_STRENGTH)
            if isinstance(stage, Img2ImgStage)
            else None
        ),
        noise_level=(
            _first(item.noise_level, stage.noise_level, fallback=BUILTIN_NOISE_LEVEL)
            if isinstance(stage, UpscaleStage)
            else None
        ),
    )


def base_prompt(item: Item, defaults: Defaults) -> str:
    return _first(item.prompt, defaults.prompt, fallback="")


def resolve_prompt(item: Item, stage: StageSpec, defaults: Defaults) -> str:
    template = "{prompt}" if isinstance(stage, ResizeStage) else stage.prompt_template
    return template.format(prompt=base_prompt(item, defaults))


def resolve_negative_prompt(item: Item, stage: StageSpec, defaults: Defaults) -> str | None:
    own = None if isinstance(stage, ResizeStage) else stage.negative_prompt
    return _first(item.negative_prompt, own, defaults.negative_prompt, fallback=None)


def resolve_seed(item: Item, defaults: Defaults) -> int:
    return _first(item.seed, defaults.seed, fallback=0)


def denoising_steps(params: ResolvedParams) -> int:
    """The denoising steps a pipeline runs for an item: an img2img stage skips the first
    (1 - strength) of its schedule, as diffusers does; a resize stage runs none."""
    if params.steps is None:
        return 0
    if params.strength is None:
        return params.steps
    return min(int(params.steps * params.strength), params.steps)


def stage_name(index: int, stage: StageSpec) -> str:
    """The name of a stage's outputs: s0-img2img, s1-upscale, ..."""
    return f"s{index}-{stage.type}"
