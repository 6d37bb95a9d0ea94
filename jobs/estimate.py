"""`submit --dry-run`: what a validated job will run, stage by stage, and how long that should take
from the rates its models' workers have recorded (jobstate/rates.py). Reads the items as the
validation wrote them into parts; writes nothing anywhere."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from jobs.manifest import ValidatedJob
from jobstate.rates import Rate, shape_of
from schemas.job import Item, ResolvedParams, denoising_steps, evaluations, resolve_params
from schemas.messages import StagePlan


@dataclass(frozen=True)
class StageEstimate:
    stage: str
    model: str
    device: str
    chunks: int
    calls: int  # pipeline calls: a part's items of equal parameters go in calls of the model's batch
    steps: int  # denoising steps, all items
    evaluations: int  # UNet evaluations, all items: what the time is estimated by
    seconds: float | None  # None: no worker has recorded a rate at a shape this stage runs
    source: str  # where `seconds` comes from, in words
    # The most runs of one item (a score gate's re-rolls): calls, steps and seconds count them all, so
    # with more than 1 they are upper bounds.
    attempts: int = 1

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"


def estimate(job: ValidatedJob, rates_of: Callable[[str], dict[str, Rate]]) -> list[StageEstimate]:
    """One estimate per stage; rates_of(model) gives the rates recorded for that model by shape."""
    return [_stage_estimate(job, plan, rates_of(plan.model.name)) for plan in job.recipe]


def _stage_estimate(job: ValidatedJob, plan: StagePlan, rates: dict[str, Rate]) -> StageEstimate:
    batch = plan.model.entry.batch_size
    calls = 0
    steps = 0
    evaluations_by_shape: Counter[str] = Counter()
    items_by_shape: Counter[str] = Counter()
    scheduler = plan.model.entry.scheduler  # the checkpoint's, for a stage that names no sampler
    parts = 0
    for items in _parts(job):
        parts += 1
        groups = Counter(_params(item, plan, job) for item in items)
        for params, count in groups.items():
            calls += -(-count // batch)
            shape = shape_of(plan.spec.type, params.size)
            items_by_shape[shape] += count
            steps += denoising_steps(params) * count
            evaluations_by_shape[shape] += evaluations(params, scheduler) * count
    known = [shape for shape in items_by_shape if shape in rates]
    unknown = sorted(set(items_by_shape) - set(known))
    if unknown:
        seconds = None
        source = f"no rate recorded for {plan.model.name} at {', '.join(unknown)}"
    else:
        seconds = sum(
            rates[shape].seconds_for(items_by_shape[shape], evaluations_by_shape[shape]) for shape in known
        )
        recorded = sum(rates[shape].items for shape in known)
        source = (
            f"rates of {recorded} item(s) that {plan.model.name}'s workers ran at {', '.join(sorted(known))}"
        )
    # Each re-roll round of a call is at most one more call, of at most its items.
    attempts = plan.attempts
    return StageEstimate(
        stage=plan.name,
        model=plan.model.name,
        device=plan.model.entry.device,
        chunks=parts,
        calls=calls * attempts,
        steps=steps * attempts,
        evaluations=sum(evaluations_by_shape.values()) * attempts,
        seconds=None if seconds is None else seconds * attempts,
        source=source,
        attempts=attempts,
    )


def _params(item: Item, plan: StagePlan, job: ValidatedJob) -> ResolvedParams:
    return resolve_params(item, plan.spec, job.spec.defaults)


def _parts(job: ValidatedJob) -> Iterator[list[Item]]:
    """The items, a part at a time, as validation wrote them."""
    if job.parts is None:
        raise ValueError("validate the job with parts_to= to estimate it")
    for part in range(job.parts.parts):
        with (job.parts.folder / job.parts.name(part)).open("rb") as handle:
            yield [Item.model_validate_json(line) for line in handle]
