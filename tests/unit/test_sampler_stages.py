"""Every sampler of the table through our img2img and text2img stages on the tiny SD model (CPU, fp32),
against diffusers called directly for each item alone with the same scheduler and seed; what a
worker's resident model does with its schedulers (built once each, from the checkpoint's own config,
switched only when a chunk's sampler changes, never shared between pipelines); and a few-step preset
with its adapter (a tiny random LoRA standing in for LCM-LoRA, which the tests cannot download)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from jobs.manifest import validate_job
from jobs.registry import Registry
from kits.helpers import local_model, stage_plan, write_job
from schemas.errors import StageError
from schemas.job import Defaults, Item, ResolvedParams, resolve_params
from schemas.samplers import SAMPLERS, choose
from workers.events import EngineEvents, subscribed
from workers.models import LoadedModel
from workers.stages.common import StageBatch, StageOutput
from workers.stages.img2img import run_img2img
from workers.stages.text2img import run_text2img
from workers.tiny_models import sd_img2img_pipeline, tiny_sd_vae, write_tiny_lora

pytestmark = pytest.mark.slow

PROMPTS = ["a cat wizard", "astronaut in a jungle"]
NEGATIVES: list[str | None] = ["ugly", None]
SEEDS = [7, 2**40]
GUIDANCE = 7.5
ATOL = 1e-4  # a batched call sums in another order than a single one
# steps x strength: 1 of 1 (the smallest schedule), 1 of 4 (the smallest strength giving a step), 3 of 4.
IMG2IMG = [(1, 1.0), (4, 0.25), (4, 0.75)]
TEXT2IMG = [2]  # 1 step is refused on tiny-sd's leading spacing; it runs below with schedule trailing
ETA = 0.3  # DDIM and TCD add noise back with it: each item's generator's


def sample(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8"))


IMAGES = [sample(1), sample(2)]


class Tiny:
    """tiny-sd loaded once as a worker loads it, and as diffusers loads it for direct calls."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.resolved = local_model("tiny-sd", folder)
        self.model = LoadedModel("tiny-sd", self.resolved.entry)
        self.img2img = StableDiffusionImg2ImgPipeline.from_pretrained(folder)
        self.text2img = StableDiffusionPipeline.from_pretrained(folder)
        for pipeline in (self.img2img, self.text2img):
            pipeline.set_progress_bar_config(disable=True)
        self.own_config = self.img2img.scheduler.config  # not the last swap's: it may say trailing
        self.schedulers: dict[tuple[str, str, str | None], Any] = {}

    def ours(self, spec: dict[str, Any], params: ResolvedParams) -> tuple[StageOutput, int]:
        """Our stage's batched call of both items, and the UNet rows it evaluated."""
        plan = stage_plan(spec, self.resolved)
        img2img = spec["type"] == "img2img"
        batch = StageBatch(PROMPTS, NEGATIVES, SEEDS, images=IMAGES if img2img else None)
        run = run_img2img if img2img else run_text2img
        with counted(self.model.pipeline.unet) as rows:
            output = run(self.model, plan, params, batch)
        return output, rows[0]

    def direct(self, index: int, spec: dict[str, Any], params: ResolvedParams) -> np.ndarray:
        """diffusers as its documentation shows a sampler: the scheduler from the pipeline's config
        with the sampler's flags, one item, its own generator."""
        img2img = spec["type"] == "img2img"
        pipeline = self.img2img if img2img else self.text2img
        key = (spec["type"], spec["sampler"], spec.get("schedule"))
        if key not in self.schedulers:  # some take a second to build (DPM2 sets 1000 timesteps)
            choice = choose(spec["sampler"], spec.get("schedule"))
            scheduler_class = getattr(diffusers, choice.sampler.scheduler)
            self.schedulers[key] = scheduler_class.from_config(self.own_config, **choice.scheduler_flags)
        pipeline.scheduler = self.schedulers[key]
        kwargs: dict[str, Any] = {
            "prompt": PROMPTS[index],
            "negative_prompt": NEGATIVES[index],
            "guidance_scale": params.guidance_scale,
            "num_inference_steps": params.steps,
            "generator": torch.Generator().manual_seed(SEEDS[index]),
            "output_type": "np",
        }
        if "eta" in spec:
            kwargs["eta"] = spec["eta"]
        if img2img:
            kwargs |= {"image": IMAGES[index], "strength": params.strength}
        else:
            kwargs |= {"width": 32, "height": 32}
        images: np.ndarray = pipeline(**kwargs).images[0]
        return images


class counted:
    """The rows a module's forward sees while the block runs: [rows]."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.rows = [0]

    def __enter__(self) -> list[int]:
        def count(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            sample = args[0] if args else kwargs["sample"]
            self.rows[0] += sample.shape[0]

        self.handle = self.module.register_forward_pre_hook(count, with_kwargs=True)
        return self.rows

    def __exit__(self, *_: object) -> None:
        self.handle.remove()


@pytest.fixture(scope="module")
def tiny(tiny_sd_dir: Path) -> Tiny:
    return Tiny(tiny_sd_dir)


def cases() -> Iterator[Any]:
    for name, row in SAMPLERS.items():
        for steps, strength in IMG2IMG:
            yield pytest.param(
                name, None, "img2img", steps, strength, id=f"{name}-img2img-{steps}x{strength}"
            )
        for steps in TEXT2IMG:
            yield pytest.param(name, None, "text2img", steps, None, id=f"{name}-text2img-{steps}")
        if "trailing" in row.schedules:
            yield pytest.param(name, "trailing", "text2img", 1, None, id=f"{name}-trailing-text2img-1")
        if "karras" in row.schedules:
            yield pytest.param(name, "karras", "img2img", 4, 0.5, id=f"{name}-karras-img2img-4x0.5")


@pytest.mark.parametrize(("name", "schedule", "kind", "steps", "strength"), list(cases()))
def test_each_item_gets_what_diffusers_gives_it_alone_with_the_same_sampler_and_seed(
    tiny: Tiny, name: str, schedule: str | None, kind: str, steps: int, strength: float | None
) -> None:
    """Ancestral and SDE samplers draw noise at every step: each item's from its own generator, so a
    batched item equals the item alone. The UNet rows evaluated are what the record says."""
    spec: dict[str, Any] = {"type": kind, "sampler": name}
    if schedule:
        spec["schedule"] = schedule
    if SAMPLERS[name].takes_eta:
        spec["eta"] = ETA
    params = ResolvedParams(
        size=(32, 32),
        steps=steps,
        strength=strength,
        guidance_scale=GUIDANCE,
        sampler=name,
        schedule=schedule,
    )
    output, rows = tiny.ours(spec, params)
    assert output.images is not None and np.isfinite(output.images).all()
    for index in range(len(SEEDS)):
        alone = tiny.direct(index, spec, params)
        np.testing.assert_allclose(output.images[index], alone, atol=ATOL, rtol=0, err_msg=f"item {index}")
    assert np.abs(output.images[0] - output.images[1]).max() > 1e-3, "items must differ to mean much"
    ran = tiny.model.ran(params)
    assert (ran.sampler, ran.schedule) == (name, schedule)
    assert ran.unet_evaluations is not None and rows == len(SEEDS) * ran.unet_evaluations


class SchedulerEvents(EngineEvents):
    def __init__(self) -> None:
        self.built: list[str] = []
        self.switched: list[tuple[str, str]] = []

    def scheduler_built(self, model: str, sampler: str, pipeline: str) -> None:
        self.built.append(sampler)

    def sampler_switched(self, model: str, sampler: str, pipeline: str) -> None:
        self.switched.append((sampler, pipeline))


def params_of(
    sampler: str | None = None, schedule: str | None = None, strength: float | None = 0.5
) -> ResolvedParams:
    return ResolvedParams(
        size=(32, 32), steps=4, strength=strength, guidance_scale=GUIDANCE, sampler=sampler, schedule=schedule
    )


def run(model: LoadedModel, resolved: Any, params: ResolvedParams) -> np.ndarray:
    kind = "img2img" if params.strength is not None else "text2img"
    plan = stage_plan({"type": kind}, resolved)
    batch = StageBatch(PROMPTS, NEGATIVES, SEEDS, images=IMAGES if kind == "img2img" else None)
    stage = run_img2img if kind == "img2img" else run_text2img
    images = stage(model, plan, params, batch).images
    assert images is not None
    return images


def test_a_worker_builds_each_samplers_scheduler_once_and_switches_only_when_it_changes(
    tiny_sd_dir: Path,
) -> None:
    resolved = local_model("tiny-sd", tiny_sd_dir)
    model = LoadedModel("tiny-sd", resolved.entry)
    own = model.pipeline.scheduler
    chunks: list[tuple[str | None, str | None]] = [("euler_a", "trailing"), ("euler_a", "trailing")]
    chunks += [("dpmpp_2m", "karras"), ("euler_a", "trailing"), (None, None), ("dpmpp_2m", "karras")]
    chunks += [("dpmpp_2m", None)]
    ran: dict[tuple[str | None, str | None], Any] = {}
    with subscribed(SchedulerEvents()) as events:
        for sampler, schedule in chunks:
            run(model, resolved, params_of(sampler, schedule))
            ran[(sampler, schedule)] = model.pipeline.scheduler
    assert events.built == ["euler_a trailing", "dpmpp_2m karras", "dpmpp_2m"]
    switched = [
        "euler_a trailing",
        "dpmpp_2m karras",
        "euler_a trailing",
        "own",
        "dpmpp_2m karras",
        "dpmpp_2m",
    ]
    assert events.switched == [(sampler, "StableDiffusionImg2ImgPipeline") for sampler in switched]
    # Each was built from the checkpoint's config as loaded (leading spacing), not from the one the
    # pipeline ran before it (trailing, then Karras).
    spacing = {key: scheduler.config.timestep_spacing for key, scheduler in ran.items()}
    assert spacing == {
        ("euler_a", "trailing"): "trailing",
        ("dpmpp_2m", "karras"): "leading",
        (None, None): "leading",
        ("dpmpp_2m", None): "leading",
    }
    assert ran[("dpmpp_2m", None)].config.use_karras_sigmas is False
    run(model, resolved, params_of())
    assert model.pipeline.scheduler is own and dict(own.config) == dict(
        diffusers.DDIMScheduler.from_pretrained(tiny_sd_dir / "scheduler").config
    )


def test_a_sampler_does_not_inherit_what_the_checkpoints_own_scheduler_chose(tmp_path: Path) -> None:
    """A checkpoint that ships DPM++ 2M SDE Karras runs plain DPM++ 2M when asked for dpmpp_2m; its own
    scheduler comes back as it was."""
    torch.manual_seed(0)
    pipeline = sd_img2img_pipeline(tiny_sd_vae())
    shipped = diffusers.DPMSolverMultistepScheduler.from_config(
        pipeline.scheduler.config, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True
    )
    pipeline.scheduler = shipped
    pipeline.save_pretrained(tmp_path / "sde-karras")
    resolved = local_model("sde-karras", tmp_path / "sde-karras")
    model = LoadedModel("sde-karras", resolved.entry)
    assert model.ran(params_of()).sampler == "dpmpp_2m_sde" and model.ran(params_of()).schedule == "karras"
    run(model, resolved, params_of("dpmpp_2m"))
    config = model.pipeline.scheduler.config
    assert (config.algorithm_type, config.use_karras_sigmas) == ("dpmsolver++", False)
    run(model, resolved, params_of())
    config = model.pipeline.scheduler.config
    assert (config.algorithm_type, config.use_karras_sigmas) == ("sde-dpmsolver++", True)


def test_derived_pipelines_have_schedulers_of_their_own(tiny_sd_dir: Path) -> None:
    """from_pipe hands a derived pipeline the resident one's scheduler; a scheduler keeps per-call
    state, so each pipeline gets its own, and the text2img pipeline made after a swap runs the
    checkpoint's scheduler, not the one swapped in. Two calls at once, one on each, give what each
    gives alone."""
    resolved = local_model("tiny-sd", tiny_sd_dir)
    model = LoadedModel("tiny-sd", resolved.entry)
    run(model, resolved, params_of("euler_a"))
    run(model, resolved, params_of(strength=None))
    assert type(model.text2img().scheduler).__name__ == "DDIMScheduler"
    alone = {
        "img2img": run(model, resolved, params_of("dpmpp_2m_sde")),
        "text2img": run(model, resolved, params_of("dpmpp_2m_sde", strength=None)),
    }
    assert model.text2img().scheduler is not model.pipeline.scheduler
    together: dict[str, np.ndarray] = {}

    def call(kind: str) -> None:
        together[kind] = run(
            model, resolved, params_of("dpmpp_2m_sde", strength=0.5 if kind == "img2img" else None)
        )

    threads = [threading.Thread(target=call, args=(kind,)) for kind in alone]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for kind, images in alone.items():
        np.testing.assert_allclose(together[kind], images, atol=ATOL, rtol=0, err_msg=kind)


def test_a_1_step_text2img_on_a_leading_schedule_is_refused_on_the_worker(tiny: Tiny) -> None:
    with pytest.raises(StageError, match="start at timestep 1 of 1000"):
        tiny.ours({"type": "text2img"}, ResolvedParams(size=(32, 32), steps=1, guidance_scale=GUIDANCE))


def test_the_lcm_preset_runs_lcm_with_its_adapter_at_guidance_1_as_diffusers_does(
    tiny: Tiny, tmp_path: Path, registry: Registry
) -> None:
    lora = write_tiny_lora(tmp_path / "lcm-lora", tiny.folder, seed=3)
    stage = {"type": "img2img", "model": "tiny-sd", "preset": "lcm", "preset_lora": {"source": str(lora)}}
    spec = write_job(tmp_path / "job", [{"id": "a", "image": "https://example.com/a.png"}], stage=stage)
    (plan,) = validate_job(spec, registry).recipe
    assert [adapter.source for adapter in plan.loras] == [str(lora)]
    params = resolve_params(Item(id="a"), plan.spec, Defaults(size=(32, 32)))
    assert (params.sampler, params.steps, params.guidance_scale, params.strength) == ("lcm", 4, 1.0, 0.8)
    batch = StageBatch(PROMPTS, NEGATIVES, SEEDS, images=IMAGES)
    with counted(tiny.model.pipeline.unet) as rows:
        ours = run_img2img(tiny.model, plan, params, batch).images
    assert ours is not None and rows == [2 * 3]  # 3 of 4 steps, no guidance: one row an item a step
    direct = StableDiffusionImg2ImgPipeline.from_pretrained(tiny.folder)
    direct.set_progress_bar_config(disable=True)
    direct.load_lora_weights(lora)
    direct.scheduler = diffusers.LCMScheduler.from_config(direct.scheduler.config)
    for index in range(len(SEEDS)):
        alone = direct(
            prompt=PROMPTS[index],
            negative_prompt=NEGATIVES[index],
            image=IMAGES[index],
            strength=0.8,
            guidance_scale=1.0,
            num_inference_steps=4,
            generator=torch.Generator().manual_seed(SEEDS[index]),
            output_type="np",
        ).images[0]
        np.testing.assert_allclose(ours[index], alone, atol=ATOL, rtol=0, err_msg=f"item {index}")
