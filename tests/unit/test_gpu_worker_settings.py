"""What only a GPU shows, wired and checked on the CPU: the default dtype per device, the allocator and
kernel settings a GPU worker applies at start, each torch.compile (re)compilation as an engine event
(the one inside a chunk with its chunk), and the batches an out-of-memory split runs. They cannot
measure a GPU here; bench/gpu_throughput.py does, where one is lent."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from pydantic import ValidationError

from jobs.embedded import EmbeddedRedis
from kits.helpers import local_model, stage_plan, write_image
from schemas.job import Defaults, Item
from schemas.messages import WORKER_MODEL_ENV, WorkerModel
from schemas.registry import BUILTIN_MODELS, ModelEntry
from schemas.settings import Settings
from tests.chunkkit import harness
from workers import models
from workers.compiles import CompileWatch, watch
from workers.events import ChunkInfo, CompileInfo, EngineEvents, EventHub, emit, subscribed
from workers.models import EXPANDABLE_SEGMENTS, LoadedModel, apply_gpu_settings, resolve_dtype
from workers.stages.common import StageBatch, StageOutput, run_splitting
from workers.warmup import load_model

# -- the default dtype --------------------------------------------------------------------------------


def test_auto_dtype_is_bfloat16_on_gpus_that_have_it_float16_on_older_float32_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entry = ModelEntry(source="x")
    assert entry.dtype == "auto"
    capability = {"cuda:0": (9, 0), "cuda:1": (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[str(device)])
    assert resolve_dtype(entry, "cuda:0") == torch.bfloat16  # Hopper
    assert resolve_dtype(entry, "cuda:1") == torch.float16  # Turing: bfloat16 only emulated
    assert resolve_dtype(entry, "cpu") == torch.float32
    assert resolve_dtype(entry.model_copy(update={"dtype": "float16"}), "cuda:0") == torch.float16
    assert resolve_dtype(entry.model_copy(update={"dtype": "bfloat16"}), "cpu") == torch.float32
    for name in ("sd15", "sdxl-refiner", "kandinsky22", "sd-x4-upscaler"):
        assert BUILTIN_MODELS[name].dtype == "auto", name


# -- the allocator and kernel settings ----------------------------------------------------------------


@pytest.fixture
def torch_flags() -> Iterator[None]:
    """Puts back the process-wide flags the settings change."""
    saved = (
        torch.backends.cudnn.benchmark,
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
    )
    yield
    torch.backends.cudnn.benchmark = saved[0]
    torch.set_float32_matmul_precision(saved[1])
    torch.backends.cudnn.allow_tf32 = saved[2]


def test_the_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert defaults.cuda_expandable_segments and defaults.tf32 and defaults.cudnn_benchmark is None
    monkeypatch.setenv("IMGJOBS_CUDA_EXPANDABLE_SEGMENTS", "false")
    monkeypatch.setenv("IMGJOBS_CUDNN_BENCHMARK", "true")
    monkeypatch.setenv("IMGJOBS_TF32", "0")
    chosen = Settings.from_env()
    assert not chosen.cuda_expandable_segments and chosen.cudnn_benchmark and not chosen.tf32


@pytest.mark.usefixtures("torch_flags")
def test_a_gpu_worker_sets_expandable_segments_cudnn_benchmark_at_static_shapes_and_tf32() -> None:
    environ: dict[str, str] = {}
    gpu = ModelEntry(source="x", device="cuda", static_batch=16)
    applied = apply_gpu_settings(Settings(), gpu, environ)
    assert environ == {"PYTORCH_CUDA_ALLOC_CONF": EXPANDABLE_SEGMENTS}
    assert applied == {"PYTORCH_CUDA_ALLOC_CONF": EXPANDABLE_SEGMENTS, "cudnn_benchmark": True, "tf32": True}
    assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"

    # Shapes that vary: no cuDNN search per shape. TF32 off gives full float32 matrix products back.
    environ = {"PYTORCH_ALLOC_CONF": "max_split_size_mb:512"}  # the operator's own: kept
    varying = gpu.model_copy(update={"static_batch": None})
    applied = apply_gpu_settings(Settings(tf32=False), varying, environ)
    assert environ == {"PYTORCH_ALLOC_CONF": "max_split_size_mb:512"}
    assert applied == {"cudnn_benchmark": False, "tf32": False}
    assert not torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "highest"
    assert apply_gpu_settings(Settings(cudnn_benchmark=True), varying, {})["cudnn_benchmark"] is True


@pytest.mark.usefixtures("torch_flags")
def test_a_cpu_worker_keeps_torchs_defaults() -> None:
    environ: dict[str, str] = {}
    before = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    assert apply_gpu_settings(Settings(), BUILTIN_MODELS["cpu"], environ) == {}
    assert apply_gpu_settings(Settings(), ModelEntry(source="x", device="cpu", static_batch=4), environ) == {}
    assert environ == {} and (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == before


def test_the_worker_applies_them_at_start_before_its_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.runtime import WorkerRuntime

    seen: list[tuple[Settings, ModelEntry, bool]] = []

    def record(settings: Settings, entry: ModelEntry, environ: Any = os.environ) -> dict[str, Any]:
        seen.append((settings, entry, loaded))
        return {}

    loaded = False
    real_init = LoadedModel.__init__

    def load(self: LoadedModel, *args: Any, **kwargs: Any) -> None:
        nonlocal loaded
        loaded = True
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(models, "apply_gpu_settings", record)
    monkeypatch.setattr(LoadedModel, "__init__", load)
    monkeypatch.setenv(
        WORKER_MODEL_ENV, WorkerModel(name="cpu", entry=BUILTIN_MODELS["cpu"]).model_dump_json()
    )
    settings = Settings(broker_url="redis://127.0.0.1:9")  # never connected to here
    WorkerRuntime.start(settings, lambda *_: None, lambda _: None)
    assert seen == [(settings, BUILTIN_MODELS["cpu"], False)]


# -- recompilations as events -----------------------------------------------------------------------


class Compiles(EngineEvents):
    def __init__(self) -> None:
        self.seen: list[tuple[ChunkInfo | None, CompileInfo]] = []

    def compiled(self, chunk: ChunkInfo | None, compilation: CompileInfo) -> None:
        self.seen.append((chunk, compilation))


def test_each_compilation_recompilation_and_fallback_to_eager_is_an_event() -> None:
    """A small compiled module (dynamo with its eager backend: the guards and limits are dynamo's, the
    backend is irrelevant to them): a first compilation, one per new shape with the failed guard as
    its reason, and past the recompile limit a refusal, after which that shape runs uncompiled."""
    torch._dynamo.reset()
    layer = torch.compile(torch.nn.Linear(4, 4), backend="eager", dynamic=False)
    watch = CompileWatch()
    chunk = ChunkInfo(job_id="j", chunk_id="c", model="m", stage="s0-img2img", items=2, delivery=1)
    with subscribed(Compiles()) as listener, torch._dynamo.config.patch(recompile_limit=2):
        layer(torch.ones(1, 4))
        assert watch.report("m", None)[0].reason is None
        layer(torch.ones(1, 4))
        assert watch.report("m", chunk) == [], "no new shape, no compilation"
        layer(torch.ones(2, 4))
        (second,) = watch.report("m", chunk)
        layer(torch.ones(3, 4))
        (refused,) = watch.report("m", chunk)
    assert [(seen_chunk, info.fell_back) for seen_chunk, info in listener.seen] == [
        (None, False),
        (chunk, False),
        (chunk, True),
    ]
    assert second.compile_id == "0/1" and second.reason is not None and "size mismatch" in second.reason
    assert second.model == "m" and second.seconds > 0 and second.function
    assert refused.reason is not None and "expected 2, actual 3" in refused.reason


def test_listeners_belong_to_their_hub_and_a_reset_hub_gets_the_compile_watch_again() -> None:
    """Each hub raises events at its own listeners only, and reset() drops them; the process's compile
    watch, dropped with the others, is subscribed again by the next model that compiles."""
    hub, other = EventHub(), EventHub()
    info = CompileInfo("m", "0/0", "f (x.py:1)", 0.1, None, False)
    with hub.subscribed(Compiles()) as seen:
        hub.compiled(None, info)
        other.compiled(None, info)
        assert seen.seen == [(None, info)]
        hub.reset()
        hub.compiled(None, info)
        assert seen.seen == [(None, info)], "a reset hub has no listener"
    first = watch()
    assert watch() is first and emit.listening(CompileWatch) is first
    emit.reset()
    assert emit.listening(CompileWatch) is None
    again = watch()
    assert emit.listening(CompileWatch) is again


@pytest.mark.slow
def test_a_shape_the_warmup_missed_compiles_inside_its_chunk_and_warmup_guidance_covers_it(
    tiny_sd_dir: Path, redis_server: EmbeddedRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny SD model compiled with static_batch and warm-up: a chunk at guidance 1 (no CFG pair,
    half the UNet's batch) compiles inside the chunk, reported with it; with warmup_guidance [7.5, 1]
    it compiles at load instead. dynamo traces as for inductor; its eager backend keeps it cheap."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager", **kw))
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    rows = [
        Item(id=i, image=str(write_image(tmp_path / "in" / f"{i}.png", (32, 32))), seed=n)
        for n, i in enumerate("ab")
    ]
    stage = {"type": "img2img", "strength": 0.5, "steps": 2, "guidance_scale": 1.0}
    for warmup_guidance, expected_in_chunk in ((None, True), ((7.5, 1.0), False)):
        torch._dynamo.reset()
        ref = local_model(
            "tiny-sd", tiny_sd_dir, compile=True, static_batch=2, warmup=True, warmup_guidance=warmup_guidance
        )
        with subscribed(Compiles()) as listener:
            loaded = load_model("tiny-sd", ref.entry)
            job = harness(
                client,
                rows,
                tmp_path / f"out-{expected_in_chunk}",
                recipe=[stage_plan(stage, ref)],
                model=loaded,
                defaults=Defaults(size=(32, 32)),
                job_id=f"job-{expected_in_chunk}",
            )
            job.run_all()
        at_load = [info for chunk, info in listener.seen if chunk is None]
        in_chunk = [info for chunk, info in listener.seen if chunk is not None]
        assert at_load, "the warm-up compiled"
        assert bool(in_chunk) == expected_in_chunk, listener.seen
        if expected_in_chunk:
            assert all(info.reason for info in in_chunk) and not any(info.fell_back for info in in_chunk)
        assert [r.status for r in job.results().values()] == ["succeeded", "succeeded"]


def test_warmup_guidance_is_validated() -> None:
    assert ModelEntry(source="x", warmup_guidance=(7.5, 1.0)).warmup_guidance == (7.5, 1.0)
    with pytest.raises(ValidationError, match="between 0 and 100"):
        ModelEntry(source="x", warmup_guidance=(-1.0,))
    with pytest.raises(ValidationError):
        ModelEntry(source="x", warmup_guidance=())


# -- out of memory: the halves' shapes ----------------------------------------------------------------


def test_halves_after_running_out_of_memory_run_at_half_the_static_batch_each_time() -> None:
    """At static_batch 8, memory for 2: the 7 items (padded to 8) run as halves padded to 4, then to
    2; compiled code meets 8, 4 and 2, not 4, 3, 2 and 1. Each real item's output is its own."""
    shapes: list[int] = []

    def echo(piece: StageBatch) -> StageOutput:
        shapes.append(len(piece))
        if len(piece) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return StageOutput(images=np.array(piece.seeds, dtype=np.float32).reshape(-1, 1, 1, 1))

    seeds = list(range(7))
    batch = StageBatch(prompts=["p"] * 7, negative_prompts=[None] * 7, seeds=seeds)
    split = run_splitting(echo, batch, 8)
    assert shapes == [8, 4, 2, 2, 4, 2, 2]
    assert split.failed == {} and split.output is not None and split.output.images is not None
    assert split.output.images.reshape(-1).tolist() == seeds
    shapes.clear()
    run_splitting(echo, batch, None)  # no static_batch: the halves as they come
    assert shapes == [7, 4, 2, 2, 3, 2, 1]
