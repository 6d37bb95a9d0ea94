"""The job's end, as a task of its own on a CPU worker: results.jsonl (manifest order, one line per
item), the dataset's metadata.jsonl when asked for, and report.html, made from the job's parts; then
the job is finished.

The chunk whose end left no work in flight sends the end (JobEnd); more than one may be sent, and
a redelivered one runs again, but the claim in jobstate lets one task per round write it. A
permanent error marks the job failed with its reason at once; a retryable one (storage away) is
retried by the task, then marks the job failed too: nothing leaves a job running for ever.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jobstate import layout
from jobstate.meta import JobMeta
from jobstate.parts import JobParts
from jobstate.results import part_results
from jobstate.storage import Storage, open_storage
from jobstate.store import JobStore
from schemas.errors import ImgjobsError, UnknownJobError
from schemas.messages import ItemResult, JobEnd, score_columns
from schemas.settings import LocalRoots, Settings
from workers.events import emit
from workers.report import write_report

log = logging.getLogger(__name__)

STALE_WAIT_S = 120.0  # how long an end that found itself stale waits for a newer one being written


@dataclass(frozen=True)
class EndContext:
    store: JobStore
    settings: Settings
    open_storage: Callable[[str, str], Storage] = open_storage


class RetryEnd(Exception):
    def __init__(self, error: ImgjobsError) -> None:
        super().__init__(str(error))
        self.error = error


def end_job(end: JobEnd, ctx: EndContext, token: str, may_retry: bool = False) -> str:
    """Write the job's end if this task holds its claim; returns what happened ('finished', 'failed',
    or why nothing was done). With `may_retry`, a retryable error raises RetryEnd."""
    try:
        meta = ctx.store.meta(end.job_id)
    except UnknownJobError:
        return "unknown"
    if meta.run_id != end.run_id:
        return "unknown"
    claim = ctx.store.claim_end(meta, end.round, token)
    if claim != "run":
        log.info("job %s: end of round %d not written here: %s", end.job_id, end.round, claim)
        return claim
    started = time.perf_counter()
    try:
        results_uri, report_uri = write_end(meta, ctx)
    except ImgjobsError as exc:
        if exc.retryable and may_retry:
            raise RetryEnd(exc) from exc
        return _failed(meta, end, ctx, token, f"{type(exc).__name__}: {exc}", started)
    except Exception as exc:
        log.exception("job %s: unexpected error writing its end", end.job_id)
        return _failed(meta, end, ctx, token, f"{type(exc).__name__}: {exc}", started)
    if not ctx.store.finish_job(meta, end.round, token, results_uri, report_uri):
        _after_a_stale_end(end, ctx)
        return "stale"
    seconds = time.perf_counter() - started
    log.info("job %s finished in %.1f s of end; results at %s", end.job_id, seconds, results_uri)
    emit.job_ended(end.job_id, seconds, None)
    return "finished"


def _after_a_stale_end(end: JobEnd, ctx: EndContext, attempts: int = 3) -> None:
    """A retry opened a new round while this end was written. Should that round's end finish before
    this one's files landed, they overwrote the newer ones: so wait for a newer end that is being
    written, then write the files again from the parts as they are (final once the job is finished),
    until no round changes meanwhile."""
    deadline = time.monotonic() + STALE_WAIT_S
    for _ in range(attempts):
        meta = ctx.store.meta(end.job_id)
        while meta.finished_at is None and ctx.store.end_claimed(meta) and time.monotonic() < deadline:
            time.sleep(0.5)
            meta = ctx.store.meta(end.job_id)
        if meta.run_id != end.run_id or meta.finished_at is None or meta.end_error is not None:
            log.info("job %s: reopened while its end was written; its next end writes it", end.job_id)
            return
        write_end(meta, ctx)
        latest = ctx.store.meta(end.job_id)
        if (latest.round, latest.finished_at) == (meta.round, meta.finished_at):
            log.info("job %s: its end of round %d written again over an older one", end.job_id, meta.round)
            return


def _failed(meta: JobMeta, end: JobEnd, ctx: EndContext, token: str, reason: str, started: float) -> str:
    log.error("job %s: its end could not be written: %s", end.job_id, reason)
    ctx.store.finish_job(meta, end.round, token, error=f"the job's end could not be written: {reason}")
    emit.job_ended(end.job_id, time.perf_counter() - started, reason)
    return "failed"


def write_end(meta: JobMeta, ctx: EndContext) -> tuple[str, str]:
    """results.jsonl, the dataset's metadata and the report; returns the URIs of the first and last."""
    storage = ctx.open_storage(meta.output, meta.job_id)
    parts = JobParts(storage, meta.run_id)
    bits = ctx.store.bits(meta)
    last = meta.recipe[-1]
    with tempfile.TemporaryDirectory(prefix="imgjobs-end-") as tmp:
        results_path, dataset_path = Path(tmp) / layout.RESULTS, Path(tmp) / "metadata.jsonl"
        with (
            results_path.open("w", encoding="utf-8") as out,
            dataset_path.open("w", encoding="utf-8") as rows,
        ):
            for part in range(meta.parts):
                for line in part_results(meta, parts, bits, part):
                    out.write(line.line + "\n")
                    needed = meta.spec.dataset and not line.failed
                    result = ItemResult.model_validate_json(line.line) if needed else None
                    if result is not None and result.status == "succeeded":
                        rows.write(json.dumps(_dataset_row(result, last.image_format)) + "\n")
        results_uri = storage.put_file(layout.RESULTS, results_path, "application/x-ndjson")
        if meta.spec.dataset:
            storage.put_file(layout.DATASET_METADATA, dataset_path, "application/x-ndjson")
        # From the results file just written, so the report reads the parts no second time.
        roots = LocalRoots.of(ctx.settings, meta.local_folder)
        report_uri = write_report(meta, results_path, storage, ctx.settings, roots)
    return results_uri, report_uri


def _dataset_row(result: ItemResult, image_format: str) -> dict[str, object]:
    """metadata.jsonl's row, in the layout the `datasets` imagefolder loader reads. `prompt` is the
    item's, `prompt_used` what the last stage that takes a prompt ran with (after its template); a
    scored job's rows carry the scores, so that the dataset can be filtered without its images."""
    used = [record.prompt for record in result.stages if record.prompt is not None]
    return {
        "file_name": layout.dataset_file_name(result.id, image_format),
        "id": result.id,
        "prompt": result.prompt,
        "prompt_used": used[-1] if used else result.prompt,
        "seed": result.seed,
        "model": result.model,
        "source": result.image,
        **score_columns(result.quality),
    }


def run_end_here(ctx: EndContext) -> Callable[[JobEnd], None]:
    """A send_end that writes the end at once, in this process: for tests and benchmarks that run
    chunks without Celery."""
    counter = iter(range(1 << 62))

    def send_end(end: JobEnd) -> None:
        end_job(end, ctx, token=f"here-{next(counter)}")

    return send_end
