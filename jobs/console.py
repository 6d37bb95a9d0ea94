"""What the `imgjobs` commands print for people: the two consoles, the tables and the progress bar.
The commands (jobs/cli.py) read the state and decide; these only lay it out. JSON output stays with
the commands, as plain prints that scripts parse."""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from jobs.consumers import LiveWorker
from jobs.estimate import StageEstimate
from jobs.views import FailureGroup, average_rate
from jobstate import layout
from schemas.messages import ItemResult
from schemas.progress import JobStatus

if TYPE_CHECKING:
    from jobs.manifest import ValidatedJob
    from jobs.scheduler import ScheduleStanding
    from schemas.registry import ResolvedModel
    from schemas.schedule import ScheduleEntry

# Piped or redirected, tables keep their full width: a script's columns are not cut at 80 characters.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 100_000)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _flags_without_type(params: list[Any]) -> list[Any]:
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""  # a flag takes no value: no `<bool>` beside it
    return params


class HelpGroup(TyperGroup):
    """The command line's groups, as `-h` shows them: flags with no value type."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


class HelpCommand(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


def help_for_people(*groups: typer.Typer) -> None:
    """Each command's docstring as its help in one paragraph, which the list of commands wraps to the
    terminal (it would break lines where the source does), and flags shown with no value type."""
    for group in groups:
        for info in group.registered_commands:
            info.cls = HelpCommand
            info.help = " ".join((inspect.getdoc(info.callback) or "").split()) or info.help


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


def print_notes(job: ValidatedJob, distributed: bool) -> None:
    """What may not go as the user expects, though nothing is wrong: one warning line each."""
    for note in job.notes(distributed):
        err.print(f"warning: {note}", markup=False, highlight=False)


def print_estimate(job_id: str, total: int, stages: Sequence[StageEstimate]) -> None:
    """A dry run's plan: a row per stage, then the worker-seconds per model and the GPU-seconds."""
    out.print(f"dry run: job {job_id}, {total} item(s); nothing was sent or written")
    columns = ("stage", "model", "chunks", "pipeline calls", "denoising steps", "UNet evaluations")
    table = Table(*columns, "expected", "from")
    for stage in stages:
        at_most = "≤ " if stage.attempts > 1 else ""
        expected = f"{at_most}{stage.seconds:.1f}s" if stage.seconds is not None else "unknown"
        table.add_row(
            stage.stage,
            stage.model,
            str(stage.chunks),
            f"{at_most}{stage.calls}",
            f"{at_most}{stage.steps}",
            f"{at_most}{stage.evaluations}",
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


def print_status(status: JobStatus) -> None:
    """`imgjobs status`: the job's state and counts in a line, then why its end failed or what it retries."""
    cancelled = f" (cancelled {status.cancelled})" if status.cancelled else ""
    out.print(
        f"{status.job_id}: {status.state.value}  total {status.total}  pending {status.pending}  "
        f"running {status.running}  succeeded {status.succeeded}  failed {status.failed}{cancelled}"
    )
    if status.error:
        out.print(f"error: {status.error}", markup=False)
    if status.retrying:
        out.print(f"retrying {status.retrying}", markup=False)


def print_summary(status: JobStatus, groups: Sequence[FailureGroup] = ()) -> None:
    """A finished job's counts, time and results file (or why its end failed), then its failures."""
    table = Table(title=f"job {status.job_id}: {status.state.value}", show_header=False)
    table.add_row("items", str(status.total))
    table.add_row("succeeded", str(status.succeeded))
    table.add_row("failed", str(status.failed))
    if status.cancelled:
        table.add_row("of them cancelled", str(status.cancelled))
    if status.started_at and status.finished_at:
        table.add_row("time", f"{status.running_s(time.time()):.1f}s ({average_rate(status):.2f} items/s)")
    if status.error:
        table.add_row("error", status.error)
    else:
        table.add_row("results", f"{layout.job_root(status.output, status.job_id)}/{layout.RESULTS}")
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


def _bytes(count: int | None) -> str:
    return "" if count is None else f"{count / 2**30:.1f} GB" if count >= 2**30 else f"{count / 2**20:.0f} MB"


def print_workers(workers: Sequence[LiveWorker]) -> None:
    """`imgjobs workers`: a row per worker, with the tasks it runs."""
    table = Table(
        "worker", "host", "model", "device", "memory", "uptime", "running", title=f"{len(workers)} worker(s)"
    )
    for worker in workers:
        memory = _bytes(worker.rss_bytes) + (f", GPU {_bytes(worker.gpu_bytes)}" if worker.gpu_bytes else "")
        running = [
            f"{task.task} ({task.done}/{task.items} items, {task.running_s:.0f}s)"
            if task.stage
            else f"the end of {task.job_id} ({task.running_s:.0f}s)"
            for task in worker.running
        ]
        uptime = f"{worker.uptime_s / 3600:.1f}h" if worker.uptime_s >= 3600 else f"{worker.uptime_s:.0f}s"
        table.add_row(
            worker.name,
            worker.host,
            worker.model or "",
            worker.device or "loading",
            memory,
            uptime,
            "\n".join(running) or "idle",
        )
    out.print(table)


def print_schedules(schedules: Sequence[tuple[ScheduleEntry, ScheduleStanding | None]]) -> None:
    """`imgjobs schedule list`: each schedule's file entry, and how it stands (None: no broker to ask)."""
    table = Table("name", "when", "source", "output", "last fired", "next firing", "last job", "seen")
    for entry, standing in schedules:
        when = f"cron {entry.cron} (UTC)" if entry.cron else f"every {entry.every_s}s"
        if standing is None:
            table.add_row(entry.name, when, entry.source, entry.output, "?", "?", "?", "?")
            continue
        next_firing = local_time(standing.next_firing_at) if standing.next_firing_at else "when beat starts"
        last_fired = local_time(standing.last_fired_at) or "never"
        last_job = standing.last_job_id or ""
        table.add_row(
            entry.name,
            when,
            entry.source,
            entry.output,
            last_fired,
            next_firing,
            last_job,
            str(standing.seen),
        )
    out.print(table)


def print_models(models: Sequence[tuple[ResolvedModel, str]]) -> None:
    """`imgjobs models`: each model with where its entry comes from."""
    table = Table("name", "source", "dtype", "vae family", "from", "description")
    for model, origin in models:
        entry = model.entry
        table.add_row(
            model.name, entry.source, entry.dtype, entry.vae_family or "", origin, entry.description
        )
    out.print(table)
