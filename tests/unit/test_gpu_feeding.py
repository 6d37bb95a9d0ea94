"""The host work between pipeline calls, moved off the thread that drives the GPU, keeps every item's
output: images become uint8 tensors on the I/O threads and the pipeline's floats on the device (by a
table made with diffusers' own functions), a call's images are encoded as one batch with each row's
sample drawn from its own generator (each generator left as diffusers' per-item encode leaves it), a
call's writes run side by side, and the UNet's time is clocked for the chunk's unet_share. Tiny models,
CPU, fp32; the stage equality tests (test_stage_equality.py, test_img2img_stage.py) compare the
outputs with diffusers."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import redis
import torch
from diffusers import (
    AutoPipelineForText2Image,
    ControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from prometheus_client import REGISTRY

from jobs.embedded import EmbeddedRedis
from jobstate import layout
from jobstate.storage import LocalStorage
from kits.helpers import local_model, stage_plan, write_image
from schemas.errors import StorageError
from schemas.job import Defaults, Item, ResolvedParams
from schemas.registry import BUILTIN_MODELS
from schemas.settings import Settings
from tests.chunkkit import harness, watched
from workers.events import ChunkInfo, EngineEvents, subscribed
from workers.imageio import image_tensor
from workers.models import LoadedModel
from workers.observability import Observability
from workers.stages import inputs as inputs_module
from workers.stages.common import StageBatch
from workers.stages.img2img import run_img2img
from workers.stages.inputs import device_images, init_latents
from workers.stages.text2img import run_text2img
from workers.tiny_models import (
    write_tiny_controlnet_depth,
    write_tiny_kandinsky22,
    write_tiny_sd,
    write_tiny_sdxl_refiner,
)
from workers.unet_clock import UnetClock

CPU = torch.device("cpu")
PROMPTS = ["a cat wizard", "astronaut in a jungle", ""]
NEGATIVES: list[str | None] = ["ugly", None, "blurry"]
SEEDS = [7, 123, 2**40]


def images(count: int, size: tuple[int, int] = (32, 32), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    width, height = size
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


def generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in SEEDS]


def encode_sizes(vae: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of each vae.encode call from now on."""
    sizes: list[int] = []
    encode = vae.encode

    def counted(image: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sizes.append(image.shape[0])
        return encode(image, *args, **kwargs)

    monkeypatch.setattr(vae, "encode", counted)
    return sizes


# -- no model ------------------------------------------------------------------------------------------


def test_the_device_gets_the_floats_diffusers_preprocessing_makes_bit_for_bit() -> None:
    """Every 8-bit level, through the table, equals VaeImageProcessor.preprocess's float32: a plain
    x * (1 / 255), as a GPU divides by a scalar, differs in 111 of the 256 levels."""
    ramp = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(8, 32, 1).repeat(3, axis=2))
    batch = [ramp, *images(2, (32, 8))]
    pixels = [image_tensor(image) for image in batch]
    assert pixels[1].dtype == torch.uint8 and pixels[1].shape == (3, 8, 32)
    assert torch.equal(pixels[1], torch.from_numpy(np.array(batch[1])).permute(2, 0, 1))

    preprocessed = VaeImageProcessor(vae_scale_factor=8).preprocess(batch)
    ours = device_images(pixels, CPU, torch.float32, normalize=True)
    assert ours.dtype == torch.float32 and torch.equal(ours, preprocessed)
    # prepare_latents casts the image to the prompt embeddings' dtype: the table gives the same values.
    assert torch.equal(device_images(pixels, CPU, torch.bfloat16, normalize=True), preprocessed.bfloat16())
    # ControlNet's control images stay in [0, 1].
    control = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False).preprocess(batch)
    assert torch.equal(device_images(pixels, CPU, torch.float32, normalize=False), control)


def test_the_clock_times_the_unets_calls_from_outside_and_leaves_no_hook() -> None:
    class Slow(torch.nn.Module):  # type: ignore[misc]
        def forward(self, sample: torch.Tensor) -> torch.Tensor:
            time.sleep(0.02)
            return sample

    pipeline = SimpleNamespace(unet=Slow())
    with UnetClock(pipeline, cuda=False) as clock:
        for _ in range(3):
            pipeline.unet(torch.zeros(1))
    pipeline.unet(torch.zeros(1))  # after the block: not counted
    assert clock.calls == 3 and clock.seconds() >= 0.06
    assert not pipeline.unet._forward_pre_hooks and not pipeline.unet._forward_hooks
    with UnetClock(SimpleNamespace(), cuda=False) as none:  # a CPU stage's model has no pipeline
        pass
    assert none.seconds() == 0.0


def test_the_workers_metrics_and_chunk_log_carry_the_unet_share(caplog: pytest.LogCaptureFixture) -> None:
    info = ChunkInfo("job", "job-c0", "unet-share-model", "s0-img2img", items=4, delivery=1)
    caplog.set_level(logging.INFO, logger="imgjobs.worker")
    Observability().chunk_done(info, 2.0, 1.5, 1.2)
    labels = {"model": "unet-share-model"}
    assert REGISTRY.get_sample_value("imgjobs_unet_seconds_total", labels) == pytest.approx(1.2)
    assert REGISTRY.get_sample_value("imgjobs_unet_share", labels) == pytest.approx(1.2 / 60)
    (record,) = [r for r in caplog.records if r.getMessage().startswith("chunk job-c0")]
    assert "duty cycle 75%" in record.getMessage() and "unet share 60%" in record.getMessage()
    assert record.__dict__["unet_share"] == 0.6 and record.__dict__["unet_s"] == 1.2


def test_the_workers_metrics_count_chunk_runs_and_retries() -> None:
    info = ChunkInfo("job", "job-c0", "chunk-count-model", "s0-img2img", items=2, delivery=1)
    retried = REGISTRY.get_sample_value("imgjobs_chunk_retries_total") or 0.0
    observed = Observability()
    observed.chunk_started(info)
    observed.chunk_retried("job-c0", StorageError("injected: storage went away"), 1.0)
    observed.chunk_started(replace(info, delivery=2))
    labels = {"model": "chunk-count-model", "stage": "s0-img2img"}
    assert REGISTRY.get_sample_value("imgjobs_chunks_total", labels) == 2.0
    assert REGISTRY.get_sample_value("imgjobs_chunk_retries_total") == retried + 1


class MeetingPuts(LocalStorage):
    """Local storage whose first two output writes wait for each other: they must run side by side."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.barrier = threading.Barrier(2, timeout=10)
        self.outputs = 0
        self.lock = threading.Lock()

    def put(self, key: str, data: bytes, content_type: str) -> str:
        if not key.startswith(f"{layout.PARTS}/"):
            with self.lock:
                self.outputs += 1
                first_two = self.outputs <= 2
            if first_two:
                self.barrier.wait()  # BrokenBarrierError if the other never comes
        return super().put(key, data, content_type)


def test_a_calls_outputs_are_written_side_by_side(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    """The last call's writes are what a chunk waits for at its end, before the next chunk can start:
    its items are written on the I/O threads together, not one after another on one thread."""
    rows = [
        Item(id=item_id, image=str(write_image(tmp_path / "in" / f"{item_id}.png"))) for item_id in ("a", "b")
    ]
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    job = harness(
        client,
        rows,
        tmp_path / "out",
        model=LoadedModel("cpu", BUILTIN_MODELS["cpu"].model_copy(update={"max_batch": 2})),
        settings=Settings(io_threads=2),
        storage=MeetingPuts(tmp_path / "out" / "job"),
    )
    job.run_all()
    assert [result.status for result in job.results().values()] == ["succeeded", "succeeded"]


# -- tiny models ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("feeding")
    return {
        "sd": write_tiny_sd(root / "tiny-sd"),
        "sdxl": write_tiny_sdxl_refiner(root / "tiny-sdxl-refiner"),
        "controlnet": write_tiny_controlnet_depth(root / "tiny-controlnet-depth"),
        "kandinsky": write_tiny_kandinsky22(root / "tiny-kandinsky22"),
    }


def direct_pipeline(family: str, folders: dict[str, Path]) -> Any:
    if family == "sd":
        pipeline = StableDiffusionImg2ImgPipeline.from_pretrained(folders["sd"])
    elif family == "controlnet":
        pipeline = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
            folders["sd"], controlnet=ControlNetModel.from_pretrained(folders["controlnet"])
        )
    else:
        pipeline = StableDiffusionXLImg2ImgPipeline.from_pretrained(folders["sdxl"])
        # SDXL's own normalisation of latents, which the refiner's real VAE does not have, is encoded too.
        pipeline.vae.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sdxl", "controlnet"])
def test_one_encode_of_the_batch_leaves_each_generator_as_the_pipelines_per_item_encode(
    family: str, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline's prepare_latents on the images (one encode per item, each sample from its item's
    generator, then the noise) against init_latents (one encode of the batch) and the same
    prepare_latents on its latents: the generators end in the same state, so the noise is the same,
    and the noised latents equal up to the batched encode's rounding."""
    pipeline = direct_pipeline(family, folders)
    batch = StageBatch(prompts=PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, images=images(3))
    pipeline.scheduler.set_timesteps(10)
    timestep = pipeline.scheduler.timesteps[3:4].repeat(3)
    sizes = encode_sizes(pipeline.vae, monkeypatch)

    per_item = generators()
    preprocessed = pipeline.image_processor.preprocess(batch.images)
    with torch.inference_mode():
        theirs = pipeline.prepare_latents(preprocessed, timestep, 3, 1, torch.float32, CPU, per_item)
    assert sizes == [1, 1, 1]

    batched = generators()
    encoded = init_latents(pipeline, batch, batched)
    assert encoded is not None and sizes[3:] == [3]
    with torch.inference_mode():
        ours = pipeline.prepare_latents(encoded, timestep, 3, 1, torch.float32, CPU, batched)
    assert sizes[3:] == [3], "the pipeline took the latents as they are"
    for mine, reference in zip(batched, per_item, strict=True):
        assert torch.equal(mine.get_state(), reference.get_state())
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (ours[0] - ours[1]).abs().max() > 0.1, "the rows differ, so the comparison means something"


@pytest.mark.slow
def test_img2img_stages_encode_once_where_the_pipeline_fits(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    params = ResolvedParams(strength=0.75, guidance_scale=7.5, steps=4, size=(32, 32))
    batch = StageBatch(
        prompts=PROMPTS,
        negative_prompts=NEGATIVES,
        seeds=SEEDS,
        images=images(3),
        control_images=images(3, seed=1),
    )
    sd = local_model("tiny-sd", folders["sd"])
    controlnet = local_model("tiny-controlnet-depth", folders["controlnet"])
    sdxl = local_model("tiny-sdxl-refiner", folders["sdxl"])
    plans = [
        (sd, stage_plan({"type": "img2img"}, sd)),
        (sd, stage_plan({"type": "img2img", "controlnet": controlnet.name}, sd, controlnet=controlnet)),
        (sdxl, stage_plan({"type": "img2img"}, sdxl)),
    ]
    for reference, plan in plans:
        model = LoadedModel(reference.name, reference.entry)
        sizes = encode_sizes(model.pipeline.vae, monkeypatch)  # shared by the ControlNet pipeline
        output = run_img2img(model, plan, params, batch)
        assert output.images is not None and output.images.shape == (3, 32, 32, 3)
        assert sizes == [3], plan.name


@pytest.mark.slow
def test_kandinsky22_text2img_keeps_its_own_output_conversion(folders: dict[str, Path]) -> None:
    """Kandinsky 2.2's text2img decoder leaves output_type="pt" images in [-1, 1]: it is asked for "np",
    and gives what the combined pipeline gives for each item alone."""
    reference = local_model("tiny-kandinsky22", folders["kandinsky"])
    model = LoadedModel(reference.name, reference.entry)
    plan = stage_plan({"type": "text2img"}, reference)
    params = ResolvedParams(guidance_scale=4.0, steps=4, size=(64, 64))
    batch = StageBatch(prompts=PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS)
    ours = run_text2img(model, plan, params, batch).images
    assert ours is not None and ours.min() >= 0
    direct = AutoPipelineForText2Image.from_pretrained(folders["kandinsky"])
    direct.set_progress_bar_config(disable=True)
    for index in range(3):
        alone = direct(
            prompt=PROMPTS[index],
            negative_prompt=NEGATIVES[index],
            guidance_scale=4.0,
            num_inference_steps=4,
            width=64,
            height=64,
            generator=torch.Generator().manual_seed(SEEDS[index]),
            output_type="np",
        ).images[0]
        # As for Kandinsky's img2img (test_stage_equality): its decoder amplifies batch rounding.
        np.testing.assert_allclose(ours[index], alone, atol=5e-3, rtol=0)


class ChunkTimes(EngineEvents):
    def __init__(self) -> None:
        self.chunks: list[tuple[float, float, float]] = []

    def chunk_done(self, chunk: ChunkInfo, elapsed_s: float, busy_s: float, unet_s: float) -> None:
        self.chunks.append((elapsed_s, busy_s, unet_s))


@pytest.mark.slow
def test_a_chunk_converts_images_on_the_io_threads_and_reports_its_unet_time(
    folders: dict[str, Path], redis_server: EmbeddedRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage gets each image already as its uint8 tensor, made where it was decoded (on the I/O
    threads), and converts none itself."""
    handed: list[StageBatch] = []

    def not_on_the_gpus_thread(image: Image.Image, pinned: bool = False) -> torch.Tensor:
        raise AssertionError("the stage converted an image the I/O threads had not")

    monkeypatch.setattr(inputs_module, "image_tensor", not_on_the_gpus_thread)
    rows = []
    for index, image in enumerate(images(3)):
        path = tmp_path / "in" / f"i{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        rows.append(Item(id=f"i{index}", image=str(path), prompt=PROMPTS[index], seed=SEEDS[index]))
    reference = local_model("tiny-sd", folders["sd"])
    plan = stage_plan({"type": "img2img", "strength": 0.75, "steps": 4}, reference)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    job = harness(
        client,
        rows,
        tmp_path / "out",
        recipe=[plan],
        model=LoadedModel(reference.name, reference.entry),
        settings=Settings(io_threads=2),
        defaults=Defaults(size=(32, 32)),
    )
    job.stages = watched("img2img", handed.append)
    with subscribed(ChunkTimes()) as times:
        job.run_all()
    assert [result.status for result in job.results().values()] == ["succeeded"] * 3
    (batch,) = handed
    assert batch.images is not None and batch.pixels is not None and len(batch.pixels) == 3
    for image, pixels in zip(batch.images, batch.pixels, strict=True):
        assert not pixels.is_pinned(), "no pinned memory without a GPU"
        assert torch.equal(pixels, image_tensor(image))
    ((elapsed, busy, unet),) = times.chunks
    # On the CPU the UNet runs inside the calls, which it does not fill (text encoder, VAE, scheduler).
    assert 0 < unet < busy <= elapsed
