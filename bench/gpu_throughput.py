"""GPU throughput: imgjobs' worker engine against plain diffusers, on the real architectures with random
weights. No model hub: each checkpoint is built with random weights and written to a temporary
folder with save_pretrained; everything loads back through from_pretrained, as a real checkpoint does.

SD 1.5 img2img, 512x512, 50 steps x strength 0.8 (40 denoising steps), CFG 7.5, in one process, in this
order, so that the pair the run is for, (c) and (d), is measured first, within about 6 minutes of a
device session (its start included):
  (c) plain diffusers batched (--batch), bf16, fused QKV, channels_last, compiled UNet and VAE: the
      same-run baseline; its FLOPs are counted first (uncompiled), and its compilation fills the run's
      inductor cache, from which (d) then loads the same kernels;
  (d) the engine: --items items through the worker's own chunk path (workers.chunk.process_chunk with a
      WorkerContext, a real redis-server from jobs.embedded.EmbeddedRedis, a job made by jobstate.seed,
      local storage: PNG inputs fetched and decoded, PNG outputs encoded and written, results parts,
      progress in Redis; then the job's end, results.jsonl and the report, as a CPU worker writes it), with
      the registry options bf16, channels_last, fuse_qkv, compile, compile_vae, static_batch and warmup,
      and a GPU worker's settings (workers.models.apply_gpu_settings); its load and warm-up (compilation)
      are timed apart, before the stream; a compilation inside the stream is counted;
  (e) the same loaded engine with a safety checker (SD 1.5's, random weights), as a default deployment
      runs, over one chunk: its chunk time against (d)'s;
  (b) plain diffusers resident, fp16, one image per call;
  (a) the guide's recipe: fp16, enable_model_cpu_offload, one image per call (GPU only).
(e), (b) and (a) run only while --budget-s allows. Then, likewise, plain diffusers batched (bf16, batch 4,
as the reference) against the engine for the SDXL refiner (img2img 1024x1024, 50 steps x 0.5) and the x4
upscaler (128 -> 512, 75 steps).

    python bench/gpu_throughput.py [--tiny] [--out DIR] [--items 256] [--batch 16] [--budget-s 420]
                                   [--families sd15,sdxl-refiner,x4-upscaler] [--compile auto|on|off]

--tiny runs tiny architectures with few items, on the CPU in about a minute: a smoke test. Compilation
is on with a GPU and off on a CPU (--compile). Writes gpu_throughput.json in --out (default $OUT) after
every measurement, prints a markdown table, and prints one JSON object as its last line (on SIGTERM
too, with what was measured by then).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    DiffusionPipeline,
)
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.embedded import EmbeddedRedis  # noqa: E402
from jobs.manifest import validate_job  # noqa: E402
from jobs.registry import Registry  # noqa: E402
from jobstate import layout  # noqa: E402
from jobstate.seed import seed_job  # noqa: E402
from jobstate.store import JobStore  # noqa: E402
from kits.real_models import add_safety_checker, sd15, sdxl_refiner, x4_upscaler  # noqa: E402
from schemas.job import Item, Priority  # noqa: E402
from schemas.messages import Chunk, JobEnd  # noqa: E402
from schemas.registry import ModelEntry  # noqa: E402
from schemas.settings import Settings  # noqa: E402
from workers.chunk import WorkerContext, process_chunk  # noqa: E402
from workers.events import ChunkInfo, CompileInfo, EngineEvents, subscribed  # noqa: E402
from workers.job_end import EndContext, end_job  # noqa: E402
from workers.models import COMPILE_CACHE_ENV, LoadedModel, apply_gpu_settings  # noqa: E402
from workers.tiny_models import (  # noqa: E402
    MAX_TOKENS,
    write_tiny_sd,
    write_tiny_sd_x4_upscaler,
    write_tiny_sdxl_refiner,
)
from workers.warmup import load_model  # noqa: E402

# Dense bf16 matmul on an H200 (and an H100) as measured here: over one image's FLOPs, it gives the
# floor (floor_img_per_s) that the engine's throughput is held against.
PEAK_FLOPS = 790e12
PROMPT = "astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
NEGATIVE = "ugly, blurry, low quality"
CALLS_PER_CHUNK = 4
# Seconds of --budget-s a measurement after the (c)-(d) pair must have left to start (GPU estimates).
NEEDS_S = {"checker": 60, "b1": 30, "recipe": 45}


class Workload:
    """One family's benchmark: its architecture and the parameters its stage runs with."""

    def __init__(self, name: str, tiny: bool) -> None:
        self.name = name
        self.builder: Callable[[Path], Any] = {
            "sd15": sd15,
            "sdxl-refiner": sdxl_refiner,
            "x4-upscaler": x4_upscaler,
        }[name]
        self.tiny_writer: Callable[[Path], Path] = {
            "sd15": write_tiny_sd,
            "sdxl-refiner": write_tiny_sdxl_refiner,
            "x4-upscaler": write_tiny_sd_x4_upscaler,
        }[name]
        self.upscale = name == "x4-upscaler"
        if name == "sd15":
            self.size, self.steps, self.strength, self.guidance = (64 if tiny else 512), 50, 0.8, 7.5
        elif name == "sdxl-refiner":
            self.size, self.steps, self.strength, self.guidance = (64 if tiny else 1024), 50, 0.5, 5.0
        else:
            self.size, self.steps, self.strength, self.guidance = (16 if tiny else 128), 75, 1.0, 9.0
        if tiny:
            self.steps = 4
        self.noise_level = 20

    @property
    def denoising_steps(self) -> int:
        return self.steps if self.upscale else int(self.steps * self.strength)

    def call_kwargs(self, batch: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "prompt": [PROMPT] * batch,
            "negative_prompt": [NEGATIVE] * batch,
            "image": [input_image(self.size, 0)] * batch,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance,
            "output_type": "pil",
        }
        if self.upscale:
            kwargs["noise_level"] = self.noise_level
        else:
            kwargs["strength"] = self.strength
        return kwargs

    def stage(self, model: str) -> dict[str, Any]:
        stage: dict[str, Any] = {
            "type": "upscale" if self.upscale else "img2img",
            "model": model,
            "steps": self.steps,
            "guidance_scale": self.guidance,
        }
        if self.upscale:
            stage["noise_level"] = self.noise_level
        else:
            stage["strength"] = self.strength
        return stage


def input_image(size: int, seed: int) -> Image.Image:
    """A smooth gradient with some noise: closer to a photo than pure noise for PNG decode costs."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    base = np.stack(
        [ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), 128.0)], -1
    )
    noisy = base + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype("uint8"))


# -- measuring ---------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, gpu_settings: dict[str, Any]) -> None:
        self.args = args
        self.gpu_settings = gpu_settings
        self.tiny: bool = args.tiny
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cuda = self.device == "cuda"
        self.compile = {"on": True, "off": False}.get(args.compile, self.cuda)
        self.started = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        # Every measured rate, as it comes: the last line (final_line) is built from it at any time.
        self.results: dict[str, Any] = dict.fromkeys(
            ("engine_img_per_s", "recipe_img_per_s", "diffusers_b1_img_per_s", "diffusers_batched_img_per_s")
        )
        self.device_name = torch.cuda.get_device_name() if self.cuda else "cpu"
        self.unet_pair_flops: float | None = None
        self.floor_img_per_s: float | None = None
        self.unet_tflops: float | None = None
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return float(self.args.budget_s) - self.elapsed()

    def log(self, **row: Any) -> dict[str, Any]:
        row["t"] = round(self.elapsed(), 1)
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.save()
        return row

    def save(self) -> None:
        """After every row, so a run stopped at its time limit still leaves what it measured, the
        last line's keys included. Written aside, then renamed: a kill mid-write leaves the last copy."""
        data = {"final": self.final_line(), "summary": self.summary, "rows": self.rows}
        path = self.out / "gpu_throughput.json"
        aside = path.with_suffix(".json.partial")
        aside.write_text(json.dumps(data, indent=1, default=str))
        os.replace(aside, path)

    @contextmanager
    def section(self, what: str) -> Iterator[None]:
        """A failed measurement is recorded and the run goes on to the next one."""
        try:
            yield
        except Exception as exc:
            self.log(what=what, error=f"{type(exc).__name__}: {exc}"[:600])
            traceback.print_exc()
        finally:
            self.release()

    def release(self) -> None:
        gc.collect()
        torch._dynamo.reset()
        if self.cuda:
            torch.cuda.empty_cache()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def build(self, work: Workload, scratch: Path) -> Path:
        """The family's architecture with random weights, written as a diffusers folder in fp16."""
        started = time.perf_counter()
        folder = scratch / work.name
        if self.tiny:
            work.tiny_writer(folder)  # the tests' and the demo's own tiny checkpoint of the family
        else:
            torch.manual_seed(0)
            with torch.device(self.device):  # initialises the big weights where they will run: fast on a GPU
                pipeline = work.builder(scratch / f"{work.name}-tokenizer")
            if self.cuda:
                pipeline.to(dtype=torch.float16)  # as checkpoints ship; each run loads it in its own dtype
            pipeline.save_pretrained(folder)
            del pipeline
        self.release()
        self.log(what=f"{work.name}_build_and_save", s=round(time.perf_counter() - started, 1))
        return folder

    def load(self, folder: Path, dtype: torch.dtype, upscale: bool) -> Any:
        loader = DiffusionPipeline if upscale else AutoPipelineForImage2Image
        pipeline = loader.from_pretrained(folder, torch_dtype=dtype)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def timed(self, pipeline: Any, kwargs: dict[str, Any], reps: int) -> float:
        """Median seconds of one call, after one untimed call (allocations, cuDNN plans, compilation)."""
        with torch.inference_mode():
            pipeline(**kwargs)
            times = []
            for _ in range(reps):
                self.sync()
                started = time.perf_counter()
                pipeline(**kwargs)
                self.sync()
                times.append(time.perf_counter() - started)
        return statistics.median(times)

    # -- plain diffusers

    def plain(self, work: Workload, folder: Path, what: str, batch: int, *, recipe: bool = False) -> float:
        dtype = torch.float16 if recipe or what.endswith("b1") else torch.bfloat16
        pipeline = self.load(folder, dtype if self.cuda else torch.float32, work.upscale)
        if recipe:
            pipeline.enable_model_cpu_offload()
        else:
            pipeline.to(self.device)
        if what == "diffusers_batched_compiled" and work.name == "sd15":
            self.count_flops(pipeline, work)  # uncompiled: FlopCounterMode counts the modules' own ops
        if what == "diffusers_batched_compiled":
            pipeline.fuse_qkv_projections()
            pipeline.unet.to(memory_format=torch.channels_last)
            pipeline.vae.to(memory_format=torch.channels_last)
            if self.compile:
                pipeline.unet = torch.compile(pipeline.unet, fullgraph=True)
                pipeline.vae.decoder = torch.compile(pipeline.vae.decoder, fullgraph=True)
                pipeline.vae.encoder = torch.compile(pipeline.vae.encoder, fullgraph=True)
        started = time.perf_counter()
        seconds = self.timed(pipeline, work.call_kwargs(batch), 1 if self.tiny or work.name != "sd15" else 2)
        self.log(
            what=f"{work.name}_{what}",
            batch=batch,
            dtype=str(dtype).removeprefix("torch.") if self.cuda else "float32",
            compiled=self.compile and what == "diffusers_batched_compiled",
            s_per_batch=round(seconds, 4),
            img_per_s=round(batch / seconds, 4),
            wall_s=round(time.perf_counter() - started, 1),
        )
        del pipeline
        return batch / seconds

    def count_flops(self, pipeline: Any, work: Workload) -> None:
        """FLOPs of one CFG-pair UNet step and of the VAE's encode and decode, for one image."""
        from torch.utils.flop_counter import FlopCounterMode

        unet, vae = pipeline.unet, pipeline.vae
        side = work.size // pipeline.vae_scale_factor
        latents = torch.randn(2, 4, side, side, device=unet.device, dtype=unet.dtype)
        context = torch.randn(
            2, MAX_TOKENS, unet.config.cross_attention_dim, device=unet.device, dtype=unet.dtype
        )
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            unet(latents, 10, context)
        pair = counter.get_total_flops()
        pixels = torch.randn(1, 3, work.size, work.size, device=vae.device, dtype=vae.dtype)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            encoded = vae.encode(pixels).latent_dist.sample()
        encode = counter.get_total_flops()
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            vae.decode(encoded)
        decode = counter.get_total_flops()
        per_image = pair * work.denoising_steps + encode + decode
        self.unet_pair_flops, self.floor_img_per_s = float(pair), PEAK_FLOPS / per_image
        self.summary |= {
            "unet_tflop_per_cfg_pair_step": round(pair / 1e12, 4),
            "tflop_per_image": round(per_image / 1e12, 3),
            "floor_img_per_s": round(self.floor_img_per_s, 3),
        }
        self.log(
            what="flops",
            unet_cfg_pair_gflop=round(pair / 1e9, 2),
            vae_encode_gflop=round(encode / 1e9, 2),
            vae_decode_gflop=round(decode / 1e9, 2),
            per_image_tflop=round(per_image / 1e12, 3),
        )

    # -- the engine

    def engine(
        self, work: Workload, folder: Path, scratch: Path, batch: int, items: int, checker_items: int = 0
    ) -> float:
        """items through workers.chunk.process_chunk, chunk by chunk as a worker takes them; then, with
        checker_items and budget left, as many again through the same loaded model with a safety
        checker added (a default deployment), whose chunk time is compared with the first run's."""
        name = f"{work.name}-random"
        entry = {
            "source": folder.name,
            **engine_options(batch, self.compile),
            "warmup_size": [work.size, work.size],
        }
        registry_path = folder.parent / f"{work.name}-models.yaml"
        registry_path.write_text(json.dumps({"models": {name: entry}}), encoding="utf-8")  # JSON is YAML
        registry = Registry.load(registry_path)

        from torch._dynamo.utils import counters

        cache = counters["inductor"]
        hits, misses = cache["fxgraph_cache_hit"], cache["fxgraph_cache_miss"]
        started = time.perf_counter()
        model = load_model(name, registry.resolve(name).entry)
        load_s = time.perf_counter() - started
        self.log(
            what=f"{work.name}_engine_load",
            load_and_warmup_s=round(load_s, 1),
            warmup_s=model.warmup_s,
            # Graphs the warm-up took from the run's inductor cache, filled by (c), and those it compiled.
            fxgraph_cache_hits=cache["fxgraph_cache_hit"] - hits,
            fxgraph_cache_misses=cache["fxgraph_cache_miss"] - misses,
        )
        rate, chunk_s = self.stream(work, model, registry, scratch, batch, items, f"{work.name}_engine")
        key = work.name.replace("-", "_")
        if checker_items and not (self.tiny or self.left() > NEEDS_S["checker"]):
            self.log(what=f"{work.name}_engine_checker", skipped=f"{self.left():.0f}s of --budget-s left")
        elif checker_items:
            # Not a section of its own: section() resets dynamo, which would recompile the loaded model.
            try:
                add_safety_checker(model.pipeline, self.tiny)
                _, checked_s = self.stream(
                    work, model, registry, scratch, batch, checker_items, f"{work.name}_engine_checker"
                )
                self.summary[f"{key}_checker_chunk_ratio"] = round(checked_s / chunk_s, 4)
                self.log(
                    what=f"{work.name}_checker_cost",
                    median_chunk_s=round(chunk_s, 3),
                    median_chunk_with_checker_s=round(checked_s, 3),
                    ratio=round(checked_s / chunk_s, 4),
                )
            except Exception as exc:
                self.log(what=f"{work.name}_engine_checker", error=f"{type(exc).__name__}: {exc}"[:600])
                traceback.print_exc()
        del model
        return rate

    def stream(
        self,
        work: Workload,
        model: LoadedModel,
        registry: Registry,
        scratch: Path,
        batch: int,
        items: int,
        what: str,
    ) -> tuple[float, float]:
        """One job of `items` through the chunk path on the loaded model: (img/s end to end, the median
        chunk's seconds)."""
        folder_job = scratch / f"{what}-job"
        job_path, rows = self.write_job(work, folder_job, model.name, items)
        validated = validate_job(job_path, registry)  # the producer's own validation and planning
        timings = EngineTimings()
        with EmbeddedRedis(scratch / f"{what}-redis") as server, subscribed(timings):
            client = redis.Redis.from_url(server.url, decode_responses=True)
            # Chunks of CALLS_PER_CHUNK calls, as IMGJOBS_CHUNK_SIZE (64) gives at static_batch 16: the
            # worker overlaps each call with the next call's fetches and the last call's writes.
            job = seed_job(
                client,
                rows,
                validated.recipe,
                str(folder_job / "out"),
                job_id=f"bench-{what}",
                defaults=validated.spec.defaults,
                chunk_size=batch * CALLS_PER_CHUNK,
            )
            store = JobStore(client)
            ends: list[JobEnd] = []
            settings = Settings(local_input_roots=str(folder_job))  # the bench's own inputs
            ctx = WorkerContext(
                model=model, settings=settings, store=store, send_chunk=no_next_stage, send_end=ends.append
            )
            chunk_s = []
            timer = UnetTimer(model.pipeline.unet, self.cuda)
            for chunk in job.chunks:
                self.sync()
                started = time.perf_counter()
                process_chunk(chunk, ctx)
                self.sync()
                chunk_s.append(time.perf_counter() - started)
            unet_s, unet_calls = timer.stop()
            # The job's end (results.jsonl, report.html with 200 thumbnails), once per job, as the CPU
            # worker writes it.
            for end in ends:
                end_job(end, EndContext(store=store, settings=settings), token="bench")
            status = store.status(job.meta.job_id)
        once = sum(timings.ends)
        seconds = sum(chunk_s) + once
        if status.succeeded != items or status.finished_at is None:
            raise RuntimeError(f"engine run incomplete: {status}")
        phases = phase_seconds(
            Path(layout.job_root(str(folder_job / "out"), job.meta.job_id)) / layout.RESULTS
        )
        median_chunk_s = statistics.median(chunk_s)
        self.log(
            what=what,
            items=items,
            chunks=len(job.chunks),
            static_batch=batch,
            compiled=self.compile,
            s=round(seconds, 2),
            img_per_s=round(items / seconds, 4),
            finalize_s=round(once, 2),
            steady_img_per_s=round(items / (seconds - once), 4),
            median_chunk_s=round(median_chunk_s, 3),
            duty_cycle=timings.duty_cycle(),
            unet_share=timings.unet_share(),
            # Shapes the warm-up missed (each compiled inside a chunk: a stall) and refusals at dynamo's
            # recompile limit (those calls ran uncompiled): both should be 0.
            compiles_in_stream=timings.compiles,
            eager_fallbacks=timings.fallbacks,
            phase_s=phases,
        )
        key = what.removesuffix("_engine").replace("-", "_")
        if what.endswith("_engine"):
            self.summary[f"{key}_engine_steady_img_per_s"] = round(items / (seconds - once), 4)
            self.summary[f"{key}_engine_duty_cycle"] = timings.duty_cycle()
            self.summary[f"{key}_engine_unet_share"] = timings.unet_share()
            self.summary[f"{key}_engine_compiles_in_stream"] = timings.compiles
        if what == "sd15_engine" and unet_s and self.unet_pair_flops:
            # Every UNet call of the stream runs a CFG pair for each of the static_batch rows.
            self.unet_tflops = self.unet_pair_flops * batch * unet_calls / unet_s / 1e12
            self.log(
                what="sd15_engine_unet",
                calls=unet_calls,
                unet_s=round(unet_s, 2),
                unet_tflops=round(self.unet_tflops, 3) if self.unet_tflops is not None else None,
            )
        del ctx
        return items / seconds, median_chunk_s

    def write_job(self, work: Workload, folder: Path, model: str, items: int) -> tuple[Path, list[Item]]:
        """The job's spec and items file, and its items as submit records them."""
        (folder / "in").mkdir(parents=True, exist_ok=True)
        distinct = min(items, 16)
        for index in range(distinct):
            input_image(work.size, index).save(folder / "in" / f"{index}.png")
        rows = [
            Item(
                id=f"i{index:05d}",
                image=str((folder / "in" / f"{index % distinct}.png").resolve()),
                seed=index,
                prompt=f"{PROMPT}, variation {index}",
            )
            for index in range(items)
        ]
        with (folder / "items.jsonl").open("w", encoding="utf-8") as out:
            for row in rows:
                out.write(row.model_dump_json(exclude_none=True) + "\n")
        spec = {
            "version": 1,
            "name": f"bench-{work.name}",
            "output": "out",
            "items": "items.jsonl",
            "defaults": {"size": [work.size, work.size], "negative_prompt": NEGATIVE},
            "stages": [work.stage(model)],
        }
        (folder / "job.json").write_text(json.dumps(spec), encoding="utf-8")
        return folder / "job.json", rows

    # -- the whole run

    def run(self) -> dict[str, Any]:
        args = self.args
        self.log(
            what="env",
            device=self.device_name,
            torch=torch.__version__,
            diffusers=__import__("diffusers").__version__,
            transformers=__import__("transformers").__version__,
            python=sys.version.split()[0],
            use_hub_kernels=os.environ.get("USE_HUB_KERNELS"),
            gpu_settings=self.gpu_settings,
            tiny=self.tiny,
            compile=self.compile,
            batch=args.batch,
            items=args.items,
        )
        families = [f.strip() for f in args.families.split(",") if f.strip()]
        with tempfile.TemporaryDirectory(prefix="imgjobs-gpu-bench-") as tmp:
            scratch = Path(tmp)
            # One fresh compile cache for the run, shared by (c) and the engine; say so when reading.
            os.environ.setdefault(COMPILE_CACHE_ENV, str(scratch / "inductor-cache"))
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.environ[COMPILE_CACHE_ENV]
            if "sd15" in families:
                self.sd15(scratch)
            for family, needed in (("sdxl-refiner", 240), ("x4-upscaler", 180)):
                if family not in families:
                    continue
                if not self.tiny and self.left() < needed:
                    self.log(what=f"{family}_skipped", reason=f"{self.left():.0f}s of --budget-s left")
                    continue
                self.results |= self.family(family, scratch)
        final = self.final_line()
        self.summary = final | {key: value for key, value in self.summary.items() if key not in final}
        self.save()
        return final

    def final_line(self) -> dict[str, Any]:
        """The last line's object, from whatever has been measured so far."""
        results = self.results
        engine, plain = results.get("engine_img_per_s"), results.get("diffusers_batched_img_per_s")
        return {
            "engine_img_per_s": engine,
            "recipe_img_per_s": results.get("recipe_img_per_s"),
            "diffusers_b1_img_per_s": results.get("diffusers_b1_img_per_s"),
            "diffusers_batched_img_per_s": plain,
            "unet_tflops": round(self.unet_tflops, 3) if self.unet_tflops is not None else None,
            "floor_fraction": round(engine / self.floor_img_per_s, 6)
            if engine and self.floor_img_per_s
            else None,
            "device": self.device_name,
            "vs_recipe": ratio(engine, results.get("recipe_img_per_s")),
            "vs_diffusers_batched": ratio(engine, plain),
            "engine_steady_img_per_s": self.summary.get("sd15_engine_steady_img_per_s"),
            "engine_duty_cycle": self.summary.get("sd15_engine_duty_cycle"),
            "engine_unet_share": self.summary.get("sd15_engine_unet_share"),
            "engine_compiles_in_stream": self.summary.get("sd15_engine_compiles_in_stream"),
            # A default deployment (with SD 1.5's safety checker) over one without: chunk time ratio.
            "checker_chunk_ratio": self.summary.get("sd15_checker_chunk_ratio"),
            **{key: value for key, value in results.items() if key.startswith(("sdxl", "x4"))},
            "batch": self.args.batch,
            "items": self.args.items,
            "compiled": self.compile,
            "tiny": self.tiny,
            "wall_s": round(self.elapsed(), 1),
        }

    def sd15(self, scratch: Path) -> None:
        work = Workload("sd15", self.tiny)
        results = self.results

        def measured(key: str, rate: float | None) -> None:
            results[key] = round(rate, 4) if rate else rate
            self.save()

        folder: Path | None = None
        with self.section("sd15_build"):
            folder = self.build(work, scratch)
        if folder is None:
            return
        batch = self.args.batch
        # (c), then (d) at once: the pair the run is for, measured before anything optional.
        with self.section("sd15_diffusers_batched"):
            measured(
                "diffusers_batched_img_per_s", self.plain(work, folder, "diffusers_batched_compiled", batch)
            )
        with self.section("sd15_engine"):
            rate = self.engine(
                work, folder, scratch, batch, self.args.items, checker_items=CALLS_PER_CHUNK * batch
            )
            measured("engine_img_per_s", rate)
        if self.tiny or self.left() > NEEDS_S["b1"]:
            with self.section("sd15_diffusers_b1"):
                measured("diffusers_b1_img_per_s", self.plain(work, folder, "diffusers_b1", 1))
        else:
            self.log(what="sd15_diffusers_b1", skipped=f"{self.left():.0f}s of --budget-s left")
        if not self.cuda:
            self.log(what="sd15_recipe_offload_b1", skipped="enable_model_cpu_offload needs a GPU")
        elif self.left() > NEEDS_S["recipe"]:
            with self.section("sd15_recipe"):
                measured("recipe_img_per_s", self.plain(work, folder, "recipe_offload_b1", 1, recipe=True))
        else:
            self.log(what="sd15_recipe_offload_b1", skipped=f"{self.left():.0f}s of --budget-s left")

    def family(self, family: str, scratch: Path) -> dict[str, Any]:
        work = Workload(family, self.tiny)
        batch = 2 if self.tiny else 4
        key = family.replace("-", "_")
        plain = engine = None
        with self.section(f"{family}_build"):
            folder = self.build(work, scratch)
            with self.section(f"{family}_diffusers_batched"):
                plain = self.plain(work, folder, "diffusers_batched", batch)
            with self.section(f"{family}_engine"):
                engine = self.engine(work, folder, scratch, batch, 2 * batch)
        steady = self.summary.get(f"{key}_engine_steady_img_per_s") if engine else None
        return {
            f"{key}_diffusers_b{batch}_img_per_s": round(plain, 4) if plain else None,
            f"{key}_engine_img_per_s": round(engine, 4) if engine else None,
            f"{key}_vs_diffusers": ratio(engine, plain),
            # Only 2 calls per family: the job's finalize (results.jsonl, report) weighs on the end-to-end
            # rate, so the steady rate (without it) is the fairer comparison with plain diffusers.
            f"{key}_engine_steady_img_per_s": steady,
            f"{key}_steady_vs_diffusers": ratio(steady, plain),
        }


def engine_options(batch: int, compile_: bool) -> dict[str, Any]:
    """The registry options the engine runs with: the GPU recipe of docs/operations.md."""
    return {
        "dtype": "bfloat16",
        "channels_last": True,
        "fuse_qkv": True,
        "compile": compile_,
        "compile_vae": compile_,
        "static_batch": batch,
        "warmup": True,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


def phase_seconds(results: Path) -> dict[str, float]:
    """Seconds per phase over all items (fetch, the share of the batched call, write)."""
    total: dict[str, float] = {}
    for line in results.read_text(encoding="utf-8").splitlines():
        for phase, seconds in json.loads(line)["timings"].items():
            total[phase] = total.get(phase, 0.0) + seconds
    return {phase: round(seconds, 2) for phase, seconds in total.items()}


class UnetTimer:
    """Time spent in the denoiser's calls during the engine's stream, measured around each call (CUDA
    events on a GPU, so nothing waits), outside the compiled code: the compiled graphs stay as warmed."""

    def __init__(self, unet: Any, cuda: bool) -> None:
        self.cuda = cuda
        self.spans: list[list[Any]] = []
        self.cpu_s = 0.0
        self.calls = 0
        self.started = 0.0
        self.handles = [unet.register_forward_pre_hook(self.before), unet.register_forward_hook(self.after)]

    def before(self, module: Any, args: Any) -> None:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.spans.append([start])
        else:
            self.started = time.perf_counter()

    def after(self, module: Any, args: Any, output: Any) -> None:
        self.calls += 1
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.spans[-1].append(end)
        else:
            self.cpu_s += time.perf_counter() - self.started

    def stop(self) -> tuple[float, int]:
        """(seconds inside the UNet, calls)"""
        for handle in self.handles:
            handle.remove()
        if not self.cuda:
            return self.cpu_s, self.calls
        torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in self.spans) / 1000, self.calls


class EngineTimings(EngineEvents):
    """The engine's own report, from its events: each chunk's time, time in pipeline calls (its duty
    cycle) and time inside the UNet (its unet_share), the job's end's time, and the compilations inside
    chunks."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, float]] = []
        self.unet_s: list[float] = []
        self.ends: list[float] = []
        self.compiles = 0
        self.fallbacks = 0

    def chunk_done(self, chunk: ChunkInfo, elapsed_s: float, busy_s: float, unet_s: float) -> None:
        self.chunks.append((elapsed_s, busy_s))
        self.unet_s.append(unet_s)

    def job_ended(self, job_id: str, seconds: float, error: str | None) -> None:
        self.ends.append(seconds)

    def compiled(self, chunk: ChunkInfo | None, compilation: CompileInfo) -> None:
        if chunk is not None:
            self.compiles += 1
            self.fallbacks += compilation.fell_back

    def duty_cycle(self) -> float:
        return round(sum(busy for _, busy in self.chunks) / sum(wall for wall, _ in self.chunks), 4)

    def unet_share(self) -> float:
        return round(sum(self.unet_s) / sum(wall for wall, _ in self.chunks), 4)


def no_next_stage(chunk: Chunk, queue: str, priority: Priority) -> None:
    raise AssertionError(f"a one-stage job handed chunk {chunk.chunk_id} on")


def table(results: dict[str, Any]) -> str:
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in results.items()]
    return "\n".join(lines)


class Stopped(BaseException):
    """SIGTERM: a BaseException, so that no measurement's `except Exception` takes it for a failure."""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny architectures, few items: a CPU smoke test")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", tempfile.gettempdir())))
    parser.add_argument("--items", type=int, default=None, help="engine items for SD 1.5 (256; tiny: 16)")
    parser.add_argument(
        "--batch", type=int, default=None, help="batch and static_batch for SD 1.5 (16; tiny: 4)"
    )
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip families that would not fit")
    parser.add_argument("--families", default="sd15,sdxl-refiner,x4-upscaler")
    parser.add_argument(
        "--compile", choices=("auto", "on", "off"), default="auto", help="auto: on with a GPU"
    )
    args = parser.parse_args()
    args.items = args.items or (16 if args.tiny else 256)
    args.batch = args.batch or (4 if args.tiny else 16)
    if args.tiny and not torch.cuda.is_available():
        torch.set_num_threads(
            1
        )  # the smoke test shares small CPU machines; tiny models gain nothing from more

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("workers.models").setLevel(logging.INFO)  # the compile cache and the warm-up's time
    # A GPU worker's allocator and kernel settings (expandable segments, cuDNN benchmark at the engine's
    # static shapes, TF32) for the whole process, (c) included: before anything starts CUDA, as a worker.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine_entry = {"source": "bench", "device": device, **engine_options(args.batch, compile_=True)}
    gpu_settings = apply_gpu_settings(Settings(), ModelEntry.model_validate(engine_entry))
    bench = Bench(args, gpu_settings)

    def stopped(signum: int, _frame: Any) -> None:
        # Only raise here: the signal may land inside a print, and printing again from the handler would
        # be a reentrant write to stdout (a RuntimeError that a measurement's section would swallow).
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stopped)
    try:
        results = bench.run()
    except Stopped as stop:
        # A time limit (`timeout`, the device tool) ended the run, which unwound (the embedded Redis
        # stopped, the scratch folder went): still print the last line.
        bench.log(what="stopped", signal=str(stop))
        print(json.dumps(bench.final_line()), flush=True)
        raise SystemExit(124) from None
    print()
    print(table({key: value for key, value in results.items() if value is not None}))
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
