"""Samplers and few-step presets: every sampler name users bring, resolved through one table to a
diffusers scheduler class and the config flags it is built with; the combinations diffusers gets
wrong; and what a stage costs in UNet evaluations. No I/O and no diffusers import: the producer
validates with it, the workers build their schedulers from it.

A sampler is named by any of:
- imgjobs' own name (the first column of SAMPLERS, InvokeAI's where it has one): `dpmpp_2m`;
- InvokeAI's flat list, where `_k` means the Karras schedule: `dpmpp_2m_k`;
- AUTOMATIC1111's, whose " Karras" suffix is the schedule: "DPM++ 2M Karras", "Euler a";
- ComfyUI's sampler (`dpmpp_2m`), its scheduler (`karras`) going in `schedule`;
- diffusers' class name (`DPMSolverMultistepScheduler`), alone or with its config flags as
  `{scheduler: DPMSolverMultistepScheduler, algorithm_type: sde-dpmsolver++, use_karras_sigmas: true}`.

The mapping is diffusers' own (the schedulers overview): Karras is `use_karras_sigmas=True`,
ComfyUI's `sgm_uniform` and `simple` are `timestep_spacing="trailing"`. A schedule left out is the
checkpoint's own spacing.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

Schedule = Literal["karras", "exponential", "trailing"]
Family = Literal["sd1", "sdxl"]

# The config flag each schedule sets, on top of the checkpoint's own scheduler config.
SCHEDULE_FLAGS: dict[str, tuple[str, object]] = {
    "karras": ("use_karras_sigmas", True),
    "exponential": ("use_exponential_sigmas", True),
    "trailing": ("timestep_spacing", "trailing"),
}
SIGMA_SCHEDULES = ("karras", "exponential", "trailing")


@dataclass(frozen=True)
class Sampler:
    """One row of the table: a diffusers scheduler class with the flags that make it this sampler."""

    name: str
    scheduler: str
    flags: tuple[tuple[str, object], ...] = ()
    schedules: tuple[str, ...] = ()  # the schedules its class takes
    evaluations_per_step: Literal[1, 2] = 1  # Heun and DPM2 evaluate the UNet twice per step
    draws_noise: bool = False  # fresh noise at every step, from each item's generator
    takes_eta: bool = False  # the pipeline's eta reaches its step()
    a1111: tuple[str, ...] = ()
    comfyui: tuple[str, ...] = ()
    invokeai: tuple[str, ...] = ()  # with a `_k` form too where it takes the Karras schedule

    @property
    def config_flags(self) -> dict[str, object]:
        return dict(self.flags)


SAMPLERS: dict[str, Sampler] = {
    row.name: row
    for row in (
        Sampler(
            "ddim",
            "DDIMScheduler",
            schedules=("trailing",),
            draws_noise=True,  # with eta > 0
            takes_eta=True,
            a1111=("DDIM",),
            comfyui=("ddim",),
            invokeai=("ddim",),
        ),
        Sampler(
            "ddpm",
            "DDPMScheduler",
            schedules=("trailing",),
            draws_noise=True,
            comfyui=("ddpm",),
            invokeai=("ddpm",),
        ),
        # PLMS, as SD 1.x ships it (without PNDM's Runge-Kutta warm-up steps), on the leading spacing it
        # was made for (run_problem).
        Sampler(
            "pndm", "PNDMScheduler", flags=(("skip_prk_steps", True),), a1111=("PLMS",), invokeai=("pndm",)
        ),
        Sampler(
            "euler",
            "EulerDiscreteScheduler",
            schedules=SIGMA_SCHEDULES,
            a1111=("Euler",),
            comfyui=("euler",),
            invokeai=("euler",),
        ),
        Sampler(
            "euler_a",
            "EulerAncestralDiscreteScheduler",
            schedules=("trailing",),
            draws_noise=True,
            a1111=("Euler a",),
            comfyui=("euler_ancestral",),
            invokeai=("euler_a",),
        ),
        Sampler(
            "heun",
            "HeunDiscreteScheduler",
            schedules=SIGMA_SCHEDULES,
            evaluations_per_step=2,
            a1111=("Heun",),
            comfyui=("heun",),
            invokeai=("heun",),
        ),
        Sampler(
            "kdpm_2",
            "KDPM2DiscreteScheduler",
            schedules=SIGMA_SCHEDULES,
            evaluations_per_step=2,
            a1111=("DPM2",),
            comfyui=("dpm_2",),
            invokeai=("kdpm_2",),
        ),
        Sampler(
            "kdpm_2_a",
            "KDPM2AncestralDiscreteScheduler",
            schedules=SIGMA_SCHEDULES,
            evaluations_per_step=2,
            draws_noise=True,
            a1111=("DPM2 a",),
            comfyui=("dpm_2_ancestral",),
            invokeai=("kdpm_2_a",),
        ),
        Sampler(
            "dpmpp_2m",
            "DPMSolverMultistepScheduler",
            schedules=SIGMA_SCHEDULES,
            a1111=("DPM++ 2M",),
            comfyui=("dpmpp_2m",),
            invokeai=("dpmpp_2m",),
        ),
        Sampler(
            "dpmpp_2m_sde",
            "DPMSolverMultistepScheduler",
            flags=(("algorithm_type", "sde-dpmsolver++"),),
            schedules=SIGMA_SCHEDULES,
            draws_noise=True,
            a1111=("DPM++ 2M SDE",),
            comfyui=("dpmpp_2m_sde", "dpmpp_2m_sde_gpu"),
            invokeai=("dpmpp_2m_sde",),
        ),
        Sampler(
            "dpmpp_2s",
            "DPMSolverSinglestepScheduler",
            schedules=("karras", "exponential"),  # it spaces its own timesteps
            invokeai=("dpmpp_2s",),
        ),
        Sampler(
            "deis",
            "DEISMultistepScheduler",
            schedules=SIGMA_SCHEDULES,
            comfyui=("deis",),
            invokeai=("deis",),
        ),
        Sampler(
            "unipc",
            "UniPCMultistepScheduler",
            schedules=SIGMA_SCHEDULES,
            comfyui=("uni_pc_bh2",),
            invokeai=("unipc",),
        ),
        Sampler(
            "unipc_bh1",
            "UniPCMultistepScheduler",
            # diffusers' bh1 step divides by zero on a final sigma of zero (every output NaN): it ends
            # at the smallest training sigma instead, as A1111's UniPC does.
            flags=(("solver_type", "bh1"), ("final_sigmas_type", "sigma_min")),
            schedules=SIGMA_SCHEDULES,
            # A1111's "UniPC" (its default variant is bh1) is InvokeAI's `unipc` once case is folded:
            # it names the row above; ComfyUI's names tell the two apart.
            comfyui=("uni_pc",),
        ),
        # LCM and TCD set their own timesteps from the distillation's (original_inference_steps).
        Sampler("lcm", "LCMScheduler", draws_noise=True, a1111=("LCM",), comfyui=("lcm",), invokeai=("lcm",)),
        Sampler("tcd", "TCDScheduler", draws_noise=True, takes_eta=True, invokeai=("tcd",)),
    )
}

# Names users bring that diffusers has a class for, but that imgjobs refuses, and why.
_SDE_REASON = (
    "diffusers' DPMSolverSDEScheduler draws its noise from a Brownian tree seeded once per call (and "
    "needs torchsde), not from each item's generator, so an item's image would depend on its batch; "
    "dpmpp_2m_sde is the stochastic DPM++ that takes each item's seed"
)
_SCIPY_REASON = "diffusers' LMSDiscreteScheduler needs scipy, which imgjobs does not install"
REFUSED: dict[str, str] = {
    **dict.fromkeys(
        ("DPM++ SDE", "DPM++ SDE Karras", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_sde_k"),
        _SDE_REASON,
    ),
    "DPMSolverSDEScheduler": _SDE_REASON,
    **dict.fromkeys(("LMS", "LMS Karras", "lms", "lms_k", "LMSDiscreteScheduler"), _SCIPY_REASON),
}

# Every scheduler diffusers' SD pipelines take (diffusers.schedulers.KarrasDiffusionSchedulers): a
# checkpoint shipping one of these can run any sampler of the table instead.
SD_SCHEDULERS = frozenset(
    {
        "DDIMScheduler",
        "DDPMScheduler",
        "PNDMScheduler",
        "LMSDiscreteScheduler",
        "EulerDiscreteScheduler",
        "HeunDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "DEISMultistepScheduler",
        "UniPCMultistepScheduler",
        "DPMSolverSDEScheduler",
        "EDMEulerScheduler",
        "LCMScheduler",
        "TCDScheduler",
    }
)

SCHEDULE_ALIASES: dict[str, Schedule | None] = {
    "karras": "karras",
    "exponential": "exponential",
    "trailing": "trailing",
    "sgm_uniform": "trailing",  # ComfyUI
    "sgm uniform": "trailing",  # A1111
    "simple": "trailing",
    "default": None,  # the checkpoint's own spacing
    "normal": None,
    "automatic": None,
}
REFUSED_SCHEDULES = {"beta": "diffusers' use_beta_sigmas needs scipy, which imgjobs does not install"}


def _key(name: str) -> str:
    return " ".join(name.split()).casefold()


def _aliases() -> dict[str, tuple[str, Sampler, Schedule | None]]:
    """Every name, by its key (case and spacing folded): the name as written, its row and schedule."""
    table: dict[str, tuple[str, Sampler, Schedule | None]] = {}
    for row in SAMPLERS.values():
        names: list[tuple[str, Schedule | None]] = [(row.name, None)]
        names += [(name, None) for name in (*row.a1111, *row.comfyui, *row.invokeai)]
        if "karras" in row.schedules:
            names += [(f"{name} Karras", "karras") for name in row.a1111]
            names += [(f"{name}_k", "karras") for name in row.invokeai]
        if not row.flags:
            names.append((row.scheduler, None))
        for name, schedule in names:
            table[_key(name)] = (name, row, schedule)
    return table


ALIASES = _aliases()


def sampler_names() -> str:
    return ", ".join(SAMPLERS)


def _unknown_sampler(name: str) -> str:
    close = difflib.get_close_matches(_key(name), list(ALIASES), n=1, cutoff=0.75)
    hint = f"; did you mean {ALIASES[close[0]][0]!r}?" if close else ""
    return (
        f"{name!r} has no diffusers equivalent here{hint}; samplers: {sampler_names()} (or their "
        "AUTOMATIC1111, ComfyUI and InvokeAI names, or a diffusers class name)"
    )


def schedule_names() -> str:
    return "karras, exponential, trailing (sgm_uniform, simple), default (normal, automatic)"


class SchedulerConfig(BaseModel):
    """A diffusers scheduler class with the config flags that choose among its samplers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheduler: str = Field(min_length=1, description="a diffusers class, e.g. DPMSolverMultistepScheduler")
    algorithm_type: Literal["dpmsolver++", "sde-dpmsolver++"] | None = None
    solver_type: Literal["bh1", "bh2"] | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    timestep_spacing: Literal["trailing"] | None = None


SamplerValue = str | SchedulerConfig


@dataclass(frozen=True)
class SamplerChoice:
    """A resolved sampler: the row and the schedule (None: the checkpoint's own spacing)."""

    sampler: Sampler
    schedule: Schedule | None = None

    @property
    def scheduler_flags(self) -> dict[str, object]:
        """What the scheduler is built with, over the checkpoint's own config."""
        flags = self.sampler.config_flags
        if self.schedule is not None:
            key, value = SCHEDULE_FLAGS[self.schedule]
            flags[key] = value
        return flags


# The flags that tell rows of one class apart (DPM++ 2M from 2M SDE, UniPC's bh2 from bh1), with the
# value a config that leaves them out has.
ROW_FLAG_DEFAULTS: dict[str, object] = {"algorithm_type": "dpmsolver++", "solver_type": "bh2"}


def row_flags(scheduler: str) -> dict[str, object]:
    """The flags that tell apart the rows of a class, at their defaults."""
    named = {flag for row in SAMPLERS.values() if row.scheduler == scheduler for flag, _ in row.flags}
    return {flag: default for flag, default in ROW_FLAG_DEFAULTS.items() if flag in named}


def base_flags(scheduler: str) -> dict[str, object]:
    """What a sampler's scheduler is built with unless its row or schedule says otherwise, over the
    checkpoint's own config: a checkpoint that ships (say) DPM++ 2M SDE Karras then runs plain
    dpmpp_2m when asked. The builder passes those of these its class takes."""
    return {
        **row_flags(scheduler),
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
    }


def _matches(row: Sampler, config: dict[str, object]) -> bool:
    own = row.config_flags
    return all(
        config.get(flag, default) == own.get(flag, default)
        for flag, default in row_flags(row.scheduler).items()
    )


def _from_class(config: SchedulerConfig) -> tuple[Sampler, Schedule | None]:
    rows = [row for row in SAMPLERS.values() if row.scheduler == config.scheduler]
    if not rows:
        if config.scheduler in REFUSED:
            raise ValueError(f"{config.scheduler}: {REFUSED[config.scheduler]}")
        raise ValueError(_unknown_sampler(config.scheduler))
    given = config.model_dump(include=set(ROW_FLAG_DEFAULTS), exclude_none=True)
    told = row_flags(config.scheduler)
    row = next((row for row in rows if _matches(row, given)), None) if set(given) <= set(told) else None
    if row is None:
        offered = "; ".join(f"{row.name}: {row.config_flags or 'its defaults'}" for row in rows)
        raise ValueError(f"no sampler here is {config.scheduler} with {given} ({offered})")
    chosen: list[Schedule] = []
    if config.use_karras_sigmas:
        chosen.append("karras")
    if config.use_exponential_sigmas:
        chosen.append("exponential")
    if config.timestep_spacing == "trailing":
        chosen.append("trailing")
    if len(chosen) > 1:
        raise ValueError("set one of use_karras_sigmas, use_exponential_sigmas and timestep_spacing")
    return row, chosen[0] if chosen else None


@functools.lru_cache(maxsize=256)
def sampler_named(value: SamplerValue) -> tuple[Sampler, Schedule | None]:
    """The row a sampler name (or class with flags) stands for, and the schedule its name carries
    ("DPM++ 2M Karras", `dpmpp_2m_k`); ValueError says why there is none, listing those that exist."""
    if isinstance(value, SchedulerConfig):
        return _from_class(value)
    found = ALIASES.get(_key(value))
    if found is not None:
        return found[1], found[2]
    refused = next((reason for name, reason in REFUSED.items() if _key(name) == _key(value)), None)
    if refused is not None:
        raise ValueError(f"{value!r}: {refused}")
    raise ValueError(_unknown_sampler(value))


def schedule_named(value: str) -> Schedule | None:
    """A schedule's canonical name (None: the checkpoint's own); ValueError lists those that exist."""
    key = _key(value)
    if key in SCHEDULE_ALIASES:
        return SCHEDULE_ALIASES[key]
    if key in REFUSED_SCHEDULES:
        raise ValueError(f"{value!r}: {REFUSED_SCHEDULES[key]}")
    raise ValueError(f"{value!r} has no diffusers equivalent here; schedules: {schedule_names()}")


def choose(sampler: SamplerValue, schedule: str | None = None) -> SamplerChoice:
    """The sampler and schedule a stage or model names, checked together. ValueError's message
    starts with the field at fault."""
    try:
        row, named_schedule = sampler_named(sampler)
    except ValueError as exc:
        raise ValueError(f"sampler: {exc}") from None
    chosen = named_schedule
    if schedule is not None:
        try:
            own = schedule_named(schedule)
        except ValueError as exc:
            raise ValueError(f"schedule: {exc}") from None
        if named_schedule is not None and own != named_schedule:
            raise ValueError(
                f"schedule: the sampler {_shown(sampler)} is {named_schedule} already; leave schedule out"
            )
        chosen = own
    if chosen is not None and chosen not in row.schedules:
        takes = ", ".join(row.schedules) if row.schedules else "none: it sets its own timesteps"
        raise ValueError(f"schedule: {row.name} takes no {chosen} schedule (it takes {takes})")
    return SamplerChoice(row, chosen)


def _check_sampler(value: SamplerValue) -> SamplerValue:
    sampler_named(value)  # a name with no diffusers equivalent is refused here, listing those that exist
    return value


def _check_schedule(value: str) -> str:
    schedule_named(value)
    return value


# The spec's fields: as the user wrote them (a name is resolved where it is used, with choose()).
SamplerName = Annotated[SamplerValue, AfterValidator(_check_sampler)]
ScheduleName = Annotated[str, AfterValidator(_check_schedule)]


def _shown(value: SamplerValue) -> str:
    return repr(value) if isinstance(value, str) else value.scheduler


def sampler_of_class(class_name: str | None, config: dict[str, object] | None = None) -> Sampler | None:
    """The row a scheduler class runs as, told apart by its config's algorithm and solver flags; None
    for a class (or flags) outside the table."""
    rows = [row for row in SAMPLERS.values() if row.scheduler == class_name]
    return next((row for row in rows if _matches(row, config or {})), None)


def schedule_of_config(config: dict[str, object]) -> Schedule | None:
    """The schedule a scheduler config runs with: a sigma schedule it sets, or trailing spacing."""
    if config.get("use_karras_sigmas"):
        return "karras"
    if config.get("use_exponential_sigmas"):
        return "exponential"
    if config.get("timestep_spacing") == "trailing":
        return "trailing"
    return None


# -- what a stage costs


def denoising_steps(steps: int, strength: float | None) -> int:
    """The steps of a schedule that run: img2img skips the first (1 - strength) of them, as diffusers'
    get_timesteps does."""
    if strength is None:
        return steps
    return min(int(steps * strength), steps)


def loop_length(sampler: Sampler | None, steps: int, strength: float | None) -> int:
    """The UNet calls of one denoising loop (None: a sampler outside the table, taken as one call
    per step). Second-order samplers call it twice per step but once for the first (diffusers'
    timesteps interleave two per step after the first); PLMS (pndm) once more in all, for its warm-up,
    when the schedule has more than one step. Measured against diffusers in the tests."""
    run = denoising_steps(steps, strength)
    if sampler is None or run == 0:
        return run
    if sampler.evaluations_per_step == 2:
        return 2 * run - 1
    if sampler.name == "pndm" and steps > 1:
        return run + 1
    return run


def uses_cfg(guidance_scale: float | None, embedded_guidance: bool = False) -> bool:
    """Whether classifier-free guidance runs, doubling the UNet's batch: diffusers does it above
    guidance 1, unless the UNet takes the guidance as an embedding (LCM-distilled checkpoints)."""
    return guidance_scale is not None and guidance_scale > 1 and not embedded_guidance


def unet_evaluations(
    sampler: Sampler | None,
    steps: int | None,
    strength: float | None,
    guidance_scale: float | None,
    embedded_guidance: bool = False,
) -> int:
    """What one item costs: the UNet rows it is evaluated on, counting the unconditional row that
    classifier-free guidance adds."""
    if steps is None:
        return 0
    return loop_length(sampler, steps, strength) * (2 if uses_cfg(guidance_scale, embedded_guidance) else 1)


# -- what diffusers gets wrong


def run_problem(
    sampler: Sampler | None,
    schedule: Schedule | None,
    text2img: bool,
    steps: int,
    strength: float | None,
    spacing: str | None = None,
    first_timestep: float | None = None,
    train_timesteps: int = 1000,
) -> str | None:
    """Why diffusers would make a bad image with this sampler (None: the checkpoint's own), steps and
    strength, or None. The scheduler's timestep `spacing` and where its schedule starts
    (`first_timestep`) are known to a worker, which has the scheduler: None elsewhere. Each rule
    stands for cases measured to go wrong (tests/unit/test_samplers.py: a denoiser that knows the
    answer does not reach it, or is handed pure noise as a nearly finished image); a rule may refuse
    a few neighbours of those that would have passed."""
    run = denoising_steps(steps, strength)
    if sampler is not None and sampler.name in ("lcm", "tcd") and steps > 50:
        return f"steps: {sampler.name} runs at most 50 steps (its original_inference_steps)"
    if text2img and first_timestep is not None and first_timestep < train_timesteps / 2:
        # A leading spacing at 1 step: DDIM, Euler, Heun and PNDM start at timestep 1.
        return (
            f"steps: {steps} step(s) of this schedule start at timestep {first_timestep:g} of "
            f"{train_timesteps}, so the image stays noise; give the stage a sampler with "
            "schedule: trailing (sgm_uniform)"
        )
    if sampler is None:
        return None
    if sampler.name == "pndm" and spacing not in (None, "leading"):
        return f"sampler: pndm (PLMS) goes wrong on a {spacing} schedule; choose another sampler"
    if sampler.name == "pndm" and not text2img and (run == 2 < steps or (steps == 2 and run == 1)):
        return (
            f"steps: pndm (PLMS) goes wrong with {run} of {steps} steps in img2img (steps x strength); "
            "choose another sampler or 3 or more denoising steps"
        )
    if sampler.name in ("deis", "unipc_bh1") and schedule in ("karras", "exponential") and steps == 1:
        return f"steps: {sampler.name} with the {schedule} schedule goes wrong at 1 step; choose 2 or more"
    return None


# -- few-step presets


@dataclass(frozen=True)
class Adapter:
    """A preset's published LoRA for one family of checkpoints: a hub repository, and its file where
    the repository holds several."""

    source: str
    weight_name: str | None = None


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    sampler: str
    schedule: Schedule | None
    steps: int
    steps_range: tuple[int, int]
    guidance_scale: float
    guidance_range: tuple[float, float]
    eta: float | None = None
    img2img_steps: int | None = None  # where img2img needs more steps for its first to run
    adapters: tuple[tuple[Family, Adapter], ...] = ()

    def steps_for(self, img2img: bool) -> int:
        return self.img2img_steps if img2img and self.img2img_steps is not None else self.steps

    def adapter_for(self, family: Family | None) -> Adapter | None:
        return next((adapter for own, adapter in self.adapters if own == family), None)

    @property
    def needs_adapter(self) -> bool:
        return bool(self.adapters)


def _hyper(steps: int) -> Preset:
    return Preset(
        name=f"hyper-{steps}",
        description=f"Hyper-SD's {steps}-step LoRA: DDIM on trailing timesteps, no guidance",
        sampler="ddim",
        schedule="trailing",
        steps=steps,
        steps_range=(1, 8),
        guidance_scale=0.0,
        guidance_range=(0.0, 1.0),
        adapters=(
            ("sd1", Adapter("ByteDance/Hyper-SD", f"Hyper-SD15-{steps}steps-lora.safetensors")),
            ("sdxl", Adapter("ByteDance/Hyper-SD", f"Hyper-SDXL-{steps}steps-lora.safetensors")),
        ),
    )


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="lcm",
            description="LCM-LoRA: LCMScheduler, 4-8 steps, guidance 1-2",
            sampler="lcm",
            schedule=None,
            steps=4,
            steps_range=(4, 8),
            guidance_scale=1.0,
            guidance_range=(0.0, 2.0),
            adapters=(
                ("sd1", Adapter("latent-consistency/lcm-lora-sdv1-5")),
                ("sdxl", Adapter("latent-consistency/lcm-lora-sdxl")),
            ),
        ),
        Preset(
            name="tcd",
            description="TCD LoRA: TCDScheduler with eta 0.3, no guidance",
            sampler="tcd",
            schedule=None,
            steps=4,
            steps_range=(1, 8),
            guidance_scale=0.0,
            guidance_range=(0.0, 2.0),
            eta=0.3,
            adapters=(("sd1", Adapter("h1t/TCD-SD15")), ("sdxl", Adapter("h1t/TCD-SDXL-LoRA"))),
        ),
        _hyper(2),
        _hyper(4),
        _hyper(8),
        Preset(
            name="turbo",
            description="SD-Turbo and SDXL-Turbo checkpoints: Euler a on trailing timesteps, no guidance",
            sampler="euler_a",
            schedule="trailing",
            steps=1,
            img2img_steps=2,  # strength 0.5-0.99 then runs one step
            steps_range=(1, 4),
            guidance_scale=0.0,
            guidance_range=(0.0, 1.0),
        ),
    )
}

# The pipeline classes whose checkpoints the presets' published LoRAs are made for.
FAMILIES: dict[str, Family] = {
    "StableDiffusionPipeline": "sd1",
    "StableDiffusionImg2ImgPipeline": "sd1",
    "StableDiffusionControlNetPipeline": "sd1",
    "StableDiffusionControlNetImg2ImgPipeline": "sd1",
    "StableDiffusionXLPipeline": "sdxl",
}


def preset_names() -> str:
    return ", ".join(PRESETS)


def preset_problem(preset: Preset, steps: int | None, guidance_scale: float | None) -> str | None:
    """Why these steps or this guidance cannot work with the preset, naming the field; or None."""
    low, high = preset.steps_range
    if steps is not None and not low <= steps <= high:
        return f"steps: preset {preset.name} runs {low}-{high} steps, not {steps}"
    floor, ceiling = preset.guidance_range
    if guidance_scale is not None and not floor <= guidance_scale <= ceiling:
        return (
            f"guidance_scale: preset {preset.name} takes {floor:g}-{ceiling:g}, not {guidance_scale:g} "
            "(a distilled model burns its images at higher guidance)"
        )
    return None


def sampler_problem_for_pipeline(pipeline: str | None) -> str | None:
    """Why a checkpoint of this pipeline class cannot take a sampler; None where it can (or where the
    class is not known before a worker loads it)."""
    if pipeline is None:
        return None
    if pipeline in ("StableDiffusionLatentUpscalePipeline", "StableDiffusionUpscalePipeline"):
        return f"{pipeline} runs its checkpoint's own scheduler: upscalers take no sampler"
    if pipeline.startswith("Kandinsky"):
        return f"{pipeline} runs its own prior and decoder schedulers: Kandinsky takes no sampler"
    if pipeline == "resize":
        return "resize runs no sampler"
    return None


def scheduler_problem(scheduler: str | None) -> str | None:
    """Why a checkpoint shipping this scheduler class cannot swap it for a sampler of the table."""
    if scheduler is None or scheduler in SD_SCHEDULERS:
        return None
    return (
        f"its scheduler is {scheduler}, which the samplers here (DDPM-family, for SD 1.x and SDXL) "
        "cannot replace"
    )
