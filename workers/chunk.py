"""Running one chunk at one stage: fetch and decode inputs, batched stage calls, write outputs, then
either hand the items to the next stage's queue or record them as finished.

A chunk runs as calls of the model's batch size. While the pipeline runs one call, a thread pool
(IMGJOBS_IO_THREADS) fetches and decodes the inputs of the next ones and encodes and writes the
outputs of the last one, so the accelerator does not wait on storage. Items are recorded as finished
a batch at a time, in one Redis round trip, as soon as their outputs are written.

A bad item fails alone: its error is recorded and the others go on. Errors that may pass
(StorageError) propagate so the task can retry the chunk; items already finished, or already
handed to the next stage, are skipped then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import redis
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from schemas import keys
from schemas.errors import ImgjobsError, InputImageError, ItemError, StageError, StorageError
from schemas.job import (
    Img2ImgStage,
    ResizeStage,
    ResolvedParams,
    base_prompt,
    resolve_negative_prompt,
    resolve_params,
    resolve_prompt,
    resolve_seed,
)
from schemas.messages import Chunk, ChunkItem, ErrorInfo, ItemResult, StageInput, StagePlan, StageRecord
from schemas.settings import Settings
from workers.imageio import encode_image, fetch_bytes, load_input
from workers.models import LoadedModel
from workers.observability import record_busy, record_item, record_stage
from workers.progress import JobProgress
from workers.report import MAX_ITEMS as REPORT_MAX_ITEMS
from workers.report import render_report
from workers.stages.common import StageBatch, StageOutput, run_static, to_pil
from workers.stages.img2img import run_img2img
from workers.stages.resize import run_resize
from workers.stages.text2img import run_text2img
from workers.stages.upscale import run_upscale
from workers.storage import Storage, open_storage

log = logging.getLogger(__name__)
T = TypeVar("T")

STAGES = {"img2img": run_img2img, "text2img": run_text2img, "upscale": run_upscale, "resize": run_resize}
RESULTS_KEY = "results.jsonl"
DATASET_DIR = "dataset"
REPORT_KEY = "report.html"
LATENT_TENSOR = "latent"
LOOKAHEAD = 2  # batches whose inputs are fetched, or outputs written, while the pipeline runs
GPU_IO_THREADS = 4


@dataclass(frozen=True)
class ChunkContext:
    """What a worker process holds for the life of its model."""

    model: LoadedModel
    settings: Settings
    redis: redis.Redis
    send_chunk: Callable[[Chunk], None]
    open_storage: Callable[[str, str], Storage] = open_storage


def output_key(item_id: str, plan: StagePlan, kind: Literal["image", "latent"]) -> str:
    return f"{item_id}/{plan.name}.{plan.image_format if kind == 'image' else 'safetensors'}"


def output_name(plan: StagePlan, kind: Literal["image", "latent"]) -> str:
    return plan.name if kind == "image" else f"{plan.name}.latent"


@dataclass
class _Prepared:
    member: ChunkItem
    image: Image.Image | None = None
    latent: torch.Tensor | None = None
    control: Image.Image | None = None
    timings: dict[str, float] = field(default_factory=dict)
    written: dict[str, str] = field(default_factory=dict)


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


def _summed(records: list[StageRecord]) -> dict[str, float]:
    total: dict[str, float] = {}
    for record in records:
        for phase, seconds in record.timings.items():
            total[phase] = round(total.get(phase, 0.0) + seconds, 4)
    return total


class _ChunkRun:
    def __init__(self, chunk: Chunk, ctx: ChunkContext) -> None:
        self.chunk = chunk
        self.ctx = ctx
        self.plan = chunk.stage
        self.progress = JobProgress(ctx.redis, chunk.job_id)
        self.storage = ctx.open_storage(chunk.output, chunk.job_id)

    # -- results

    def _result(
        self,
        member: ChunkItem,
        records: list[StageRecord],
        outputs: dict[str, str],
        error: ImgjobsError | None = None,
    ) -> ItemResult:
        item, defaults = member.item, self.chunk.defaults
        return ItemResult(
            id=item.id,
            status="failed" if error else "succeeded",
            image=item.image,
            outputs=outputs,
            seed=resolve_seed(item, defaults),
            model=self.plan.model.name,
            prompt=base_prompt(item, defaults),
            negative_prompt=resolve_negative_prompt(item, self.plan.spec, defaults),
            params=self.chunk.params,
            stages=records,
            timings=_summed(records),
            error=ErrorInfo(type=type(error).__name__, message=str(error)) if error else None,
            failed_stage=self.plan.name if error else None,
        )

    def _finish(self, results: list[ItemResult]) -> None:
        """Record the results first: only then are the handover files surplus, and a failure to delete
        them costs some storage, never the item."""
        for result, recorded in zip(results, self.progress.finish(results), strict=True):
            if not recorded:
                continue  # finished already, or handed on (a late fail_items): nothing of ours to record
            reason = result.error.type if result.error else None
            if result.error:
                log.warning(
                    "item %s failed: %s: %s",
                    result.id,
                    result.error.type,
                    result.error.message,
                    extra={"item_id": result.id, "reason": result.error.type},
                )
            record_item(self.plan.model.name, self.plan.name, result.status, reason)
            try:
                self._delete_intermediates(result.id)
            except StorageError as exc:
                log.warning(
                    "item %s: handover files not deleted: %s", result.id, exc, extra={"item_id": result.id}
                )

    def fail(self, member: ChunkItem, error: ImgjobsError, timings: dict[str, float] | None = None) -> None:
        records = [*member.stages, self._record(timings or {})]
        # Kept before the failure is recorded, so `imgjobs retry` always finds what to run again.
        self.progress.keep_for_retry(member.item)
        self._finish([self._result(member, records, dict(member.outputs), error)])

    def _record(self, timings: dict[str, float]) -> StageRecord:
        record_stage(self.plan.model.name, self.plan.name, timings)
        return StageRecord(
            name=self.plan.name,
            model=self.plan.model.name,
            params=self.chunk.params,
            timings={phase: round(seconds, 4) for phase, seconds in timings.items()},
        )

    def _delete_intermediates(self, item_id: str) -> None:
        """Handover files nobody asked to keep go once the item is finished, never earlier."""
        for plan in self.chunk.recipe[: self.chunk.stage_index]:
            for kind in plan.writes:
                if kind not in plan.save:
                    self.storage.delete(output_key(item_id, plan, kind))

    # -- inputs

    def _load(self, member: ChunkItem) -> _Prepared:
        started = time.perf_counter()
        prepared = _Prepared(member)
        source = member.input
        if source.kind == "image" and source.uri:
            # The first stage fits inputs to the job's size; later stages take what the previous made.
            size = self.chunk.params.size if self.chunk.stage_index == 0 else None
            prepared.image = load_input(source.uri, size, self.ctx.settings, self.chunk.params.resize)
        elif source.kind == "latent" and source.uri:
            try:
                prepared.latent = load_safetensors(fetch_bytes(source.uri, self.ctx.settings))[LATENT_TENSOR]
            except (KeyError, ValueError, RuntimeError, SafetensorError) as exc:
                raise InputImageError(f"{source.uri}: not a latent file: {exc}") from None
        spec = self.plan.spec
        if isinstance(spec, Img2ImgStage) and spec.controlnet:
            prepared.control = self._control_image(member, prepared.image)
        prepared.timings["fetch_s"] = time.perf_counter() - started
        return prepared

    def _control_image(self, member: ChunkItem, image: Image.Image | None) -> Image.Image:
        if image is None:
            raise InputImageError("a ControlNet stage needs an input image")
        if member.item.control_image:
            return load_input(
                member.item.control_image, image.size, self.ctx.settings, self.chunk.params.resize
            )
        if self.plan.depth_model is None:
            raise InputImageError("this stage needs a control_image for each item (or control: depth)")
        depth = self.ctx.model.estimate_depth(self.plan.depth_model, image)
        return depth.convert("RGB").resize(image.size, Image.Resampling.BICUBIC)

    # -- the stage

    def run(self, members: list[ChunkItem]) -> None:
        size = self.ctx.model.entry.batch_size
        batches = [members[start : start + size] for start in range(0, len(members), size)]
        started, busy_s = time.perf_counter(), 0.0
        handed: list[tuple[ChunkItem, ResolvedParams]] = []
        pool = self._io_pool()
        # On threads, the inputs of the next LOOKAHEAD calls are fetched while a call runs: enough to
        # keep the pipeline fed, while a chunk of large images is never all in memory at once. In line,
        # fetching ahead would overlap nothing and only hold more images.
        ahead = 0 if isinstance(pool, _InLine) else LOOKAHEAD
        writing: deque[Future[list[_Prepared]]] = deque()
        try:
            loading = deque([self._load_all(pool, batch) for batch in batches[: ahead + 1]])
            for index in range(len(batches)):
                ready = self._collect(loading.popleft())
                call_started = time.perf_counter()
                output = self._infer(ready) if ready else None
                busy_s += time.perf_counter() - call_started
                if index + ahead + 1 < len(batches):
                    loading.append(self._load_all(pool, batches[index + ahead + 1]))
                if output is not None:
                    writing.append(pool.submit(self._write_all, ready, output))
                while writing and (writing[0].done() or len(writing) > LOOKAHEAD):
                    handed += self._complete(writing.popleft().result())
            while writing:
                handed += self._complete(writing.popleft().result())
        except BaseException:
            # The chunk will run again (retry or redelivery): keep what is already written, and drop
            # the fetches not started rather than wait for them (a time limit may be what stopped us).
            pool.shutdown(wait=False, cancel_futures=True)
            self._salvage(writing, handed)
            raise
        pool.shutdown()
        if handed:
            self._hand_over(handed)
        elapsed = time.perf_counter() - started
        record_busy(self.plan.model.name, busy_s)
        log.info(
            "chunk %s: %d item(s) in %d call(s), %.3f s; pipeline busy %.3f s (duty cycle %.0f%%)",
            self.chunk.chunk_id,
            len(members),
            len(batches),
            elapsed,
            busy_s,
            100 * busy_s / elapsed if elapsed else 0.0,
            extra={
                "busy_s": round(busy_s, 4),
                "elapsed_s": round(elapsed, 4),
                "duty_cycle": round(busy_s / elapsed, 4) if elapsed else 0.0,
            },
        )

    def _salvage(
        self, writing: deque[Future[list[_Prepared]]], handed: list[tuple[ChunkItem, ResolvedParams]]
    ) -> None:
        """Record the calls whose outputs were written before the chunk stopped, so the chunk's next
        run skips them; best effort, since what stopped the chunk may stop this too."""
        try:
            while writing and writing[0].done() and not writing[0].cancelled() and not writing[0].exception():
                handed += self._complete(writing.popleft().result())
            if handed:
                self._hand_over(handed)
        except Exception:
            log.warning("chunk %s: could not record every written item", self.chunk.chunk_id, exc_info=True)

    def _io_pool(self) -> ThreadPoolExecutor | _InLine:
        threads = self.ctx.settings.io_threads
        if threads is None:
            threads = 0 if self.ctx.model.device == "cpu" else GPU_IO_THREADS
        if threads == 0:
            return _InLine()
        return ThreadPoolExecutor(threads, thread_name_prefix="imgjobs-io")

    def _load_all(
        self, pool: ThreadPoolExecutor | _InLine, batch: list[ChunkItem]
    ) -> list[tuple[ChunkItem, Future[_Prepared]]]:
        return [(member, pool.submit(self._load, member)) for member in batch]

    def _collect(self, loads: list[tuple[ChunkItem, Future[_Prepared]]]) -> list[_Prepared]:
        """The batch's loaded items; those whose input was bad are recorded as failed."""
        ready = []
        for member, future in loads:
            try:
                ready.append(future.result())
            except ItemError as exc:
                self.fail(member, exc)
        return ready

    def _write_all(self, ready: list[_Prepared], output: StageOutput) -> list[_Prepared]:
        """On an I/O thread: encode and write one call's outputs."""
        for index, prepared in enumerate(ready):
            started = time.perf_counter()
            prepared.written = self._write(prepared.member.item.id, output, index)
            prepared.timings["write_s"] = time.perf_counter() - started
        return ready

    def _complete(self, written: list[_Prepared]) -> list[tuple[ChunkItem, ResolvedParams]]:
        """Record one call's items as finished (the last stage), or return them for the next stage."""
        finished: list[ItemResult] = []
        handed: list[tuple[ChunkItem, ResolvedParams]] = []
        for prepared in written:
            member = prepared.member
            records = [*member.stages, self._record(prepared.timings)]
            outputs = dict(member.outputs)
            outputs.update({output_name(self.plan, kind): prepared.written[kind] for kind in self.plan.save})
            if self.chunk.is_last_stage:
                finished.append(self._result(member, records, outputs))
                continue
            follower = ChunkItem(
                item=member.item,
                input=StageInput(kind=self.plan.handover, uri=prepared.written[self.plan.handover]),
                outputs=outputs,
                stages=records,
            )
            next_spec = self.chunk.recipe[self.chunk.stage_index + 1].spec
            handed.append((follower, resolve_params(member.item, next_spec, self.chunk.defaults)))
        if finished:
            self._finish(finished)
            self.progress.stage_passed(self.plan.name, len(finished))
        return handed

    def _infer(self, ready: list[_Prepared]) -> StageOutput | None:
        spec, defaults = self.plan.spec, self.chunk.defaults
        items = [prepared.member.item for prepared in ready]
        images = [p.image for p in ready if p.image is not None]
        latents = [p.latent for p in ready if p.latent is not None]
        controls = [p.control for p in ready if p.control is not None]
        batch = StageBatch(
            prompts=[resolve_prompt(item, spec, defaults) for item in items],
            negative_prompts=[resolve_negative_prompt(item, spec, defaults) for item in items],
            seeds=[resolve_seed(item, defaults) for item in items],
            images=images or None,
            latents=torch.stack(latents) if latents else None,
            control_images=controls or None,
        )
        started = time.perf_counter()
        error: StageError | None = None
        run_stage = STAGES[spec.type]

        def run(piece: StageBatch) -> StageOutput:
            return run_stage(
                self.ctx.model,
                self.plan,
                self.chunk.params,
                piece,
                want_images="image" in self.plan.writes,
                want_latents="latent" in self.plan.writes,
            )

        try:
            # static_batch: calls of one batch size (padded or split), so compiled code sees one shape.
            output = run_static(run, batch, self.ctx.model.entry.static_batch)
        except StageError as exc:
            error = exc
        except (ValueError, TypeError, RuntimeError) as exc:
            # The pipeline refused these inputs; the message is diffusers' own.
            error = StageError(f"{type(exc).__name__}: {exc}")
        share = (time.perf_counter() - started) / len(ready)
        for prepared in ready:
            prepared.timings["infer_s"] = share
        if error is not None:
            for prepared in ready:
                self.fail(prepared.member, error, prepared.timings)
            return None
        return output

    def _write(self, item_id: str, output: StageOutput, index: int) -> dict[str, str]:
        written: dict[str, str] = {}
        if "image" in self.plan.writes and output.images is not None:
            spec, image_format = self.plan.spec, self.plan.image_format
            quality = spec.quality if isinstance(spec, ResizeStage) else None
            data = encode_image(to_pil(output.images[index]), image_format, quality)
            key = output_key(item_id, self.plan, "image")
            written["image"] = self.storage.put(key, data, f"image/{image_format}")
            if self.chunk.dataset and self.chunk.is_last_stage:
                self.storage.put(f"{DATASET_DIR}/{item_id}.{image_format}", data, f"image/{image_format}")
        if "latent" in self.plan.writes and output.latents is not None:
            data = save_safetensors({LATENT_TENSOR: output.latents[index].contiguous()})
            key = output_key(item_id, self.plan, "latent")
            written["latent"] = self.storage.put(key, data, "application/octet-stream")
        return written

    def _hand_over(self, handed: list[tuple[ChunkItem, ResolvedParams]]) -> None:
        """Queue the next stage's chunks (regrouped: an item's own overrides may split a group), then
        record the handover; a crash in between queues them again, and the next stage skips repeats."""
        next_index = self.chunk.stage_index + 1
        groups: dict[ResolvedParams, list[ChunkItem]] = {}
        for follower, params in handed:
            groups.setdefault(params, []).append(follower)
        for params, followers in groups.items():
            self.ctx.send_chunk(
                self.chunk.model_copy(
                    update={
                        "chunk_id": f"{self.chunk.chunk_id}/s{next_index}.{_digest_of(followers)}",
                        "stage_index": next_index,
                        "params": params,
                        "items": followers,
                    }
                )
            )
        self.progress.handed_over([follower.item.id for follower, _ in handed], self.chunk.stage_index)
        self.progress.stage_passed(self.plan.name, len(handed))
        record_item(self.plan.model.name, self.plan.name, "handed_over", count=len(handed))

    # -- the job's end

    def finalize_if_done(self) -> None:
        """Finalize when no item is open and the job is not marked finished. Decided from the job's
        state rather than from this chunk's transitions, so a finalize that failed is done again by
        the retry of its chunk (or by any later chunk of the job)."""
        if self.progress.unfinalized():
            self.finalize()

    def finalize(self) -> None:
        """Write results.jsonl and report.html, then mark the job finished."""
        shown: list[ItemResult] = []
        total = int(self.ctx.redis.hget(keys.job_meta(self.chunk.job_id), "total") or 0)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / RESULTS_KEY
            with path.open("w", encoding="utf-8") as out:
                for line in self.progress.result_lines():
                    out.write(line + "\n")
                    if len(shown) < REPORT_MAX_ITEMS:
                        shown.append(ItemResult.model_validate_json(line))
            results_uri = self.storage.put_file(RESULTS_KEY, path, "application/x-ndjson")
        if self.chunk.dataset:
            self._write_dataset_metadata()
        report = render_report(self.chunk.job_id, shown, total, self.ctx.settings)
        report_uri = self.storage.put(REPORT_KEY, report.encode(), "text/html; charset=utf-8")
        self.progress.mark_finished(results_uri, report_uri)
        log.info("job %s finished; results at %s", self.chunk.job_id, results_uri)

    def _write_dataset_metadata(self) -> None:
        """metadata.jsonl beside the dataset images, in the layout the `datasets` imagefolder loader reads."""
        last = self.chunk.recipe[-1]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "metadata.jsonl"
            with path.open("w", encoding="utf-8") as out:
                for line in self.progress.result_lines():
                    result = ItemResult.model_validate_json(line)
                    if result.status != "succeeded":
                        continue
                    row = {
                        "file_name": f"{result.id}.{last.image_format}",
                        "id": result.id,
                        "prompt": result.prompt,
                        "seed": result.seed,
                        "model": result.model,
                        "source": result.image,
                    }
                    out.write(json.dumps(row) + "\n")
            self.storage.put_file(f"{DATASET_DIR}/metadata.jsonl", path, "application/x-ndjson")


def _digest_of(members: list[ChunkItem]) -> str:
    """Names a handed-over chunk by its items. A run stopped part-way (a storage outage) hands over
    what it finished, and its retry the rest: numbered per run, both would be ".0", and the next stage
    would count the second as a redelivery of the first (and dead-letter healthy chunks). The same items
    handed over twice (a redelivered parent) still get the same id."""
    return hashlib.sha256("\n".join(member.item.id for member in members).encode()).hexdigest()[:12]


def process_chunk(chunk: Chunk, ctx: ChunkContext) -> None:
    run = _ChunkRun(chunk, ctx)
    todo = set(run.progress.start((member.item.id for member in chunk.items), chunk.stage_index))
    members = [member for member in chunk.items if member.item.id in todo]
    if len(members) < len(chunk.items):
        log.info(
            "chunk %s: %d item(s) already done, skipped", chunk.chunk_id, len(chunk.items) - len(members)
        )
    if members:
        run.run(members)
    run.finalize_if_done()


def fail_items(chunk: Chunk, ctx: ChunkContext, error: ImgjobsError) -> None:
    """Record the chunk's items that are still this stage's to do as failed with error."""
    run = _ChunkRun(chunk, ctx)
    open_here = set(run.progress.open_at((member.item.id for member in chunk.items), chunk.stage_index))
    for member in chunk.items:
        if member.item.id in open_here:
            run.fail(member, error)
    run.finalize_if_done()
