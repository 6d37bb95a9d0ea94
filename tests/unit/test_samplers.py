"""The sampler table (schemas/samplers.py) against diffusers itself, and what each sampler does in
diffusers' own img2img and text2img pipelines with a denoiser that knows the answer.

That denoiser (Oracle) stands in for the UNet: the data is one latent, x0, so the exact noise
prediction for any noisy latent at any timestep is known in closed form. With it, every correct
sampler reaches x0, whatever its steps and strength, and a schedule that goes wrong shows as distance
from x0 (or an error, or NaN). Each sampler of the table, with each schedule it takes, runs over a
grid of steps x strength (and text2img): wherever imgjobs does not refuse the combination
(run_problem), it must reach x0, in as many UNet calls as loop_length counts. The known diffusers
img2img problems each have a test of their own: those that go wrong are refused, those diffusers
has fixed are shown to run right.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import diffusers
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from schemas.samplers import (
    PRESETS,
    SAMPLERS,
    SD_SCHEDULERS,
    SamplerChoice,
    SchedulerConfig,
    choose,
    loop_length,
    sampler_of_class,
    schedule_named,
    schedule_of_config,
)
from workers.models import build_scheduler, scheduler_problem
from workers.tiny_models import sd_scheduler

# Stable Diffusion 1.x's scheduler config, as tiny-sd saves it (leading spacing, steps offset 1).
SD_CONFIG = dict(sd_scheduler().config)
OWN_CLASS = "DDIMScheduler"
STEPS = (1, 2, 3, 4, 5, 6, 8, 10, 20)
STRENGTHS = (0.1, 0.25, 0.3, 0.5, 0.75, 0.8, 1.0)
# How far from x0 a correct sampler may end: DDIM's last step stops at timestep 0's noise (about 0.03).
REACHED = 0.1
CHOICES = [(name, schedule) for name, row in SAMPLERS.items() for schedule in (None, *row.schedules)]


def sd_config(**changes: object) -> dict[str, Any]:
    """SD_CONFIG with changes, as a checkpoint would ship them (from_config takes a key the config
    lists among its _use_default_values from the class it builds instead)."""
    return dict(diffusers.DDIMScheduler.from_config(SD_CONFIG, **changes).config)


class Oracle(torch.nn.Module):  # type: ignore[misc]
    """A UNet for data that is one latent x0: the noise in a noisy latent at timestep t is
    (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), abar at a fractional t interpolated in log sigma as
    diffusers' _sigma_to_t inverts it. It counts the rows it is called on."""

    def __init__(self, x0: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.x0 = x0.double()
        self.log_sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().log().double()
        self.config = SimpleNamespace(time_cond_proj_dim=None, in_channels=4, sample_size=8)
        self.rows = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, sample: torch.Tensor, timestep: Any, **_: Any) -> tuple[torch.Tensor]:
        self.rows += sample.shape[0]
        t = float(timestep)
        low = min(math.floor(t), len(self.log_sigmas) - 2)
        weight = t - low
        log_sigma = (1 - weight) * self.log_sigmas[low] + weight * self.log_sigmas[low + 1]
        abar = 1 / (1 + math.exp(2 * float(log_sigma)))
        noise = (sample.double() - math.sqrt(abar) * self.x0) / math.sqrt(1 - abar)
        return (noise.float(),)


class Run:
    """One sampler's scheduler in diffusers' SD img2img and text2img pipelines around an Oracle."""

    def __init__(self, choice: SamplerChoice | None, config: dict[str, Any] = SD_CONFIG) -> None:
        self.choice = choice
        self.x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        alphas = diffusers.DDPMScheduler.from_config(config).alphas_cumprod
        self.oracle = Oracle(self.x0, alphas)
        parts: dict[str, Any] = {"vae": None, "text_encoder": None, "tokenizer": None, "safety_checker": None}
        parts |= {"feature_extractor": None, "requires_safety_checker": False, "unet": self.oracle}
        self.img2img = StableDiffusionImg2ImgPipeline(
            scheduler=build_scheduler(OWN_CLASS, config, choice), **parts
        )
        self.text2img = StableDiffusionPipeline(scheduler=build_scheduler(OWN_CLASS, config, choice), **parts)
        for pipeline in (self.img2img, self.text2img):
            pipeline.set_progress_bar_config(disable=True)
        self.text2img.vae_scale_factor = 8

    def problem(self, steps: int, strength: float | None) -> str | None:
        pipeline = self.text2img if strength is None else self.img2img
        return scheduler_problem(pipeline.scheduler, self.choice, steps, strength, strength is None)

    def distance(self, steps: int, strength: float | None, guidance: float = 1.0) -> tuple[float, int]:
        """How far from x0 the pipeline ends (relative to x0's size), and the UNet rows it took."""
        self.oracle.rows = 0
        embeds = torch.zeros(1, 2, 8)
        kwargs: dict[str, Any] = {
            "prompt_embeds": embeds,
            "negative_prompt_embeds": embeds,
            "guidance_scale": guidance,
            "num_inference_steps": steps,
            "output_type": "latent",
            "generator": [torch.Generator().manual_seed(1)],
        }
        with torch.inference_mode():
            if strength is None:
                scheduler = self.text2img.scheduler
                noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
                scheduler.set_timesteps(steps)
                latents = noise * scheduler.init_noise_sigma
                out = self.text2img(**kwargs, height=64, width=64, latents=latents).images
            else:
                out = self.img2img(**kwargs, image=self.x0, strength=strength).images
        distance = float((out - self.x0).pow(2).mean().sqrt() / self.x0.pow(2).mean().sqrt())
        return distance, self.oracle.rows


def grid() -> Iterator[tuple[int, float | None]]:
    for steps in STEPS:
        yield steps, None
        for strength in STRENGTHS:
            if int(steps * strength) >= 1:
                yield steps, strength


# -- the table against diffusers


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_each_row_names_a_diffusers_class_with_the_flags_and_traits_it_claims(name: str) -> None:
    """from_config drops a flag its class does not take with only a warning: every flag a row sets,
    and every schedule's, must be a parameter of the class, and must be in the config built."""
    row = SAMPLERS[name]
    scheduler_class = getattr(diffusers, row.scheduler)
    takes = inspect.signature(scheduler_class.__init__).parameters
    step = inspect.signature(scheduler_class.step).parameters
    for schedule in (None, *row.schedules):
        choice = choose(name, schedule)
        built = build_scheduler(OWN_CLASS, SD_CONFIG, choice)
        assert type(built) is scheduler_class
        for flag, value in choice.scheduler_flags.items():
            assert flag in takes and built.config[flag] == value, (name, schedule, flag)
        assert sampler_of_class(row.scheduler, dict(built.config)) is row
        assert schedule_of_config(dict(built.config)) == schedule
    assert row.evaluations_per_step == scheduler_class.order
    assert row.takes_eta == ("eta" in step)
    if row.draws_noise:
        assert "generator" in step  # the pipeline hands each item's generator to it
    # A schedule is left out only where the class has no flag for it, or where it goes wrong (PLMS),
    # or where the class sets its own timesteps (LCM, TCD).
    for schedule, flag in (("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas")):
        assert (schedule in row.schedules) == (flag in takes and name not in ("lcm", "tcd")), (name, schedule)
    assert ("trailing" in row.schedules) == (
        "timestep_spacing" in takes and name not in ("pndm", "lcm", "tcd")
    )


def test_the_checkpoint_schedulers_a_sampler_may_replace_are_diffusers_sd_ones() -> None:
    karras = {member.name for member in KarrasDiffusionSchedulers}
    assert karras | {"LCMScheduler", "TCDScheduler"} == SD_SCHEDULERS


def test_every_name_of_every_tool_resolves_to_one_row_and_schedule() -> None:
    names = {
        "DPM++ 2M Karras": ("dpmpp_2m", "karras"),  # A1111
        "DPM++ 2M": ("dpmpp_2m", None),
        "dpm++ 2m sde karras": ("dpmpp_2m_sde", "karras"),
        "Euler a": ("euler_a", None),
        "DPM2 a Karras": ("kdpm_2_a", "karras"),
        "PLMS": ("pndm", None),
        "UniPC": ("unipc", None),
        "uni_pc": ("unipc_bh1", None),
        "euler_ancestral": ("euler_a", None),  # ComfyUI
        "dpm_2": ("kdpm_2", None),
        "dpmpp_2m_sde_gpu": ("dpmpp_2m_sde", None),
        "uni_pc_bh2": ("unipc", None),
        "dpmpp_2m_k": ("dpmpp_2m", "karras"),  # InvokeAI
        "kdpm_2_a_k": ("kdpm_2_a", "karras"),
        "tcd": ("tcd", None),
        "EulerAncestralDiscreteScheduler": ("euler_a", None),  # diffusers
        "DPMSolverMultistepScheduler": ("dpmpp_2m", None),
    }
    for name, expected in names.items():
        choice = choose(name)
        assert (choice.sampler.name, choice.schedule) == expected, name
    assert (choose("dpmpp_2m", "karras").schedule, choose("euler", "sgm_uniform").schedule) == (
        "karras",
        "trailing",
    )
    assert choose("euler", "Normal").schedule is None
    flags = SchedulerConfig(
        scheduler="DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", use_karras_sigmas=True
    )
    assert (choose(flags).sampler.name, choose(flags).schedule) == ("dpmpp_2m_sde", "karras")
    bh1 = SchedulerConfig(scheduler="UniPCMultistepScheduler", solver_type="bh1", timestep_spacing="trailing")
    assert (choose(bh1).sampler.name, choose(bh1).schedule) == ("unipc_bh1", "trailing")
    # No name stands for two rows: each row's names all resolve to it.
    for row in SAMPLERS.values():
        for alias in (row.name, *row.a1111, *row.comfyui, *row.invokeai):
            assert choose(alias).sampler is row, alias


@pytest.mark.parametrize(
    ("sampler", "schedule", "message"),
    [
        ("DPM fast", None, "sampler: 'DPM fast' has no diffusers equivalent here; samplers: ddim, ddpm"),
        ("dpmpp_2m_karras", None, "did you mean 'dpmpp_2m_k'?"),
        ("DPM++ SDE Karras", None, "seeded once per call"),
        ("LMS", None, "needs scipy"),
        ("dpmpp_2m", "beta", "schedule: 'beta': diffusers' use_beta_sigmas needs scipy"),
        ("dpmpp_2m", "ddim_uniform", "schedules: karras, exponential, trailing"),
        ("Euler a", "karras", "schedule: euler_a takes no karras schedule (it takes trailing)"),
        ("lcm", "trailing", "schedule: lcm takes no trailing schedule (it takes none: it sets its own"),
        ("DPM++ 2M Karras", "exponential", "the sampler 'DPM++ 2M Karras' is karras already"),
        ("pndm", "trailing", "pndm takes no trailing schedule"),
    ],
)
def test_names_without_a_working_diffusers_equivalent_are_refused_with_what_exists(
    sampler: str, schedule: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=None) as refused:
        choose(sampler, schedule)
    assert message in str(refused.value)


def test_class_flags_that_name_no_row_are_refused() -> None:
    with pytest.raises(ValueError, match="no sampler here is DDIMScheduler"):
        choose(SchedulerConfig(scheduler="DDIMScheduler", algorithm_type="sde-dpmsolver++"))
    with pytest.raises(ValueError, match="set one of"):
        choose(
            SchedulerConfig(
                scheduler="EulerDiscreteScheduler", use_karras_sigmas=True, timestep_spacing="trailing"
            )
        )
    assert schedule_named("SGM Uniform") == "trailing"


def test_each_presets_sampler_and_schedule_are_in_the_table() -> None:
    for preset in PRESETS.values():
        choice = choose(preset.sampler, preset.schedule)
        assert preset.steps_range[0] <= preset.steps <= preset.steps_range[1]
        assert preset.guidance_range[0] <= preset.guidance_scale <= preset.guidance_range[1]
        assert preset.eta is None or choice.sampler.takes_eta


# -- the samplers in diffusers' pipelines


@pytest.mark.slow  # about 20 s of CPU for the whole grid
@pytest.mark.parametrize(("name", "schedule"), CHOICES)
def test_every_sampler_reaches_the_image_wherever_it_is_not_refused(name: str, schedule: str | None) -> None:
    """Over steps x strength and text2img: not refused, the pipeline ends at x0, in loop_length UNet
    calls (once a step, twice for Heun and DPM2 but the first, once more for PLMS)."""
    row = SAMPLERS[name]
    run = Run(choose(name, schedule))
    for steps, strength in grid():
        if run.problem(steps, strength) is not None:
            continue
        distance, rows = run.distance(steps, strength)
        assert distance <= REACHED, (name, schedule, steps, strength, distance)
        assert rows == loop_length(row, steps, strength), (name, schedule, steps, strength)


def test_classifier_free_guidance_doubles_the_unet_rows() -> None:
    run = Run(choose("heun"))
    _, rows = run.distance(10, 0.5, guidance=7.5)
    assert rows == 2 * loop_length(SAMPLERS["heun"], 10, 0.5) == 2 * 9


def test_the_checkpoints_own_scheduler_is_checked_too() -> None:
    """tiny-sd's DDIM, run with no sampler named: its 1-step text2img starts at timestep 1."""
    run = Run(None)
    assert run.problem(1, None) is not None and "timestep 1 of 1000" in str(run.problem(1, None))
    distance, _ = run.distance(1, None)
    assert distance > REACHED
    assert run.problem(2, None) is None and run.distance(2, None)[0] <= REACHED


def test_karras_duplicate_timesteps_do_not_break_img2img() -> None:
    """diffusers#5687: at many steps the Karras sigmas' smallest round to the same timesteps, and
    img2img at a low strength could fail on them. diffusers starts img2img at an index
    (set_begin_index), not at a timestep it looks up: the duplicates are there, and the image is
    reached, so imgjobs refuses nothing here."""
    for name in ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2s", "deis", "unipc", "kdpm_2", "kdpm_2_a"):
        run = Run(choose(name, "karras"))
        run.img2img.scheduler.set_timesteps(100)
        timesteps = run.img2img.scheduler.timesteps.tolist()
        assert len(set(timesteps)) < len(timesteps), (name, timesteps[-8:])
        for strength in (0.05, 0.1):
            assert run.problem(100, strength) is None
            assert run.distance(100, strength)[0] <= REACHED, (name, strength)


def test_dpm_singlestep_reaches_the_image_at_every_strength() -> None:
    """DPM++ singlestep alternates first- and second-order steps; an img2img may start between the
    two. Every steps x strength of 1-12 steps reaches the image."""
    for schedule in (None, "karras"):
        run = Run(choose("dpmpp_2s", schedule))
        for steps in range(1, 13):
            for run_steps in range(1, steps + 1):
                strength = min(run_steps / steps + 1e-6, 1.0)
                assert run.problem(steps, strength) is None
                assert run.distance(steps, strength)[0] <= REACHED, (schedule, steps, strength)


def test_kdpm2_with_odd_step_counts_reaches_the_image() -> None:
    """diffusers#3116: KDPM2 img2img made latent noise where its interleaved timesteps had an odd
    length (30 steps at strength 0.5). Fixed upstream (#3128): odd and even counts all run right."""
    for name in ("kdpm_2", "kdpm_2_a"):
        run = Run(choose(name))
        for steps in (30, 31):
            for strength in (0.5, 0.7):
                assert run.problem(steps, strength) is None
                assert run.distance(steps, strength)[0] <= REACHED, (name, steps, strength)


def test_plms_is_refused_where_it_goes_wrong() -> None:
    run = Run(choose("pndm"))
    for steps, strength in ((2, 0.5), (3, 0.7), (4, 0.5), (10, 0.25)):  # 1 of 2 steps, or 2 of more
        assert run.problem(steps, strength) is not None
        assert run.distance(steps, strength)[0] > REACHED
    trailing = Run(None, sd_config(timestep_spacing="trailing"))
    plms = Run(choose("pndm"), sd_config(timestep_spacing="trailing"))
    assert plms.problem(3, 0.4) is not None and "trailing schedule" in str(plms.problem(3, 0.4))
    assert plms.distance(3, 0.4)[0] > REACHED
    assert trailing.problem(3, 0.4) is None  # the checkpoint's own DDIM is fine there


def test_deis_and_unipc_bh1_with_sigma_schedules_at_one_step_are_refused() -> None:
    for name in ("deis", "unipc_bh1"):
        for schedule in ("karras", "exponential"):
            run = Run(choose(name, schedule))
            assert run.problem(1, None) is not None
            assert run.distance(1, None)[0] > REACHED, (name, schedule)


def test_unipc_bh1_ends_at_the_smallest_sigma_since_diffusers_divides_by_zero_at_zero() -> None:
    plain = Run(None)
    plain.img2img.scheduler = diffusers.UniPCMultistepScheduler.from_config(SD_CONFIG, solver_type="bh1")
    assert math.isnan(plain.distance(10, 0.5)[0])
    ours = Run(choose("unipc_bh1"))
    assert ours.distance(10, 0.5)[0] <= REACHED


def test_lcm_and_tcd_are_refused_past_their_original_steps() -> None:
    for name in ("lcm", "tcd"):
        run = Run(choose(name))
        assert run.problem(60, 0.5) is not None and run.problem(50, 0.5) is None
        with pytest.raises(ValueError, match="original_steps"):
            run.distance(60, 0.5)
