"""Planning a job's stages: which model each runs on, and how each stage's output reaches the next.

Latents are handed over only between models that declare the same VAE family and when the next
stage can take latents; otherwise the next stage reads the decoded image. The x4 upscaler
concatenates image channels to its latents, so it always gets an image.
"""

from __future__ import annotations

from pathlib import Path

from jobs.registry import Registry, is_clip_checkpoint, scorer_problem
from schemas.errors import ConfigError, Problem
from schemas.job import (
    Img2ImgStage,
    JobSpec,
    ResizeStage,
    SaveKind,
    StageSpec,
    Text2ImgStage,
    UpscaleStage,
    eta_problem,
    stage_choice,
    stage_name,
)
from schemas.messages import StagePlan
from schemas.registry import RESIZE_PIPELINE, UPSCALER_PIPELINES, X2_LATENT_UPSCALER, LoraRef, ResolvedModel
from schemas.samplers import (
    FAMILIES,
    PRESETS,
    choose,
    sampler_problem_for_pipeline,
    scheduler_problem,
)


def _takes_latents(stage: StageSpec, model: ResolvedModel) -> bool:
    pipeline = model.entry.pipeline or ""
    if isinstance(stage, Img2ImgStage):
        # ControlNet stages compute or read control images from pixels; Kandinsky's decoder takes images.
        return stage.controlnet is None and not pipeline.startswith("Kandinsky")
    if isinstance(stage, UpscaleStage):
        # Only the x2 latent upscaler takes latents; an upscaler of unknown class gets an image to be safe.
        return pipeline == X2_LATENT_UPSCALER
    return False


def _latent_problem(
    current: ResolvedModel, following: ResolvedModel, following_stage: StageSpec
) -> str | None:
    family, next_family = current.entry.vae_family, following.entry.vae_family
    if not family or family != next_family:
        return (
            f"latent handover needs models of one VAE family "
            f"({current.name}: {family}, {following.name}: {next_family})"
        )
    if not _takes_latents(following_stage, following):
        return f"the next stage ({following_stage.type} on {following.name}) needs an image, not latents"
    return None


def _model_problem(stage: StageSpec, model: ResolvedModel) -> str | None:
    pipeline = model.entry.pipeline
    if is_clip_checkpoint(model.entry):
        return f"{model.name} is a scoring model (a CLIP checkpoint): name it in a stage's score.model"
    if isinstance(stage, ResizeStage) != (pipeline == RESIZE_PIPELINE):
        return "resize runs on the model `cpu`, and only resize does"
    if pipeline is None:
        return None  # a hub checkpoint: its class is known only once a worker loads it
    if isinstance(stage, UpscaleStage) and pipeline not in UPSCALER_PIPELINES:
        return (
            f"upscale needs an upscaler model ({', '.join(UPSCALER_PIPELINES)}); {model.name} is {pipeline}"
        )
    if not isinstance(stage, UpscaleStage) and pipeline in UPSCALER_PIPELINES:
        return f"{model.name} is an upscaler ({pipeline}); use it in an upscale stage"
    return None


def _with_sampling(
    stage: Img2ImgStage | Text2ImgStage, model: ResolvedModel
) -> tuple[Img2ImgStage | Text2ImgStage, list[tuple[str, str]]]:
    """The stage as it runs on `model`: its model's sampler where it names neither its own nor a
    preset, its preset's adapter among its loras; and (field, message) for each problem."""
    entry = model.entry
    own = [field for field in ("preset", "sampler", "schedule", "eta") if getattr(stage, field) is not None]
    if not own and entry.sampler is None:
        return stage, []
    problem = sampler_problem_for_pipeline(entry.pipeline) or scheduler_problem(entry.scheduler)
    if problem is not None:
        field = own[0] if own else "model"
        whose = f"{model.name} has a sampler, but " if not own else ""
        return stage, [(field, f"{whose}{model.name}: {problem}")]
    if stage.preset is None and stage.sampler is None and entry.sampler is not None:
        # The model's sampler, by its name in the table: a schedule its name carries ("DPM++ 2M
        # Karras") is the model's, which the stage's own schedule replaces.
        models = choose(entry.sampler, entry.schedule)
        schedule = stage.schedule or models.schedule
        try:
            choose(models.sampler.name, schedule)
        except ValueError as exc:
            return stage, [("schedule", f"with {model.name}'s sampler: {exc}")]
        stage = stage.model_copy(update={"sampler": models.sampler.name, "schedule": schedule})
    if stage.preset is None and stage.sampler is None and stage.schedule is not None:
        unnamed = f"name the sampler it is for: neither the stage nor {model.name} names one"
        return stage, [("schedule", unnamed)]
    problems: list[tuple[str, str]] = []
    found = eta_problem(stage_choice(stage), stage.eta)
    if found is not None:
        field, _, message = found.partition(": ")
        problems.append((field, message))
    if stage.preset is not None:
        adapter, problem = _preset_adapter(stage, model)
        if problem is not None:
            problems.append(("preset_lora", problem))
        elif adapter is not None and adapter.source not in {lora.source for lora in stage.loras}:
            stage = stage.model_copy(update={"loras": (*stage.loras, adapter)})
    return stage, problems


def _preset_adapter(
    stage: Img2ImgStage | Text2ImgStage, model: ResolvedModel
) -> tuple[LoraRef | None, str | None]:
    """The adapter a preset adds to its stage: preset_lora, else the one the preset publishes for the
    model's family; or why there is none."""
    preset = PRESETS[str(stage.preset)]
    if stage.preset_lora is False or not preset.needs_adapter:
        return None, None
    if stage.preset_lora is not None:
        return stage.preset_lora, None
    family = FAMILIES.get(model.entry.pipeline or "")
    published = preset.adapter_for(family)
    if published is None:
        kind = model.entry.pipeline or "a checkpoint whose class is known only once a worker loads it"
        return None, (
            f"preset {preset.name} publishes LoRAs for SD 1.x and SDXL checkpoints, and {model.name} is "
            f"{kind}: give its adapter as preset_lora (or preset_lora: false for a distilled checkpoint)"
        )
    return LoraRef(source=published.source, weight_name=published.weight_name), None


def plan_recipe(
    spec: JobSpec, registry: Registry, base_dir: Path, file: str
) -> tuple[list[StagePlan], list[Problem]]:
    problems: list[Problem] = []
    models: list[ResolvedModel | None] = []
    stages: list[StageSpec] = []
    extras: list[tuple[ResolvedModel | None, ResolvedModel | None]] = []
    scorers: list[ResolvedModel | None] = []
    for index, stage in enumerate(spec.stages):
        where = f"stages.{index}"
        if index > 0 and stage.type == "text2img":
            problems.append(Problem(file, None, f"{where}.type", "text2img can only be the first stage"))

        def resolve(name: str | None, field: str, where: str = where) -> ResolvedModel | None:
            if name is None:
                return None
            try:
                return registry.resolve(name, base_dir=base_dir)
            except ConfigError as exc:
                problems.append(Problem(file, None, f"{where}.{field}", str(exc)))
                return None

        model = resolve(stage.model, "model")
        if model is not None and (problem := _model_problem(stage, model)):
            problems.append(Problem(file, None, f"{where}.model", problem))
        if model is not None and isinstance(stage, Img2ImgStage | Text2ImgStage):
            stage, found = _with_sampling(stage, model)
            problems.extend(Problem(file, None, f"{where}.{field}", message) for field, message in found)
        if model is not None and isinstance(stage, UpscaleStage) and model.entry.sampler is not None:
            problems.append(
                Problem(file, None, f"{where}.model", f"{model.name} has a sampler; upscalers run their own")
            )
        if model is not None and not isinstance(stage, ResizeStage) and stage.loras:
            # The stage's adapters as workers load them: local paths relative to the job's folder.
            loras, found = registry.stage_loras(stage.loras, model, base_dir)
            stage = stage.model_copy(update={"loras": loras})
            problems.extend(Problem(file, None, f"{where}.{field}", message) for field, message in found)
        stages.append(stage)
        models.append(model)
        if isinstance(stage, Img2ImgStage):
            extras.append(
                (resolve(stage.controlnet, "controlnet"), resolve(stage.depth_model, "depth_model"))
            )
        else:
            extras.append((None, None))
        score = None if isinstance(stage, ResizeStage) else stage.score
        scorer = resolve(score.model, "score.model") if score else None
        if scorer is not None and (problem := scorer_problem(scorer)):
            problems.append(Problem(file, None, f"{where}.score.model", problem))
        if score is not None and score.min_input_similarity is not None and spec.stages[0].type == "text2img":
            problems.append(
                Problem(
                    file,
                    None,
                    f"{where}.score.min_input_similarity",
                    "the job's items have no input image to compare with (its first stage is text2img)",
                )
            )
        scorers.append(scorer)

    recipe: list[StagePlan] = []
    last = len(spec.stages) - 1
    for index, (stage, model) in enumerate(zip(stages, models, strict=True)):
        following = models[index + 1] if index < last else None
        handover: str = "none"
        if index < last:
            next_stage = spec.stages[index + 1]
            latent_problem = (
                _latent_problem(model, following, next_stage) if model and following else "unresolved model"
            )
            if stage.handover == "latent" and latent_problem:
                problems.append(Problem(file, None, f"stages.{index}.handover", latent_problem))
            handover = "latent" if stage.handover != "image" and not latent_problem else "image"
        elif stage.handover == "latent":
            problems.append(
                Problem(file, None, f"stages.{index}.handover", "the last stage hands nothing over")
            )
        default_save: tuple[SaveKind, ...] = ("image",) if index == last else ()
        if model is None:
            continue
        controlnet, depth_model = extras[index]
        recipe.append(
            StagePlan(
                index=index,
                name=stage_name(index, stage),
                spec=stage,
                model=model,
                handover=handover,  # type: ignore[arg-type]
                save=stage.save if stage.save is not None else default_save,
                controlnet=controlnet,
                depth_model=depth_model,
                scorer=scorers[index],
            )
        )
    return recipe, problems
