"""The pipelined batch engine: one stage over a list of items, as batched pipeline calls of the
model's batch size, with no Celery and no Redis. What it makes goes to a Sink: finished items (with
their ItemResult) and items handed over to the next stage (with their HandoverItem).

Items are grouped into calls by their stage parameters (a call needs equal steps, strength, size,
...), in their order. While the pipeline runs one call, a thread pool (IMGJOBS_IO_THREADS) fetches
and decodes the inputs of the next ones (and makes the uint8 tensors the stages hand the GPU, in
pinned memory), and encodes and writes the outputs of the last one, an item a task, so the
accelerator does not wait on storage; each call's items reach the sink as soon as their outputs are
written. On a GPU a call returns while its outputs are still being copied back (see
workers.stages.common): the writers wait for the copy, and the thread driving the GPU goes on to the
next call. The time inside the UNet is clocked for the chunk's `unet_share` (workers.unet_clock).

A bad item fails alone: its error reaches the sink and the others go on. Errors that may pass
(StorageError) propagate so the chunk can run again; what was written before is handed to the sink
first, so it is not done twice. An item whose input could not be read for a reason that may pass
leaves the others running: with `retry_inputs` it stays open and the run ends on its error once the
rest is done (the chunk runs again for it alone); without, it fails alone with its own error. A call
that runs out of accelerator memory is halved and run again, down to one item: only an item that
does not fit alone fails. A stage with a `score` gates each call's outputs before they are written
(workers/quality.py): scored, re-rolled where its gate says so, and failed alone where they cannot be
scored; the hash of each kept output is taken where it is written.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, TypeVar

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from jobstate import layout
from jobstate.parts import HandoverItem
from jobstate.storage import Storage
from schemas.errors import (
    ImgjobsError,
    InputImageError,
    LowScoreError,
    NonFiniteOutputError,
    NsfwFlaggedError,
    StageError,
)
from schemas.job import (
    IMAGES,
    Defaults,
    Img2ImgStage,
    ResizeStage,
    ResolvedParams,
    base_prompt,
    resolve_negative_prompt,
    resolve_prompt,
    resolve_seed,
)
from schemas.messages import (
    ChunkItem,
    ItemResult,
    QualityRecord,
    StageInput,
    StagePlan,
    StageRecord,
    item_result,
)
from schemas.settings import LocalRoots, Settings
from workers.events import ChunkInfo, emit
from workers.imageio import decode_image, encode_image, fetch_bytes, fit_image, image_tensor, load_input
from workers.models import LoadedModel
from workers.prompts import prompts_cut_short, weighted_prompt_error
from workers.quality import ScoreGate, describe_shortfall
from workers.samples import SampleReader
from workers.scoring import dhash
from workers.stages.common import (
    SplitOutput,
    StageBatch,
    StageOutput,
    nonfinite_part,
    output_rows,
    run_splitting,
    take_rows,
    to_pil,
)
from workers.stages.inputs import encodes_in_batch
from workers.stages.kinds import STAGES, Stage
from workers.unet_clock import UnetClock

log = logging.getLogger(__name__)
T = TypeVar("T")

LATENT_TENSOR = "latent"
LOOKAHEAD = 2  # calls whose inputs are fetched, or outputs written, while the pipeline runs
GPU_IO_THREADS = 4


@dataclass(frozen=True)
class WorkItem:
    """One item at this stage: where it stands in the job (position, and slot in its part), what the
    stage reads, and its parameters here."""

    position: int
    slot: int
    member: ChunkItem
    params: ResolvedParams


@dataclass(frozen=True)
class StageJob:
    """What the engine needs of the job: its stages, defaults, and whether it writes a dataset."""

    recipe: tuple[StagePlan, ...]
    defaults: Defaults
    dataset: bool
    folder: str | None = None  # the job's own output folder, when local: later stages read from it


class OutputSpool(Protocol):
    """Where the last stage's images go when the job writes shards (workers/shard_sink.py)."""

    def add(self, item_id: str, image_format: str, data: bytes) -> str:
        """Keep an item's encoded image for its shard; returns the URI it will have there."""


class Sink(Protocol):
    def finished(self, done: Sequence[tuple[WorkItem, ItemResult]]) -> None:
        """Items that ended at this stage, succeeded (their outputs written) or failed."""

    def handed_over(self, handed: Sequence[tuple[WorkItem, HandoverItem]]) -> None:
        """Items whose next stage's input is written."""

    def should_stop(self) -> bool:
        """Asked before each call after the first: True stops the run there (a cancel)."""


def output_name(plan: StagePlan, kind: Literal["image", "latent"]) -> str:
    return plan.name if kind == "image" else f"{plan.name}.latent"


@dataclass
class _Prepared:
    work: WorkItem
    image: Image.Image | None = None
    latent: torch.Tensor | None = None
    control: Image.Image | None = None
    pixels: torch.Tensor | None = None  # image as the uint8 tensor the stage hands the device
    control_pixels: torch.Tensor | None = None
    reference: torch.Tensor | None = None  # the item's input image, as the scoring model takes it
    timings: dict[str, float] = field(default_factory=dict)
    written: dict[str, str] = field(default_factory=dict)
    nsfw: bool = False
    error: ImgjobsError | None = None  # the output cannot be written (not finite)
    cut_short: bool = False  # the model's tokenizer cut its prompt to its limit
    quality: QualityRecord | None = None


class _InLine:
    """Runs each task as it is submitted. For a model on the CPU: there the stage itself needs the CPU
    (and the interpreter lock), so I/O threads would only take turns with it."""

    def submit(self, task: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(task(*args))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


Writes = list[Future[_Prepared]]  # one call's, an item each


def _written(writes: Writes) -> list[_Prepared]:
    """The call's items once all are written; the first error raised by one of its writes, if any."""
    return [future.result() for future in writes]


def _all_done(writes: Writes) -> bool:
    return all(future.done() for future in writes)


def calls_of(items: Sequence[WorkItem], size: int) -> list[list[WorkItem]]:
    """Items as pipeline calls of up to `size`: items with equal parameters together, in order."""
    groups: dict[ResolvedParams, list[WorkItem]] = {}
    for work in items:
        groups.setdefault(work.params, []).append(work)
    return [group[start : start + size] for group in groups.values() for start in range(0, len(group), size)]


class StageEngine:
    """Runs one stage of a job on the worker's resident model."""

    def __init__(
        self,
        model: LoadedModel,
        settings: Settings,
        storage: Storage,
        job: StageJob,
        stage_index: int,
        info: ChunkInfo,
        retry_inputs: bool = False,
        spool: OutputSpool | None = None,
        stages: Mapping[str, Stage] = STAGES,
    ) -> None:
        self.model = model
        self.settings = settings
        self.storage = storage
        self.job = job
        self.stage_index = stage_index
        self.plan = job.recipe[stage_index]
        self.is_last = stage_index == len(job.recipe) - 1
        self.info = info
        self.retry_inputs = retry_inputs
        self.stages = stages
        self.roots = LocalRoots.of(settings, job.folder)
        self.cuda = model.device.startswith("cuda")
        # Where the stage hands the pipeline tensors of its images, the I/O threads make them.
        self.takes_pixels = self.plan.spec.type == "img2img" and encodes_in_batch(model.class_name)
        self.busy_s = 0.0
        self.unet_s = 0.0  # inside the UNet (on a GPU, its kernels' time, by CUDA events)
        self.input_error: ImgjobsError | None = None  # the first input read that may pass on retry
        # The last stage's images go here instead of an object each, where the job writes shards.
        self.spool = spool if self.is_last else None
        self.samples: SampleReader | None = None  # first-stage inputs that live in input shards
        score, scorer = self.plan.score, self.plan.scorer
        self.gate = (
            ScoreGate(score, self.plan.name, scorer.name, lambda: model.scorer(scorer))
            if score is not None and scorer is not None
            else None
        )

    # -- the stage

    def run(self, items: Sequence[WorkItem], sink: Sink) -> None:
        samples = [work.member.item.sample for work in items if work.member.item.sample is not None]
        if samples and self.stage_index == 0:
            self.samples = SampleReader(samples, self.settings, self.roots)
        clock = UnetClock(self.model.pipeline, self.cuda)
        try:
            with clock:
                self._run(items, sink)
        finally:
            self.unet_s = clock.seconds()

    def _run(self, items: Sequence[WorkItem], sink: Sink) -> None:
        calls = calls_of(items, self.model.entry.batch_size)
        pool = self._io_pool()
        # On threads, the inputs of the next LOOKAHEAD calls are fetched while a call runs: enough to
        # keep the pipeline fed, while a chunk of large images is never all in memory at once. In line,
        # fetching ahead would overlap nothing and only hold more images.
        ahead = 0 if isinstance(pool, _InLine) else LOOKAHEAD
        writing: deque[Writes] = deque()
        try:
            loading = deque([self._load_all(pool, call) for call in calls[: ahead + 1]])
            for index in range(len(calls)):
                if index and sink.should_stop():
                    break
                ready = self._collect(loading.popleft(), sink)
                ran = self._infer(ready, sink) if ready else None
                # The next loads go in before this call's writes: on a GPU the call may still be running,
                # and its writers wait for it, while the loads never wait for the GPU.
                if index + ahead + 1 < len(calls):
                    loading.append(self._load_all(pool, calls[index + ahead + 1]))
                if ran is not None:
                    writing.append(self._write_all(pool, *ran))
                while writing and (_all_done(writing[0]) or len(writing) > LOOKAHEAD):
                    self._complete(_written(writing.popleft()), sink)
            while writing:
                self._complete(_written(writing.popleft()), sink)
            if self.input_error is not None:
                raise self.input_error
        except BaseException:
            # The chunk will run again (retry or redelivery): record what is already written, and drop
            # the fetches not started rather than wait for them (a time limit may be what stopped us).
            pool.shutdown(wait=False, cancel_futures=True)
            self._salvage(writing, sink)
            raise
        pool.shutdown()

    def _salvage(self, writing: deque[Writes], sink: Sink) -> None:
        """Record the calls whose outputs were written before the run stopped, so that the chunk's next
        run skips them; best effort, since what stopped the run may stop this too."""

        def written(future: Future[_Prepared]) -> bool:
            return future.done() and not future.cancelled() and future.exception() is None

        try:
            while writing and all(written(future) for future in writing[0]):
                self._complete(_written(writing.popleft()), sink)
        except Exception:
            log.warning("chunk %s: could not record every written item", self.info.chunk_id, exc_info=True)

    def _io_pool(self) -> ThreadPoolExecutor | _InLine:
        threads = self.settings.io_threads
        if threads is None:
            threads = 0 if self.model.device == "cpu" else GPU_IO_THREADS
        if threads == 0:
            return _InLine()
        return ThreadPoolExecutor(threads, thread_name_prefix="imgjobs-io")

    # -- results

    def _record(
        self,
        work: WorkItem,
        timings: dict[str, float],
        nsfw: bool = False,
        cut_short: bool = False,
        quality: QualityRecord | None = None,
    ) -> StageRecord:
        spec = self.plan.spec
        return StageRecord(
            name=self.plan.name,
            model=self.plan.model.name,
            params=work.params,
            timings={phase: round(seconds, 4) for phase, seconds in timings.items()},
            nsfw=nsfw,
            prompt=None
            if isinstance(spec, ResizeStage)
            else resolve_prompt(work.member.item, spec, self.job.defaults),
            prompt_truncated=cut_short,
            **self.model.ran(work.params)._asdict(),
            quality=quality,
        )

    def result(
        self,
        work: WorkItem,
        records: list[StageRecord],
        outputs: dict[str, str],
        error: ImgjobsError | None = None,
    ) -> ItemResult:
        member = work.member
        return item_result(
            member.item, self.job.defaults, self.plan, work.params, records, outputs, error, member.overrides
        )

    def failed(
        self,
        work: WorkItem,
        error: ImgjobsError,
        timings: dict[str, float] | None = None,
        nsfw: bool = False,
    ) -> ItemResult:
        records = [*work.member.stages, self._record(work, timings or {}, nsfw)]
        return self.result(work, records, dict(work.member.outputs), error)

    # -- inputs

    def load(self, work: WorkItem) -> _Prepared:
        """Fetch and decode one item's inputs (on an I/O thread, or in line)."""
        started = time.perf_counter()
        prepared = _Prepared(work)
        source = work.member.input
        sample = work.member.item.sample
        if source.kind == "image" and self.samples is not None and sample is not None:
            image = decode_image(self.samples.read(sample), source.uri or sample.shard, self.settings)
            prepared.image = fit_image(image, work.params.size, work.params.resize)
        elif source.kind == "image" and source.uri:
            # The first stage fits inputs to the job's size; later stages take what the previous made.
            size = work.params.size if self.stage_index == 0 else None
            prepared.image = load_input(source.uri, size, self.settings, work.params.resize, self.roots)
            if self.takes_pixels:
                prepared.pixels = image_tensor(prepared.image, pinned=self.cuda)
        elif source.kind == "latent" and source.uri:
            try:
                data = fetch_bytes(source.uri, self.settings, self.roots)
                prepared.latent = load_safetensors(data)[LATENT_TENSOR]
            except (KeyError, ValueError, RuntimeError, SafetensorError) as exc:
                raise InputImageError(f"{source.uri}: not a latent file: {exc}") from None
        spec = self.plan.spec
        if isinstance(spec, Img2ImgStage) and spec.controlnet:
            prepared.control = self._control_image(work, prepared.image)
            if self.takes_pixels:
                prepared.control_pixels = image_tensor(prepared.control, pinned=self.cuda)
        if self.gate is not None:
            prepared.reference = self._reference(work, prepared)
        prepared.timings["fetch_s"] = time.perf_counter() - started
        return prepared

    def _reference(self, work: WorkItem, prepared: _Prepared) -> torch.Tensor | None:
        """What the output's input similarity is measured against: the item's input image, fitted to
        the job's size as its first stage fitted it (read again at a later stage), as the scoring
        model takes it; none without one."""
        assert self.gate is not None
        source = work.member.item.image
        if source is None:
            return None
        image = prepared.image if self.stage_index == 0 else None
        if image is None:
            image = load_input(source, work.params.size, self.settings, work.params.resize, self.roots)
        return self.gate.prepare_input(image)

    def _control_image(self, work: WorkItem, image: Image.Image | None) -> Image.Image:
        if image is None:
            raise InputImageError("a ControlNet stage needs an input image")
        if work.member.item.control_image:
            control = work.member.item.control_image
            return load_input(control, image.size, self.settings, work.params.resize, self.roots)
        if self.plan.depth_model is None:
            raise InputImageError("this stage needs a control_image for each item (or control: depth)")
        depth = self.model.estimate_depth(self.plan.depth_model, image)
        return depth.convert("RGB").resize(image.size, Image.Resampling.BICUBIC)

    def _load_all(
        self, pool: ThreadPoolExecutor | _InLine, call: list[WorkItem]
    ) -> list[tuple[WorkItem, Future[_Prepared]]]:
        return [(work, pool.submit(self.load, work)) for work in call]

    def _collect(self, loads: list[tuple[WorkItem, Future[_Prepared]]], sink: Sink) -> list[_Prepared]:
        """The call's loaded items; those whose input was bad fail, alone. One whose read may pass
        (a storage outage, missing credentials) stays open while retries remain."""
        ready = []
        for work, future in loads:
            try:
                ready.append(future.result())
            except ImgjobsError as exc:
                if exc.retryable and self.retry_inputs:
                    self.input_error = self.input_error or exc
                else:
                    sink.finished([(work, self.failed(work, exc))])
        return ready

    # -- the call

    def _usable_prompts(self, ready: list[_Prepared], sink: Sink) -> list[_Prepared]:
        """The items whose prompts the stage can take; the others fail alone, before the call, so that
        a weighted prompt compel cannot parse in bounded time never holds up, nor fails, the call."""
        spec, defaults = self.plan.spec, self.job.defaults
        if self.plan.prompt_syntax != "compel" or isinstance(spec, ResizeStage):
            return ready
        usable, refused = [], []
        for prepared in ready:
            item = prepared.work.member.item
            negative = resolve_negative_prompt(item, spec, defaults)
            error = weighted_prompt_error(resolve_prompt(item, spec, defaults)) or (
                weighted_prompt_error(negative, "negative prompt") if negative else None
            )
            if error is None:
                usable.append(prepared)
            else:
                refused.append((prepared.work, self.failed(prepared.work, error, prepared.timings)))
        if refused:
            sink.finished(refused)
        return usable

    def _infer(self, ready: list[_Prepared], sink: Sink) -> tuple[list[_Prepared], StageOutput] | None:
        """Run one call: the items that ran and their output, in order; the others have failed."""
        ready = self._usable_prompts(ready, sink)
        if not ready:
            return None
        spec, defaults = self.plan.spec, self.job.defaults
        params = ready[0].work.params
        items = [prepared.work.member.item for prepared in ready]
        images = [p.image for p in ready if p.image is not None]
        latents = [p.latent for p in ready if p.latent is not None]
        controls = [p.control for p in ready if p.control is not None]
        pixels = [p.pixels for p in ready if p.pixels is not None]
        control_pixels = [p.control_pixels for p in ready if p.control_pixels is not None]
        batch = StageBatch(
            prompts=[resolve_prompt(item, spec, defaults) for item in items],
            negative_prompts=[resolve_negative_prompt(item, spec, defaults) for item in items],
            seeds=[resolve_seed(item, defaults) for item in items],
            images=images or None,
            latents=torch.stack(latents) if latents else None,
            control_images=controls or None,
            pixels=pixels if pixels and len(pixels) == len(ready) else None,
            control_pixels=control_pixels if control_pixels and len(control_pixels) == len(ready) else None,
        )
        started = time.perf_counter()
        error: StageError | None = None
        run_stage = self.stages[spec.type]

        def run(piece: StageBatch) -> StageOutput:
            return run_stage(
                self.model,
                self.plan,
                params,
                piece,
                # A scored stage decodes its images even where it writes none: they are what is scored.
                frozenset(self.plan.writes) | (IMAGES if self.gate is not None else frozenset()),
            )

        cut = prompts_cut_short(self.model.pipeline, batch.prompts, self.plan.prompt_syntax)
        for prepared, cut_short in zip(ready, cut, strict=True):
            prepared.cut_short = cut_short
        split = SplitOutput(None, {})
        try:
            # static_batch: calls of one batch size (padded or split), so compiled code sees one shape.
            split = run_splitting(run, batch, self.model.entry.static_batch)
        except StageError as exc:
            error = exc
        except (ValueError, TypeError, RuntimeError) as exc:
            # The pipeline refused these inputs; the message is diffusers' own.
            error = StageError(f"{type(exc).__name__}: {exc}")
        busy_s = time.perf_counter() - started
        self.busy_s += busy_s
        emit.call_done(self.info, len(ready), busy_s)
        for prepared in ready:
            prepared.timings["infer_s"] = busy_s / len(ready)
        if error is not None:
            sink.finished([(p.work, self.failed(p.work, error, p.timings)) for p in ready])
            return None
        if split.failed:
            sink.finished(
                [
                    (p.work, self.failed(p.work, split.failed[row], p.timings))
                    for row, p in enumerate(ready)
                    if row in split.failed
                ]
            )
        if split.output is None:
            return None
        ran = [row for row in range(len(ready)) if row not in split.failed]
        kept = [ready[row] for row in ran]
        if self.gate is None:
            return kept, split.output
        if split.failed:
            batch = take_rows(batch, ran, [batch.seeds[row] for row in ran])
        return self._gate(kept, batch, split.output, run, sink)

    def _gate(
        self,
        ready: list[_Prepared],
        batch: StageBatch,
        output: StageOutput,
        run: Callable[[StageBatch], StageOutput],
        sink: Sink,
    ) -> tuple[list[_Prepared], StageOutput] | None:
        """The call's outputs through the stage's score gate: each item's kept output, and its scores
        on it; an item that could not be scored fails, alone."""
        assert self.gate is not None
        # Scores are taken from the images in host memory: on a GPU, once the call's copy is done.
        output = output.wait()

        def run_again(piece: StageBatch) -> SplitOutput:
            started = time.perf_counter()
            try:
                split = run_splitting(run, piece, self.model.entry.static_batch)
                return replace(split, output=split.output.wait() if split.output is not None else None)
            finally:
                emit.call_done(self.info, len(piece), time.perf_counter() - started)

        started = time.perf_counter()
        prompts = [base_prompt(p.work.member.item, self.job.defaults) or None for p in ready]
        gated = self.gate.apply(batch, prompts, [p.reference for p in ready], output, run_again)
        self.busy_s += time.perf_counter() - started
        kept: list[int] = []
        failed: list[tuple[WorkItem, ItemResult]] = []
        for row, (prepared, quality) in enumerate(zip(ready, gated.rows, strict=True)):
            prepared.reference = None  # not needed past here; a chunk may hold many
            prepared.timings["score_s"] = quality.score_s
            if quality.reroll_s:
                prepared.timings["reroll_s"] = quality.reroll_s
            if quality.error is not None:
                failed.append((prepared.work, self.failed(prepared.work, quality.error, prepared.timings)))
                continue
            prepared.quality = quality.record
            kept.append(row)
        if failed:
            sink.finished(failed)
        if not kept:
            return None
        return [ready[row] for row in kept], output_rows(gated.output, kept)

    # -- outputs

    def _write_all(
        self, pool: ThreadPoolExecutor | _InLine, ready: list[_Prepared], output: StageOutput
    ) -> Writes:
        """One call's outputs, encoded and written an item a task, side by side on the I/O threads: the
        chunk waits for its last call's writes before it ends, and the next chunk cannot start sooner."""
        return [pool.submit(self._write_one, prepared, output, row) for row, prepared in enumerate(ready)]

    def _write_one(self, prepared: _Prepared, output: StageOutput, row: int) -> _Prepared:
        """Encode and write one item's output, and hash it where it is scored."""
        output = output.wait()  # on a GPU: until the call has run and its outputs are in host memory
        started = time.perf_counter()
        prepared.nsfw = bool(output.nsfw and output.nsfw[row])
        # Checked in host memory, after the copy: a NaN would otherwise be written as a black image.
        prepared.error = self._nonfinite(output, row)
        if prepared.error is None:
            picture = to_pil(output.images[row]) if output.images is not None else None
            if prepared.quality is not None and picture is not None:
                prepared.quality = prepared.quality.model_copy(update={"phash": dhash(picture)})
            prepared.written = self._write(prepared.work.member.item.id, output, row, picture)
        prepared.timings["write_s"] = time.perf_counter() - started
        return prepared

    def _nonfinite(self, output: StageOutput, index: int) -> NonFiniteOutputError | None:
        part = nonfinite_part(output, index)
        if part is None:
            return None
        dtype = str(self.model.dtype).removeprefix("torch.")
        return NonFiniteOutputError(
            f"{self.plan.name}: the {part} came out NaN or infinite in {dtype} (a numeric overflow); nothing "
            "was written. The model's dtype bfloat16 or float32 avoids it"
        )

    def _write(
        self, item_id: str, output: StageOutput, index: int, picture: Image.Image | None
    ) -> dict[str, str]:
        written: dict[str, str] = {}
        if "image" in self.plan.writes and picture is not None:
            spec, image_format = self.plan.spec, self.plan.image_format
            quality = spec.quality if isinstance(spec, ResizeStage) else None
            data = encode_image(picture, image_format, quality)
            key = layout.output_key(item_id, self.plan, "image")
            if self.spool is not None:
                written["image"] = self.spool.add(item_id, image_format, data)
            else:
                written["image"] = self.storage.put(key, data, f"image/{image_format}")
            if self.job.dataset and self.is_last:
                self.storage.put(layout.dataset_image(item_id, image_format), data, f"image/{image_format}")
        if "latent" in self.plan.writes and output.latents is not None:
            data = save_safetensors({LATENT_TENSOR: output.latents[index].contiguous()})
            key = layout.output_key(item_id, self.plan, "latent")
            written["latent"] = self.storage.put(key, data, "application/octet-stream")
        return written

    def _complete(self, written: list[_Prepared], sink: Sink) -> None:
        """One call's items, written: finished here (the last stage) or on to the next stage."""
        finished: list[tuple[WorkItem, ItemResult]] = []
        handed: list[tuple[WorkItem, HandoverItem]] = []
        for prepared in written:
            work = prepared.work
            if prepared.error is not None:
                finished.append((work, self.failed(work, prepared.error, prepared.timings)))
                continue
            if prepared.nsfw and self.model.entry.on_nsfw == "fail":
                flagged = NsfwFlaggedError(f"{self.plan.name}: the safety checker flagged the output")
                finished.append((work, self.failed(work, flagged, prepared.timings, nsfw=True)))
                continue
            record = self._record(work, prepared.timings, prepared.nsfw, prepared.cut_short, prepared.quality)
            records = [*work.member.stages, record]
            outputs = dict(work.member.outputs)
            outputs.update({output_name(self.plan, kind): prepared.written[kind] for kind in self.plan.save})
            low = self._low_score(prepared.quality)
            if self.is_last or low is not None:
                # A failed low-scoring item keeps its saved output in its row: it is what to look at.
                finished.append((work, self.result(work, records, outputs, low)))
                continue
            handover = HandoverItem(
                slot=work.slot,
                input=StageInput(kind=self.plan.handover, uri=prepared.written[self.plan.handover]),
                outputs=outputs,
                stages=records,
            )
            handed.append((work, handover))
        if finished:
            sink.finished(finished)
        if handed:
            sink.handed_over(handed)

    def _low_score(self, quality: QualityRecord | None) -> LowScoreError | None:
        """The error of an output below a gate that fails such items; None otherwise."""
        score = self.plan.score
        if quality is None or not quality.low_score or score is None or score.on_low_score != "fail":
            return None
        return LowScoreError(f"{self.plan.name}: {describe_shortfall(quality, score)}")
