"""What the `imgjobs` commands print for people: the two consoles, the tables and the progress bar.
The commands (jobs/cli.py) read the state and decide; these only lay it out. JSON output stays with
the commands, as plain prints that scripts parse."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from jobs.estimate import StageEstimate
from jobs.views import FailureGroup, average_rate
from schemas.messages import ItemResult
from schemas.progress import JobStatus

# Piped or redirected, tables keep their full width: a script's columns are not cut at 80 characters.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 100_000)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def local_time(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else ""


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.2f} items/s"),
        TextColumn("{task.fields[failed]}"),
        TimeRemainingColumn(),
        console=err,
    )


def print_estimate(job_id: str, total: int, stages: Sequence[StageEstimate]) -> None:
    """A dry run's plan: a row per stage, then the worker-seconds per model and the GPU-seconds."""
    out.print(f"dry run: job {job_id}, {total} item(s); nothing was sent or written")
    table = Table("stage", "model", "chunks", "pipeline calls", "denoising steps", "expected", "from")
    for stage in stages:
        at_most = "≤ " if stage.attempts > 1 else ""
        expected = f"{at_most}{stage.seconds:.1f}s" if stage.seconds is not None else "unknown"
        table.add_row(
            stage.stage,
            stage.model,
            str(stage.chunks),
            f"{at_most}{stage.calls}",
            f"{at_most}{stage.steps}",
            expected,
            stage.source,
        )
    out.print(table)
    for stage in stages:
        if stage.attempts > 1:
            out.print(
                f"{stage.stage} re-rolls items below its score gate: counted as {stage.attempts} runs of "
                "every item, an upper bound"
            )
    by_model: dict[str, float | None] = {}
    for stage in stages:
        known = by_model.get(stage.model, 0.0)
        by_model[stage.model] = None if known is None or stage.seconds is None else known + stage.seconds
    for model, seconds in by_model.items():
        out.print(f"{model}: " + (f"{seconds:.1f} worker-seconds" if seconds is not None else "time unknown"))
    gpu = [stage.seconds for stage in stages if stage.on_gpu]
    if gpu:
        total_s = "unknown" if None in gpu else f"{sum(s for s in gpu if s is not None):.1f}"
        out.print(f"GPU-seconds (every model not on the cpu): {total_s}")


def print_summary(status: JobStatus, groups: Sequence[FailureGroup] = ()) -> None:
    """A finished job's counts, time and results file (or why its end failed), then its failures."""
    table = Table(title=f"job {status.job_id}: {status.state.value}", show_header=False)
    table.add_row("items", str(status.total))
    table.add_row("succeeded", str(status.succeeded))
    table.add_row("failed", str(status.failed))
    if status.cancelled:
        table.add_row("of them cancelled", str(status.cancelled))
    if status.started_at and status.finished_at:
        table.add_row(
            "time", f"{status.finished_at - status.started_at:.1f}s ({average_rate(status):.2f} items/s)"
        )
    if status.error:
        table.add_row("error", status.error)
    else:
        table.add_row("results", f"{status.output.rstrip('/')}/{status.job_id}/results.jsonl")
    out.print(table)
    print_failure_groups(groups)


def print_failure_groups(groups: Sequence[FailureGroup]) -> None:
    if not groups:
        return
    table = Table("reason", "items", "example item", "its error", title="failures by reason")
    for group in groups:
        table.add_row(group.reason, str(group.count), group.example_id, group.example_message)
    out.print(table)


def print_jobs(listed: Sequence[JobStatus], of: int) -> None:
    """`imgjobs jobs`: the listed jobs, out of `of` in all."""
    table = Table(
        "job",
        "name",
        "state",
        "total",
        "succeeded",
        "failed",
        "pending",
        "running",
        "submitted",
        "finished",
        "schedule",
        title=f"{len(listed)} of {of} job(s)",
    )
    for status in listed:
        table.add_row(
            status.job_id,
            status.name,
            status.state.value,
            *(str(count) for count in (status.total, status.succeeded, status.failed)),
            *(str(count) for count in (status.pending, status.running)),
            local_time(status.submitted_at),
            local_time(status.finished_at),
            status.schedule or "",
        )
    out.print(table)


def print_failures(job_id: str, failed: Sequence[ItemResult]) -> None:
    table = Table("item", "stage", "reason", "message", title=f"{len(failed)} failed item(s) of {job_id}")
    for result in failed:
        error = result.error
        table.add_row(
            result.id, result.failed_stage or "", error.type if error else "", error.message if error else ""
        )
    out.print(table)
