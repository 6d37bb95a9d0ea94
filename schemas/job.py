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
    JsonValue,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from schemas.prompts import control_character_problem
from schemas.registry import LoraRef, duplicate_source
from schemas.samplers import (
    PRESETS,
    SAMPLERS,
    SamplerChoice,
    SamplerName,
    Schedule,
    ScheduleName,
    choose,
    preset_names,
    preset_problem,
    run_problem,
    sampler_of_class,
    unet_evaluations,
)
from schemas.samplers import denoising_steps as samplers_denoising_steps

# Item ids become storage key segments, so they are restricted to a portable, traversal-free
# alphabet rather than escaped: what the user sees in results.jsonl is the key they get.
# \Z, not $: $ also matches before a final newline.
ITEM_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
JOB_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")
# A job id is its name, '-' and a hash (jobs/manifest.py): the name's alphabet, so that no id names a
# path (it is a folder of the state folder and a prefix of the output).
JOB_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,99}\Z")
JOB_HASH_CHARS = 12  # hex digits of the hash of the job's spec and items
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


def _check_text(value: str) -> str:
    problem = control_character_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


ItemId = Annotated[str, AfterValidator(_check_item_id)]
# A prompt, negative prompt or template: text that reaches logs, results and the report as it is.
PromptText = Annotated[str, AfterValidator(_check_text)]
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


def without_none(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    """A model's serialized fields without those of `keys` that are None: for fields added later that
    most objects leave unset, whose JSON (and what is digested or read from it) then stays as it was."""
    for key in keys:
        if key in data and data[key] is None:
            del data[key]
    return data


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Defaults(_Strict):
    prompt: PromptText | None = None
    negative_prompt: PromptText | None = None
    seed: Seed | None = None
    size: Size | None = None
    strength: Strength | None = None
    guidance_scale: GuidanceScale | None = None
    steps: Steps | None = None
    resize: ResizePolicy | None = Field(
        None, description=f"how inputs reach the size: {RESIZE_DESCRIPTION}; default crop"
    )


def _check_prompt_template(value: str) -> str:
    _check_text(value)
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    except ValueError as exc:
        raise ValueError(f"not a valid template: {exc}") from None
    if fields - {"prompt"}:
        raise ValueError(f"only {{prompt}} may be used, found {sorted(fields - {'prompt'})}")
    return value


PromptTemplate = Annotated[str, AfterValidator(_check_prompt_template)]
DEFAULT_PROMPT_TEMPLATE = "{prompt}"
SaveKind = Literal["image", "latent"]
# What a stage's call returns: its images, its latents, or both. Most calls want images only; a stage
# whose latents are handed over to the next model wants latents, and decodes images only if saved too.
Outputs = frozenset[SaveKind]
IMAGES: Outputs = frozenset({"image"})
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


def _check_preset(value: str) -> str:
    if value not in PRESETS:
        raise ValueError(f"unknown preset {value!r}; presets: {preset_names()}")
    return value


PresetName = Annotated[str, AfterValidator(_check_preset)]
Eta = Annotated[float, Field(ge=0.0, le=1.0)]
SAMPLING_FIELDS = ("sampler", "schedule", "preset", "preset_lora", "eta")


class _Stage(_Strict):
    model: str = Field(min_length=1, description="registry name or a diffusers folder")
    prompt_template: PromptTemplate = Field(
        DEFAULT_PROMPT_TEMPLATE, description='e.g. "{prompt}, charliebo artstyle"'
    )
    prompt_syntax: Literal["plain", "compel"] = Field(
        "plain", description="compel: weighting like (cat)1.3, jungle--"
    )
    negative_prompt: PromptText | None = None
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
    sampler: SamplerName | None = Field(
        None,
        description="the scheduler the stage runs, by its imgjobs, A1111, ComfyUI, InvokeAI or diffusers "
        "name (README, Samplers); default: its model's, else the checkpoint's own",
    )
    schedule: ScheduleName | None = Field(
        None, description="karras, exponential or trailing (sgm_uniform); default: the checkpoint's spacing"
    )
    preset: PresetName | None = Field(
        None, description="a few-step preset: adapter, sampler, steps and guidance together (lcm, tcd, ...)"
    )
    preset_lora: LoraRef | Literal[False] | None = Field(
        None,
        description="the preset's adapter instead of the one it publishes for the model's family; "
        "false: none (a checkpoint distilled already)",
    )
    eta: Eta | None = Field(None, description="the noise a DDIM or TCD step adds back (tcd's preset: 0.3)")
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

    @model_validator(mode="after")
    def _check_sampling(self) -> _Stage:
        """What the stage alone says about its sampler; what its model adds is checked when the job
        is planned (jobs/recipe.py)."""
        if self.preset is None:
            if self.preset_lora is not None:
                raise ValueError("preset_lora: it replaces a preset's adapter; set preset too")
            if self.sampler is not None:
                problem = eta_problem(choose(self.sampler, self.schedule), self.eta)
                if problem:
                    raise ValueError(problem)
            return self
        preset = PRESETS[self.preset]
        for field in ("sampler", "schedule"):
            if getattr(self, field) is not None:
                raise ValueError(
                    f"{field}: preset {preset.name} runs {preset.sampler}"
                    f"{f' with the {preset.schedule} schedule' if preset.schedule else ''}; leave {field} out"
                )
        problem = preset_problem(preset, self.steps, self.guidance_scale) or eta_problem(
            choose(preset.sampler, preset.schedule), self.eta
        )
        if problem:
            raise ValueError(problem)
        return self


def eta_problem(choice: SamplerChoice | None, eta: float | None) -> str | None:
    if eta is None or (choice is not None and choice.sampler.takes_eta):
        return None
    takes = ", ".join(row.name for row in SAMPLERS.values() if row.takes_eta)
    named = f"{choice.sampler.name} takes none" if choice else "name a sampler that takes it"
    return f"eta: {named} ({takes} do)"


def stage_choice(stage: StageSpec) -> SamplerChoice | None:
    """The sampler a planned stage runs: its preset's, else its own (its model's, filled in when the
    job is planned); None: the checkpoint's own scheduler."""
    if isinstance(stage, ResizeStage):
        return None
    if stage.preset is not None:
        preset = PRESETS[stage.preset]
        return choose(preset.sampler, preset.schedule)
    if stage.sampler is None:
        return None
    return choose(stage.sampler, stage.schedule)


def stage_eta(stage: StageSpec) -> float | None:
    """The eta a stage passes to its pipeline: its own, else its preset's; None leaves diffusers'."""
    if isinstance(stage, ResizeStage):
        return None
    if stage.eta is not None:
        return stage.eta
    return PRESETS[stage.preset].eta if stage.preset is not None else None


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
        for field in SAMPLING_FIELDS:
            if getattr(self, field) is not None:
                raise ValueError(f"{field}: upscalers run their checkpoint's own scheduler")
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

# How a job writes its final images: one object per item (files), or shards of a fixed range of items
# each, in WebDataset tars or Parquet files (workers/shard_sink.py).
OutputFormat = Literal["files", "webdataset", "parquet"]
SHARD_FORMATS = ("webdataset", "parquet")
DEFAULT_SHARD_SIZE = 1024
MAX_SHARD_SIZE = 100_000


class SampleFields(_Strict):
    """Where the samples of WebDataset or Parquet input shards keep their parts (jobs/shards.py)."""

    image: str | None = Field(
        None,
        description="tar: the image member's extensions, first found wins (default jpg;jpeg;png;webp); "
        "Parquet: the image column (default: image, else the first column of image bytes)",
    )
    caption: str | None = Field(
        None,
        description="what becomes the prompt: tar: a member's extension (default txt) or json.FIELD; "
        "Parquet: a column (default: caption, else text)",
    )
    key: str | None = Field(
        None, description="Parquet: the column of sample keys (default: key, else __key__, else id)"
    )


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
    samples: SampleFields = Field(
        SampleFields(), description="with WebDataset or Parquet input shards: where samples keep their parts"
    )
    output_format: OutputFormat = Field(
        "files", description="files: an object per output; webdataset or parquet: shards of shard_size items"
    )
    shard_size: int | None = Field(
        None,
        ge=1,
        le=MAX_SHARD_SIZE,
        description=f"items per output shard, and per chunk (default {DEFAULT_SHARD_SIZE})",
    )

    @model_validator(mode="after")
    def _one_output_layout(self) -> JobSpec:
        if self.output_format != "files" and self.dataset:
            raise ValueError("dataset: true writes an imagefolder; with output_format shards, leave it out")
        if self.shard_size is not None and self.output_format == "files":
            raise ValueError("shard_size is for output_format webdataset or parquet")
        return self

    @property
    def sharded(self) -> bool:
        return self.output_format in SHARD_FORMATS


class Sample(_Strict):
    """Where an item's input lies inside an input shard, as indexed at submit: a tar member's bytes
    (offset, size) or a Parquet row (row group, row, column). Workers read it with ranged reads."""

    shard: str = Field(description="the shard's URI: s3://... or an absolute local path")
    member: str = Field(description="tar: the image member's name; Parquet: the image column")
    offset: int | None = Field(None, ge=0, description="tar: where the member's bytes start")
    size: int | None = Field(None, ge=0, description="tar: the member's size in bytes")
    row_group: int | None = Field(None, ge=0, description="Parquet: the row group")
    row: int | None = Field(None, ge=0, description="Parquet: the row within its row group")
    version: str | None = Field(None, description="the shard's ETag (S3) or size and mtime when indexed")
    error: str | None = Field(None, description="why the shard could not be indexed whole: the item fails")


# What a stage (or its model's entry) chooses for all its items: a chunk runs one sampler.
STAGE_ONLY_FIELDS = ("sampler", "schedule", "preset", "preset_lora", "eta")


class Item(_Strict):
    id: ItemId
    image: ImageUri | None = Field(None, description="required unless the first stage is text2img")
    control_image: ImageUri | None = None
    prompt: PromptText | None = None
    negative_prompt: PromptText | None = None
    seed: Seed | None = None
    size: Size | None = None
    strength: Strength | None = None
    guidance_scale: GuidanceScale | None = None
    steps: Steps | None = None
    noise_level: int | None = Field(None, ge=0, le=350)
    resize: ResizePolicy | None = None
    sample: Sample | None = Field(None, description="set for items read from input shards")
    key: str | None = Field(None, description="the sample's own key, where the id had to be derived from it")
    metadata: dict[str, JsonValue] | None = Field(
        None, description="a sample's other fields, carried to the output shard"
    )


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
    sampler: str | None = Field(None, description="the sampler chosen (SAMPLERS); None: the checkpoint's own")
    schedule: Schedule | None = None
    preset: str | None = Field(None, description="the stage's few-step preset (PRESETS)")

    @model_validator(mode="after")
    def _at_least_one_step(self) -> ResolvedParams:
        # diffusers runs int(steps * strength) denoising steps and fails when that is zero.
        if self.strength is not None and self.steps is not None and int(self.steps * self.strength) < 1:
            raise ValueError(
                f"steps x strength must give at least one denoising step (steps={self.steps}, "
                f"strength={self.strength})"
            )
        return self

    @model_validator(mode="after")
    def _sampler_can_run(self) -> ResolvedParams:
        # An item's steps and guidance may change what its stage's sampler or preset can do. The
        # checkpoint's own spacing is not known here: the worker checks it too (LoadedModel.use_sampler).
        if self.preset is not None:
            problem = preset_problem(PRESETS[self.preset], self.steps, self.guidance_scale)
            if problem:
                raise ValueError(problem)
        if self.sampler is not None and self.steps is not None:
            sampler = SAMPLERS[self.sampler]
            text2img = self.strength is None
            problem = run_problem(sampler, self.schedule, text2img, self.steps, self.strength)
            if problem:
                raise ValueError(f"{problem} ({sampler.name})")
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
    img2img = isinstance(stage, Img2ImgStage)
    # A preset's steps and guidance are the stage's own: they come before the job's defaults.
    preset = PRESETS[stage.preset] if stage.preset is not None else None
    choice = stage_choice(stage)
    return ResolvedParams(
        resize=_first(item.resize, defaults.resize, fallback=BUILTIN_RESIZE),
        guidance_scale=_first(
            item.guidance_scale,
            stage.guidance_scale,
            preset.guidance_scale if preset else None,
            defaults.guidance_scale,
            fallback=BUILTIN_UPSCALE_GUIDANCE_SCALE if upscale else BUILTIN_GUIDANCE_SCALE,
        ),
        steps=_first(
            item.steps,
            stage.steps,
            preset.steps_for(img2img) if preset else None,
            defaults.steps,
            fallback=BUILTIN_UPSCALE_STEPS if upscale else BUILTIN_STEPS,
        ),
        sampler=choice.sampler.name if choice else None,
        schedule=choice.schedule if choice else None,
        preset=stage.preset,
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
    template = DEFAULT_PROMPT_TEMPLATE if isinstance(stage, ResizeStage) else stage.prompt_template
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
    return samplers_denoising_steps(params.steps, params.strength)


def evaluations(params: ResolvedParams, checkpoint_scheduler: str | None = None) -> int:
    """What an item costs at a stage, in UNet evaluations: its sampler's (else the checkpoint's
    scheduler class's, where known) loop, doubled by classifier-free guidance."""
    sampler = SAMPLERS[params.sampler] if params.sampler else sampler_of_class(checkpoint_scheduler)
    return unet_evaluations(sampler, params.steps, params.strength, params.guidance_scale)


def stage_name(index: int, stage: StageSpec) -> str:
    """The name of a stage's outputs: s0-img2img, s1-upscale, ..."""
    return f"s{index}-{stage.type}"
