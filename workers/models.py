"""A worker's resident model: one checkpoint loaded once, and the pipelines derived from it.

Derived pipelines (text2img from an img2img checkpoint, ControlNet img2img with an attached
ControlNetModel) come from `from_pipe`, which shares the loaded components instead of loading
them again; attachments (a ControlNet, a depth estimator, a scoring model) are loaded on first use
and kept. So are
LoRA adapters, loaded into the shared modules and switched per chunk (use_adapters). s3:// sources
load from their copy in the model cache (workers/model_cache.py). A worker loads its model through
workers/warmup.py, which warms it up through its stage where its entry asks.
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from PIL import Image

from schemas.errors import ConfigError, ImgjobsError, ScoringError, StageError
from schemas.job import (
    BUILTIN_SIZE,
    ResolvedParams,
    StageSpec,
    denoising_steps,
    stage_eta,
)
from schemas.registry import (
    RESIZE_PIPELINE,
    UPSCALER_PIPELINES,
    X2_LATENT_UPSCALER,
    X4_UPSCALER,
    LoraRef,
    ModelEntry,
    ResolvedModel,
    is_s3,
    is_single_file,
    lora_weights_file,
)
from schemas.samplers import (
    SAMPLERS,
    Sampler,
    SamplerChoice,
    base_flags,
    run_problem,
    sampler_of_class,
    sampler_problem_for_pipeline,
    schedule_of_config,
    unet_evaluations,
)
from schemas.settings import Settings
from workers.events import emit
from workers.model_cache import local_copy

if TYPE_CHECKING:
    from workers.scoring import ClipScorer

log = logging.getLogger(__name__)

# Where compiled code is kept across worker restarts; see compile_cache_dir.
COMPILE_CACHE_ENV = "IMGJOBS_COMPILE_CACHE_DIR"
# torch reads the first that is set (the second is its older name, which torch 2.11 still reads).
ALLOC_CONF_ENVS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(entry: ModelEntry, device: str) -> torch.dtype:
    if device == "cpu":
        if entry.dtype not in ("auto", "float32"):
            # Half precision on the CPU is slow or unsupported for many kernels; fp32 gives the same images.
            log.warning("model %s asks for %s; using float32 on the CPU", entry.source, entry.dtype)
        return torch.float32
    if entry.dtype != "auto":
        return getattr(torch, entry.dtype)
    return default_half_dtype(device)


def default_half_dtype(device: str) -> torch.dtype:
    """bfloat16 where the GPU computes in it (CUDA compute capability 8.0, Ampere, and later), else
    float16. bfloat16 has float32's range, so what overflows float16 (SD 1.x's VAE on some inputs,
    SDXL's and the x4 upscaler's VAEs, which diffusers therefore decodes in float32 when they are
    float16: force_upcast) stays finite, at no cost in speed; older GPUs only emulate it, slowly."""
    if device.startswith("cuda") and torch.cuda.get_device_capability(torch.device(device)) >= (8, 0):
        return torch.bfloat16
    return torch.float16


def apply_gpu_settings(
    settings: Settings, entry: ModelEntry, environ: MutableMapping[str, str] = os.environ
) -> dict[str, Any]:
    """The allocator and kernel settings of a worker whose model runs on a GPU (IMGJOBS_CUDA_EXPANDABLE_
    SEGMENTS, IMGJOBS_CUDNN_BENCHMARK, IMGJOBS_TF32), for the whole process: called once at its start,
    before the model loads, since CUDA reads its allocator's configuration when it first allocates.
    Returns what it set; a model on the CPU sets nothing (TF32 is a GPU format, and CPU runs keep
    torch's defaults, which the equality tests compare against)."""
    if not resolve_device(entry.device).startswith("cuda"):
        return {}
    applied: dict[str, Any] = {}
    if settings.cuda_expandable_segments and not any(environ.get(name) for name in ALLOC_CONF_ENVS):
        if torch.cuda.is_initialized():
            log.warning("CUDA started before the worker's settings: %s has no effect", EXPANDABLE_SEGMENTS)
        environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
        applied["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
    benchmark = settings.cudnn_benchmark
    if benchmark is None:
        benchmark = entry.static_batch is not None
    torch.backends.cudnn.benchmark = benchmark
    torch.set_float32_matmul_precision("high" if settings.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = settings.tf32
    applied |= {"cudnn_benchmark": benchmark, "tf32": settings.tf32}
    log.info("GPU settings: %s", ", ".join(f"{key}={value}" for key, value in applied.items()))
    return applied


def pipeline_class_of(entry: ModelEntry, folder: str | None = None) -> str:
    """The class in the checkpoint's model_index.json (a hub id's is fetched, a folder's read): that of
    `folder` when given (the checkpoint's local copy, or a single file's config), else the source's."""
    if entry.pipeline:
        return entry.pipeline
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(folder or entry.config or entry.source)
    return str(config["_class_name"])


Fetch = Callable[[str], str]


def load_checkpoint(entry: ModelEntry, fetch: Fetch) -> Any:
    """from_pretrained on a hub id or a local folder, from_single_file (with its `config`) on a
    .safetensors or .ckpt file; `fetch` gives each source's local path (an s3:// source's copy in the
    model cache). Image-to-image checkpoints load through AutoPipelineForImage2Image, which maps
    text2img checkpoints (SD 1.5) to their img2img class; the upscalers, which it does not know, load
    as their own class. `vae` replaces the checkpoint's VAE; `safety_checker: false` leaves the
    checker out (its weights are not even loaded)."""
    # diffusers is imported where a checkpoint loads, not with this module: the cpu model's workers
    # (resize, jobs' ends) never load one, and importing it costs seconds at every worker start.
    import diffusers
    from diffusers import AutoPipelineForImage2Image, DiffusionPipeline

    device = resolve_device(entry.device)
    dtype = resolve_dtype(entry, device)
    source = fetch(entry.source)
    config = fetch(entry.config) if entry.config is not None else None
    class_name = pipeline_class_of(entry, config or source)
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if entry.vae is not None:
        kwargs["vae"] = load_vae(fetch(entry.vae), dtype)
    checkpoint_class = getattr(diffusers, class_name, None)
    takes = inspect.signature(checkpoint_class.__init__).parameters if checkpoint_class else {}
    if not entry.safety_checker and "safety_checker" in takes:
        kwargs["safety_checker"] = None
        if "requires_safety_checker" in takes:
            kwargs["requires_safety_checker"] = False  # or diffusers warns that it was left out
    if is_single_file(entry.source):
        if checkpoint_class is None or not hasattr(checkpoint_class, "from_single_file"):
            raise ConfigError(f"{class_name} cannot load a single-file checkpoint")
        pipeline = checkpoint_class.from_single_file(source, config=config, **kwargs)
        if class_name not in UPSCALER_PIPELINES:
            pipeline = AutoPipelineForImage2Image.from_pipe(pipeline)
    else:
        if entry.variant:
            kwargs["variant"] = entry.variant
        loader = DiffusionPipeline if class_name in UPSCALER_PIPELINES else AutoPipelineForImage2Image
        pipeline = loader.from_pretrained(source, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_vae(source: str, dtype: torch.dtype) -> Any:
    """An AutoencoderKL from its own folder (or hub id), or from a pipeline folder's `vae/`."""
    from diffusers import AutoencoderKL

    folder = Path(source)
    whole_pipeline = not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file()
    return AutoencoderKL.from_pretrained(
        source, subfolder="vae" if whole_pipeline else None, torch_dtype=dtype
    )


def compile_cache_dir() -> Path:
    """IMGJOBS_COMPILE_CACHE_DIR; else TORCHINDUCTOR_CACHE_DIR when someone chose it; else a per-user
    cache folder, $XDG_CACHE_HOME/imgjobs/inductor (~/.cache/imgjobs/inductor). torch's own default is
    under /tmp, which a restarted container loses; mount a volume at this folder to keep it."""
    explicit = os.environ.get(COMPILE_CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # torch writes its /tmp default into the environment the first time it looks (importing diffusers'
    # pipelines does): that value is torch's choice, not the operator's.
    if chosen and os.path.abspath(chosen) != _torch_default_cache_dir():
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no home directory
            base = tempfile.gettempdir()
    return Path(base) / "imgjobs" / "inductor"


def _torch_default_cache_dir() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return os.path.abspath(str(default_cache_dir()))


def persist_compile_cache() -> Path:
    """Point inductor's caches (its FX graph cache and the Triton kernels under it) at
    compile_cache_dir, so a restarted worker loads compiled code instead of compiling again."""
    folder = compile_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    if os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] != "0":
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
    return folder


def _vaes(pipeline: Any) -> list[Any]:
    """The autoencoders: `vae` (SD, SDXL, the upscalers) and `movq` (Kandinsky 2.2)."""
    found = (getattr(pipeline, "vae", None), getattr(pipeline, "movq", None))
    return [vae for vae in found if vae is not None]


def _fuse_qkv(name: str, modules: list[Any]) -> None:
    for module in modules:
        fuse = getattr(module, "fuse_qkv_projections", None)
        if fuse is None:
            log.warning("model %s: %s cannot fuse its q/k/v projections", name, type(module).__name__)
            continue
        try:
            fuse()
        except ValueError as exc:  # e.g. Kandinsky's decoder: added k/v projections cannot be fused
            log.warning("model %s: %s keeps unfused q/k/v projections: %s", name, type(module).__name__, exc)


def apply_speedups(pipeline: Any, entry: ModelEntry, device: str) -> Any:
    """The registry's per-model options: the guide's (attention, compile, offload, VAE slicing/tiling)
    and the GPU throughput ones (channels_last, fuse_qkv, compile_vae; static shapes with static_batch)."""
    denoiser = getattr(pipeline, "unet", None)
    vaes = _vaes(pipeline)
    if entry.attention == "classic" and denoiser is not None:
        from diffusers.models.attention_processor import AttnProcessor

        denoiser.set_attn_processor(AttnProcessor())
    if entry.fuse_qkv:
        _fuse_qkv(entry.source, [module for module in (denoiser, *vaes) if module is not None])
    vae = getattr(pipeline, "vae", None)
    if entry.vae_slicing and vae is not None:
        vae.enable_slicing()
    if entry.vae_tiling and vae is not None:
        vae.enable_tiling()
    if entry.cpu_offload and device.startswith("cuda"):
        # Moves each component to the GPU only while it runs; the pipeline itself must not be moved.
        pipeline.enable_model_cpu_offload(device=device)
    else:
        if entry.cpu_offload:
            log.warning("model %s: cpu_offload has no effect without a GPU", entry.source)
        pipeline.to(device)
    if entry.channels_last:
        for module in (denoiser, *vaes):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if entry.compile or entry.compile_vae:
        log.info("model %s: compiled code is cached in %s", entry.source, persist_compile_cache())
    # With static_batch every call has one shape: compile for exactly that shape rather than for any batch.
    options: dict[str, Any] = {"dynamic": False} if entry.static_batch else {}
    if entry.compile_vae:
        for autoencoder in vaes:
            for part in (getattr(autoencoder, "encoder", None), getattr(autoencoder, "decoder", None)):
                if part is not None:
                    part.compile(**options)  # in place: every pipeline sharing this VAE runs it compiled
    if entry.compile and denoiser is not None:
        compiled = torch.compile(denoiser, **options)
        pipeline.unet = compiled
        # Kandinsky's combined pipeline runs its decoder sub-pipeline, which holds the same UNet.
        decoder = getattr(pipeline, "decoder_pipe", None)
        if decoder is not None and getattr(decoder, "unet", None) is denoiser:
            decoder.unet = compiled
    return pipeline


def build_scheduler(own_class: str, own_config: dict[str, Any], choice: SamplerChoice | None) -> Any:
    """A scheduler of the checkpoint's own class and config (`choice` None), or of the sampler's class
    built from that config with the sampler's flags (and base_flags, so that what the checkpoint's
    config chose for its own sampler does not carry over)."""
    import diffusers

    if choice is None:
        return getattr(diffusers, own_class).from_config(own_config)
    scheduler_class = getattr(diffusers, choice.sampler.scheduler)
    takes = inspect.signature(scheduler_class.__init__).parameters
    flags = {name: value for name, value in base_flags(choice.sampler.scheduler).items() if name in takes}
    return scheduler_class.from_config(own_config, **(flags | choice.scheduler_flags))


def scheduler_problem(
    scheduler: Any, choice: SamplerChoice | None, steps: int | None, strength: float | None, text2img: bool
) -> str | None:
    """run_problem for a built scheduler, knowing its spacing and, for text2img, where its schedule
    starts (the pipeline sets its timesteps again before its loop, so setting them here changes
    nothing it runs)."""
    if steps is None:
        return None
    config = dict(scheduler.config)
    sampler = choice.sampler if choice else sampler_of_class(type(scheduler).__name__, config)
    schedule = choice.schedule if choice else schedule_of_config(config)
    spacing = config.get("timestep_spacing")
    problem = run_problem(sampler, schedule, text2img, steps, strength, spacing)
    if problem is None and text2img:
        scheduler.set_timesteps(steps, device="cpu")
        first = float(scheduler.timesteps[0])
        train = int(config.get("num_train_timesteps", 1000))
        problem = run_problem(sampler, schedule, text2img, steps, strength, spacing, first, train)
    return problem


class Ran(NamedTuple):
    """What a stage runs for an item: the sampler (its table name, else the scheduler's class), its
    schedule (None: the checkpoint's spacing), the denoising steps and the UNet evaluations."""

    sampler: str | None
    schedule: str | None
    steps_run: int | None
    unet_evaluations: int | None


OWN = "own"  # the checkpoint's own scheduler, in events


def _shown(choice: SamplerChoice | None) -> str:
    if choice is None:
        return OWN
    return choice.sampler.name + (f" {choice.schedule}" if choice.schedule else "")


class LoadedModel:
    def __init__(self, name: str, entry: ModelEntry, model_cache: Path | None = None) -> None:
        """`model_cache`: where s3:// sources are downloaded to; unset, IMGJOBS_MODEL_CACHE's folder."""
        self.name = name
        self.entry = entry
        self.device = resolve_device(entry.device)
        self.dtype = resolve_dtype(entry, self.device)
        self._model_cache = model_cache
        self._derived: dict[str, Any] = {}
        self._depth_lock = threading.Lock()
        self._scorer_lock = threading.Lock()
        # LoRA adapters: those loaded (by adapter name), and the (name, weight) set now active; None
        # when unknown (a load that failed part-way may have changed it), so the next set is applied.
        self._adapters: dict[str, LoraRef] = {}
        self._active: tuple[tuple[str, float], ...] | None = ()
        self._adapters_fixed = False
        self.adapter_switches = 0
        # Schedulers: one per (pipeline, sampler), each built from the checkpoint's own config as it
        # was at load. A derived pipeline gets its own (from_pipe shares the resident one's), since a
        # scheduler keeps per-call state (its step index) and two pipelines must not step one.
        self._schedulers: dict[tuple[int, SamplerChoice | None], Any] = {}
        self._scheduler_class = ""
        self._scheduler_config: dict[str, Any] = {}
        self.warmup_s: float | None = None  # seconds, once warmed up (workers/warmup.py)
        # CPU stages (resize) have no pipeline to load.
        self.pipeline: Any = None
        if entry.pipeline == RESIZE_PIPELINE:
            return
        self.pipeline = load_checkpoint(entry, self.fetch)
        denoising = self._denoising(self.pipeline)
        self._scheduler_class = type(denoising.scheduler).__name__
        self._scheduler_config = dict(denoising.scheduler.config)
        self._schedulers[(id(denoising), None)] = denoising.scheduler
        # The model's own adapters go in before compiling, which fixes them (see use_adapters).
        self.use_adapters(entry.loras)
        self.pipeline = apply_speedups(self.pipeline, entry, self.device)
        self._adapters_fixed = entry.compile or entry.fuse_qkv

    def fetch(self, source: str) -> str:
        """A source's local path: an s3:// one's copy in the model cache (downloaded if it is not
        there or its objects changed); others (folders, files, hub ids) as they are."""
        if not is_s3(source):
            return source
        cache = self._model_cache if self._model_cache is not None else Settings.from_env().model_cache
        return str(local_copy(source, cache))

    def use_adapters(self, loras: tuple[LoraRef, ...]) -> None:
        """Make `loras`, at their weights, the active adapters of the resident pipeline (and of those
        derived from it, which share its modules). Each adapter is loaded once, under its name
        (load_lora_weights with adapter_name), and kept; a set is switched to with set_adapters; the base
        model is never loaded again. Asking for the active set costs nothing, so a worker switches only
        when a chunk's set differs from the last one's. A compiled (or q/k/v-fused) model keeps the
        adapters of its entry: compiled code would not see a switch, and fused projections bypass them."""
        wanted = tuple((lora.adapter_name, lora.weight) for lora in loras)
        if wanted == self._active:
            return
        if self._adapters_fixed:
            option = "compile" if self.entry.compile else "fuse_qkv"
            raise StageError(
                f"model {self.name} has {option}: it runs with the adapters of its registry entry only, "
                "not a stage's own loras"
            )
        pipeline = self.pipeline
        if not hasattr(pipeline, "load_lora_weights"):
            raise StageError(f"model {self.name} ({self.class_name}) takes no LoRA adapters")
        started = time.perf_counter()
        for lora in loras:
            if lora.adapter_name not in self._adapters:
                self._load_adapter(lora)
        if wanted:
            if not self._active:
                # After disable_lora, set_adapters alone would leave the adapters off.
                pipeline.enable_lora()
            pipeline.set_adapters([name for name, _ in wanted], adapter_weights=[w for _, w in wanted])
        else:
            pipeline.disable_lora()
        self._active = wanted
        self.adapter_switches += 1
        shown = [f"{lora.source} at {lora.weight:g}" for lora in loras]
        emit.adapters_switched(self.name, shown, time.perf_counter() - started)

    def _load_adapter(self, lora: LoraRef) -> None:
        name = lora.adapter_name
        started = time.perf_counter()
        try:
            source = self.fetch(lora.source)
            path = Path(source)
            if path.is_absolute():
                weights = lora_weights_file(path, lora.weight_name)
                self.pipeline.load_lora_weights(
                    str(weights.parent), weight_name=weights.name, adapter_name=name
                )
            elif is_single_file(source) or source.startswith((".", "~")):
                raise ValueError("a relative path, which a worker cannot place: give an absolute path")
            else:  # a hub id
                self.pipeline.load_lora_weights(source, weight_name=lora.weight_name, adapter_name=name)
        except (ConfigError, OSError, ValueError, TypeError, RuntimeError, KeyError) as exc:
            # It may be in some modules already, and active there.
            self._active = None
            self._drop_adapter(name)
            raise StageError(f"model {self.name}: cannot load LoRA {lora.source}: {exc}") from None
        self._adapters[name] = lora
        emit.adapter_loaded(self.name, lora.source, time.perf_counter() - started)

    def _drop_adapter(self, name: str) -> None:
        """Best effort: what a failed load put in place, so that no set can include it."""
        try:
            listed = self.pipeline.get_list_adapters()
            if any(name in adapters for adapters in listed.values()):
                self.pipeline.delete_adapters(name)
        except (ValueError, KeyError, RuntimeError, AttributeError):
            log.warning("model %s: could not remove the adapter %s", self.name, name, exc_info=True)

    @staticmethod
    def _denoising(pipeline: Any) -> Any:
        """The pipeline whose scheduler denoises: Kandinsky's decoder, else the pipeline itself."""
        return getattr(pipeline, "decoder_pipe", pipeline)

    def use_sampler(self, pipeline: Any, params: ResolvedParams, stage: StageSpec) -> dict[str, Any]:
        """Make `pipeline` (the resident one or one derived from it) run the sampler `params` name, or
        the checkpoint's own scheduler; returns the call's arguments the sampler takes beyond it (eta,
        where the stage or its preset sets one: diffusers' default of 0 would turn TCD's noise off).
        Each (pipeline, sampler) scheduler is built once, from the checkpoint's scheduler config as
        loaded with the sampler's flags, and kept; asking for the one the pipeline runs costs nothing,
        so a worker switches only when a chunk's sampler differs. A StageError says why diffusers
        would make a bad image with it (run_problem)."""
        choice = self._choice(params)
        if choice is not None:
            problem = sampler_problem_for_pipeline(self.class_name)
            if problem is not None:
                raise StageError(f"model {self.name}: {problem}")
        denoising = self._denoising(pipeline)
        key = (id(denoising), choice)
        scheduler = self._schedulers.get(key)
        if scheduler is None:
            scheduler = self._schedulers[key] = self._build_scheduler(choice)
            emit.scheduler_built(self.name, _shown(choice), type(denoising).__name__)
        if denoising.scheduler is not scheduler:
            denoising.scheduler = scheduler
            emit.sampler_switched(self.name, _shown(choice), type(denoising).__name__)
        text2img = params.strength is None and not self.is_upscaler
        problem = scheduler_problem(scheduler, choice, params.steps, params.strength, text2img)
        if problem is not None:
            raise StageError(f"{_shown(choice) if choice else type(scheduler).__name__}: {problem}")
        eta = stage_eta(stage)
        return {} if eta is None else {"eta": eta}

    @staticmethod
    def _choice(params: ResolvedParams) -> SamplerChoice | None:
        if params.sampler is None:
            return None
        return SamplerChoice(SAMPLERS[params.sampler], params.schedule)

    def _build_scheduler(self, choice: SamplerChoice | None) -> Any:
        return build_scheduler(self._scheduler_class, self._scheduler_config, choice)

    def ran(self, params: ResolvedParams) -> Ran:
        """What this model runs for an item with these parameters (a resize stage: nothing)."""
        if self.pipeline is None or params.steps is None:
            return Ran(None, None, None, None)
        choice = self._choice(params)
        sampler: Sampler | None
        if choice is not None:
            sampler, schedule = choice.sampler, choice.schedule
        else:
            sampler = sampler_of_class(self._scheduler_class, self._scheduler_config)
            schedule = schedule_of_config(self._scheduler_config)
        denoiser = getattr(self._denoising(self.pipeline), "unet", None)
        embedded = getattr(getattr(denoiser, "config", None), "time_cond_proj_dim", None) is not None
        return Ran(
            sampler.name if sampler else self._scheduler_class,
            schedule,
            denoising_steps(params),
            unet_evaluations(sampler, params.steps, params.strength, params.guidance_scale, embedded),
        )

    @property
    def class_name(self) -> str:
        return type(self.pipeline).__name__

    @property
    def is_upscaler(self) -> bool:
        return self.class_name in UPSCALER_PIPELINES

    def native_size(self) -> tuple[int, int]:
        """The input size this model is made for: the denoiser's sample size in pixels (what the x4
        upscaler's latents have is the input's own size; the x2 upscaler doubles its input)."""
        sample = getattr(getattr(getattr(self.pipeline, "unet", None), "config", None), "sample_size", None)
        if isinstance(sample, list | tuple):
            sample = sample[0]
        if not isinstance(sample, int):
            return BUILTIN_SIZE
        decoder = getattr(self.pipeline, "decoder_pipe", self.pipeline)
        scale = getattr(decoder, "vae_scale_factor", None) or getattr(decoder, "movq_scale_factor", None) or 8
        sides = {X4_UPSCALER: sample, X2_LATENT_UPSCALER: sample * scale // 2}
        side = sides.get(self.class_name, sample * scale)
        side = max(8, side - side % 8)
        return (side, side)

    def _cached(self, key: str, build: Any) -> Any:
        if key not in self._derived:
            derived = build()
            derived.set_progress_bar_config(disable=True)
            # from_pipe hands it the resident pipeline's scheduler, whichever sampler that runs now.
            denoising = self._denoising(derived)
            denoising.scheduler = self._schedulers[(id(denoising), None)] = self._build_scheduler(None)
            self._derived[key] = derived
        return self._derived[key]

    def img2img(self, controlnet: ResolvedModel | None = None) -> Any:
        if self.is_upscaler:
            raise StageError(f"{self.name} is an upscaler ({self.class_name}); use it in an upscale stage")
        if controlnet is None:
            return self.pipeline
        from diffusers import AutoPipelineForImage2Image

        return self._cached(
            f"controlnet:{controlnet.name}",
            lambda: AutoPipelineForImage2Image.from_pipe(
                self.pipeline, controlnet=self._controlnet(controlnet)
            ),
        )

    def text2img(self) -> Any:
        if self.is_upscaler:
            raise StageError(f"{self.name} is an upscaler ({self.class_name}); it cannot generate from text")
        from diffusers import AutoPipelineForText2Image

        return self._cached("text2img", lambda: AutoPipelineForText2Image.from_pipe(self.pipeline))

    def upscaler(self) -> Any:
        if not self.is_upscaler:
            raise StageError(
                f"{self.name} is {self.class_name}, not an upscaler ({', '.join(UPSCALER_PIPELINES)})"
            )
        return self.pipeline

    def _controlnet(self, model: ResolvedModel) -> Any:
        from diffusers import ControlNetModel

        kwargs: dict[str, Any] = {"torch_dtype": self.dtype}
        if model.entry.variant:
            kwargs["variant"] = model.entry.variant
        log.info("loading controlnet %s for %s", model.name, self.name)
        return ControlNetModel.from_pretrained(self.fetch(model.entry.source), **kwargs).to(self.device)

    def scorer(self, model: ResolvedModel) -> ClipScorer:
        """The CLIP checkpoint that scores this model's outputs, loaded on first use and kept, in its
        entry's dtype (float32 on the CPU) on its entry's device. ScoringError if it cannot load."""
        key = f"scorer:{model.name}"
        with self._scorer_lock:
            if key not in self._derived:
                from workers.scoring import ClipScorer

                device = resolve_device(model.entry.device)
                log.info("loading scoring model %s for %s", model.name, self.name)
                try:
                    self._derived[key] = ClipScorer.load(
                        self.fetch(model.entry.source), device, resolve_dtype(model.entry, device)
                    )
                except (OSError, ValueError, TypeError, KeyError, RuntimeError, ImgjobsError) as exc:
                    raise ScoringError(f"scoring model {model.name} cannot load: {exc}") from None
            scorer: ClipScorer = self._derived[key]
        return scorer

    def estimate_depth(self, model: ResolvedModel, image: Image.Image) -> Image.Image:
        """The depth map of image, from the transformers depth-estimation model, loaded on first use.
        Control images are made on the chunk runner's I/O threads, and a transformers pipeline is not
        made for concurrent calls: one at a time (the GPU's main work runs beside it regardless)."""
        key = f"depth:{model.name}"
        with self._depth_lock:
            if key not in self._derived:
                from transformers import pipeline as transformers_pipeline

                log.info("loading depth estimator %s for %s", model.name, self.name)
                self._derived[key] = transformers_pipeline(
                    "depth-estimation",
                    model=self.fetch(model.entry.source),
                    device=self.device,
                    dtype=torch.float32,
                )
            depth: Image.Image = self._derived[key](image)["depth"]
        return depth
