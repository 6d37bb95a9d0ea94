"""The GPU throughput options of the registry, on the tiny SD model on the CPU: each keeps the
images the default engine gives, padding to a static batch never changes a real item's output, and
warm-up compiles at load so that chunks of the warmed shape run without compiling again.

Only one test compiles (the tiny UNet, about 30-40 s on two CPU cores); compile_vae is checked as
applied here and run compiled by bench/gpu_throughput.py."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from PIL import Image
from pydantic import ValidationError

from jobs.embedded import EmbeddedRedis
from kits.helpers import PNG_LEVELS, ROUNDING_ATOL, local_model, stage_plan, write_image
from schemas.job import Defaults, Item, ResolvedParams
from schemas.registry import ModelEntry
from tests.chunkkit import harness
from workers.models import COMPILE_CACHE_ENV, LoadedModel, compile_cache_dir
from workers.stages.common import StageBatch, StageOutput, pad_batch, run_static
from workers.stages.img2img import run_img2img
from workers.unet_clock import UnetClock
from workers.warmup import load_model

PARAMS = ResolvedParams(strength=0.8, guidance_scale=7.5, steps=4, size=(32, 32))


def images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")) for _ in range(count)]


BATCH = StageBatch(
    prompts=["a cat wizard", "astronaut in a jungle", ""],
    negative_prompts=[None, "blurry", ""],
    seeds=[7, 123, 2**40],
    images=images(3),
)


def stage(model: LoadedModel, calls: list[int] | None = None) -> Callable[[StageBatch], StageOutput]:
    plan = stage_plan({"type": "img2img"}, local_model(model.name, Path(model.entry.source)))

    def run(batch: StageBatch) -> StageOutput:
        if calls is not None:
            calls.append(len(batch))
        return run_img2img(model, plan, PARAMS, batch, frozenset({"image", "latent"}))

    return run


def load(tiny_sd_dir: Path, **options: Any) -> LoadedModel:
    return load_model("tiny-sd", local_model("tiny-sd", tiny_sd_dir, **options).entry)


@pytest.fixture(scope="module")
def reference(tiny_sd_dir: Path) -> StageOutput:
    """The default engine, unpadded: what every option must keep."""
    return stage(load(tiny_sd_dir))(BATCH)


def close(ours: StageOutput, reference: StageOutput, atol: float) -> None:
    assert ours.images is not None and reference.images is not None
    np.testing.assert_allclose(ours.images, reference.images, atol=atol, rtol=0)
    if ours.latents is not None:
        assert reference.latents is not None
        # Latents are about 10x larger than pixels in [0, 1]; the same relative rounding.
        torch.testing.assert_close(ours.latents, reference.latents, atol=10 * atol, rtol=0)


# -- the registry fields, no model ------------------------------------------------------------------


def test_engine_options_default_off_and_are_validated() -> None:
    entry = ModelEntry(source="x")
    assert not (entry.channels_last or entry.fuse_qkv or entry.compile_vae or entry.warmup)
    assert entry.static_batch is None and entry.warmup_size is None
    with pytest.raises(ValidationError, match="attention: classic"):
        ModelEntry(source="x", fuse_qkv=True, attention="classic")
    with pytest.raises(ValidationError, match="multiples of 8"):
        ModelEntry(source="x", warmup_size=(500, 512))
    with pytest.raises(ValidationError):
        ModelEntry(source="x", static_batch=0)


def test_padding_repeats_the_last_item_and_keeps_every_row_its_own() -> None:
    latents = torch.arange(3 * 2, dtype=torch.float32).reshape(3, 2, 1, 1)
    batch = StageBatch(
        prompts=["a", "b", "c"], negative_prompts=[None, "n", None], seeds=[1, 2, 3], latents=latents
    )
    padded = pad_batch(batch, 5)
    assert len(padded) == 5 and padded.prompts == ["a", "b", "c", "c", "c"]
    assert padded.negative_prompts[3:] == [None, None] and padded.seeds == [1, 2, 3, 3, 3]
    assert padded.latents is not None and torch.equal(padded.latents[3], latents[2])
    assert pad_batch(batch, 3) is batch and pad_batch(batch, 2) is batch

    calls: list[int] = []

    def echo(piece: StageBatch) -> StageOutput:
        calls.append(len(piece))
        assert piece.latents is not None
        return StageOutput(images=piece.latents.numpy().reshape(len(piece), 1, 1, 2), latents=piece.latents)

    for static, expected_calls in ((None, [3]), (4, [4]), (2, [2, 2]), (3, [3])):
        calls.clear()
        output = run_static(echo, batch, static)
        assert calls == expected_calls
        assert output.latents is not None and torch.equal(output.latents, latents)
        assert output.images is not None and output.images.shape == (3, 1, 1, 2)


def test_the_compile_cache_is_persistent_unless_chosen(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    # torch's /tmp default, which torch itself writes into the environment, is not kept.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert compile_cache_dir() == tmp_path / "xdg" / "imgjobs" / "inductor"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert compile_cache_dir() == tmp_path / "xdg" / "imgjobs" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "chosen"))
    assert compile_cache_dir() == tmp_path / "chosen"
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path / "ours"))
    assert compile_cache_dir() == tmp_path / "ours"


# -- on the tiny model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_channels_last_and_fused_qkv_keep_the_outputs(tiny_sd_dir: Path, reference: StageOutput) -> None:
    model = load(tiny_sd_dir, channels_last=True, fuse_qkv=True)
    unet, vae = model.pipeline.unet, model.pipeline.vae
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for processors in (unet.attn_processors, vae.attn_processors):
        assert {type(p).__name__ for p in processors.values()} == {"FusedAttnProcessor2_0"}
    # One matmul instead of three sums in another order: equal up to float rounding.
    close(stage(model)(BATCH), reference, atol=1e-5)


@pytest.mark.slow
def test_static_batch_pads_without_changing_the_real_items(tiny_sd_dir: Path, reference: StageOutput) -> None:
    model = load(tiny_sd_dir, static_batch=4)
    calls: list[int] = []
    padded = run_static(stage(model, calls), BATCH, model.entry.static_batch)
    assert calls == [4]
    assert padded.images is not None and padded.images.shape == (3, 32, 32, 3)
    # Each row has its own generator and rows never mix, but a batch of 4 (or 2 + 2) sums in another
    # order than one of 3: equal up to float rounding (up to 2e-6 measured on AVX-512 with AMX).
    close(padded, reference, atol=ROUNDING_ATOL)
    calls.clear()
    split = run_static(stage(model, calls), BATCH, 2)
    assert calls == [2, 2]
    close(split, reference, atol=ROUNDING_ATOL)


@pytest.mark.slow
def test_the_chunk_path_pads_to_static_batch(
    tiny_sd_dir: Path, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """Three items through the chunk path with static_batch 4 write the PNGs the unpadded engine writes."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    ids = ["a", "b", "c"]
    rows = []
    for seed, item_id in enumerate(ids):
        uri = str(write_image(tmp_path / "in" / f"{item_id}.png", (32, 32), (40 * seed, 90, 200)))
        rows.append(Item(id=item_id, image=uri, prompt=f"prompt {seed}", seed=seed))
    written: dict[str, dict[str, np.ndarray]] = {}
    stage = {"type": "img2img", "strength": 0.8, "guidance_scale": 7.5, "steps": 4}
    for job_id, static in (("plain", None), ("padded", 4)):
        model = load(tiny_sd_dir, static_batch=static)
        job = harness(
            client,
            rows,
            tmp_path / "out",
            recipe=[stage_plan(stage, local_model("tiny-sd", tiny_sd_dir, static_batch=static))],
            model=model,
            job_id=job_id,
            defaults=Defaults(negative_prompt="blurry", size=(32, 32)),
        )
        job.run_all()
        results = job.results()
        assert [r.status for r in results.values()] == ["succeeded"] * 3
        written[job_id] = {i: np.asarray(Image.open(results[i].outputs["s0-img2img"])) for i in ids}
    for item_id in ids:
        difference = written["padded"][item_id].astype(np.int16) - written["plain"][item_id].astype(np.int16)
        assert np.abs(difference).max() <= PNG_LEVELS, item_id


@pytest.mark.slow
def test_warmup_runs_a_batch_at_load(tiny_sd_dir: Path) -> None:
    cold = load(tiny_sd_dir)
    assert cold.warmup_s is None and cold.pipeline.scheduler.num_inference_steps is None
    model = load(tiny_sd_dir, warmup=True, static_batch=2)
    assert model.warmup_s is not None and model.warmup_s > 0
    assert model.native_size() == (32, 32)  # sample size 16 x the tiny VAE's factor 2
    assert model.pipeline.scheduler.num_inference_steps == 4  # the warm-up's call set its timesteps


@pytest.mark.slow
def test_compile_vae_is_applied_lazily(
    tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path / "cache"))
    vae = load(tiny_sd_dir, compile_vae=True).pipeline.vae
    assert vae.encoder._compiled_call_impl is not None and vae.decoder._compiled_call_impl is not None
    assert type(vae.decoder).__name__ == "Decoder"  # compiled in place: the VAE's own module, shared
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache")


@pytest.mark.slow
def test_the_gpu_recipe_compiles_at_warmup_and_keeps_the_outputs(
    tiny_sd_dir: Path, reference: StageOutput, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """compile + static_batch + warmup (+ channels_last, fuse_qkv): the compilation happens at load, a
    chunk of the warmed shape then compiles nothing, and its outputs are the default engine's."""
    from torch._dynamo.utils import counters

    cache = tmp_path / "inductor"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(cache))
    before = counters["stats"]["unique_graphs"]
    options = {"compile": True, "static_batch": 4, "warmup": True, "channels_last": True, "fuse_qkv": True}
    model = load(tiny_sd_dir, **options)
    assert type(model.pipeline.unet).__name__ == "OptimizedModule"
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > before, "the warm-up compiled nothing"
    assert (cache / "fxgraph").is_dir(), "compiled code is not in the persistent cache"

    with UnetClock(model.pipeline, cuda=False) as clock:
        output = run_static(stage(model), BATCH, model.entry.static_batch)
    assert counters["stats"]["unique_graphs"] == compiled, "a chunk of the warmed shape compiled again"
    # Clocked from outside the compiled code: the hooks changed no graph, and saw every step.
    assert clock.calls > 0 and clock.seconds() > 0
    # Inductor fuses kernels, so sums run in another order: equal up to float rounding.
    close(output, reference, atol=1e-4)


@pytest.mark.slow
def test_compile_reaches_kandinskys_decoder(tmp_path: Path) -> None:
    """The combined Kandinsky pipeline runs its decoder sub-pipeline, which must get the compiled UNet;
    its UNet's added k/v projections cannot be fused, which leaves them as they are."""
    from workers.tiny_models import write_tiny_kandinsky22

    folder = write_tiny_kandinsky22(tmp_path / "tiny-kandinsky22")
    entry = local_model("tiny-kandinsky22", folder, compile=True, fuse_qkv=True).entry
    pipeline = LoadedModel("tiny-kandinsky22", entry).pipeline
    assert type(pipeline.decoder_pipe.unet).__name__ == "OptimizedModule"
    assert pipeline.decoder_pipe.unet is pipeline.unet
