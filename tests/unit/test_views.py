"""What the daily commands compute: status times and ETA, job filters, failure groups, the dry-run
estimate, the rates workers record, and a schedule's next firing."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from jobs.embedded import EmbeddedRedis
from jobs.estimate import estimate
from jobs.manifest import validate_job
from jobs.registry import Registry
from jobs.scheduler import next_firing
from jobs.views import (
    JobFilter,
    RateMeter,
    failures_by_reason,
    newest_first,
    parse_since,
    status_document,
    suggested_ids,
)
from jobstate.rates import WINDOW_ITEMS, Rate, RateBook, RateSample
from kits.helpers import write_job
from schemas.job import Item, ResolvedParams, denoising_steps, with_overrides
from schemas.messages import ErrorInfo, ItemResult, StageRecord
from schemas.progress import JobState, JobStatus
from schemas.schedule import ScheduleEntry
from workers.events import ChunkInfo
from workers.rate_recorder import RateRecorder


def status(done: int = 0, total: int = 100, **fields: object) -> JobStatus:
    base: dict[str, object] = {
        "job_id": "j",
        "name": "nightly",
        "state": "running",
        "total": total,
        "pending": total - done,
        "running": 0,
        "succeeded": done,
        "failed": 0,
        "output": "out",
        "submitted_at": 1_000.0,
        "started_at": 1_000.0,
    }
    return JobStatus.model_validate(base | fields)


def test_status_document_has_iso_times_the_current_rate_and_an_eta() -> None:
    meter = RateMeter()
    assert meter.rate(status(done=10), now=1_010.0) == pytest.approx(1.0)  # one poll: the average
    meter.rate(status(done=10), now=1_010.0)
    rate = meter.rate(status(done=40), now=1_020.0)  # 30 items in the last 10 s
    assert rate == pytest.approx(3.0)
    document = status_document(status(done=40), rate, now=1_020.0)
    assert document["submitted_at"] == "1970-01-01T00:16:40.000+00:00"
    assert document["finished_at"] is None
    assert (document["items_per_s"], document["eta_s"]) == (3.0, 20.0)
    assert document["eta"] == "1970-01-01T00:17:20.000+00:00"
    finished = status_document(status(done=100, state="succeeded", finished_at=1_050.0), 2.0, now=1_060.0)
    assert finished["eta_s"] is None and finished["eta"] is None


def test_the_rate_forgets_polls_older_than_its_window() -> None:
    meter = RateMeter()
    meter.rate(status(done=0), now=1_000.0)
    meter.rate(status(done=600), now=1_060.0)  # a fast minute
    assert meter.rate(status(done=610), now=1_100.0) == pytest.approx(10 / 40)


def test_job_filters_and_newest_first() -> None:
    jobs = [
        status(job_id="a", name="nightly-1", submitted_at=100.0),
        status(job_id="b", name="adhoc", submitted_at=300.0, state="failed"),
        status(job_id="c", name="nightly-2", submitted_at=200.0),
    ]
    assert [s.job_id for s in newest_first(jobs, JobFilter(), None)] == ["b", "c", "a"]
    assert [s.job_id for s in newest_first(jobs, JobFilter(name="nightly-*"), None)] == ["c", "a"]
    assert [s.job_id for s in newest_first(jobs, JobFilter(state=JobState.FAILED), None)] == ["b"]
    assert [s.job_id for s in newest_first(jobs, JobFilter(since=150.0), 1)] == ["b"]


def test_since_takes_a_duration_or_an_iso_time() -> None:
    assert parse_since("12h", now=100_000.0) == 100_000.0 - 12 * 3600
    assert parse_since("2026-12-01T00:00:00+00:00") == datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since("yesterday")


def failed(item_id: str, reason: str, message: str = "m") -> ItemResult:
    return ItemResult(
        id=item_id,
        status="failed",
        seed=0,
        model="m",
        prompt="",
        params=ResolvedParams(size=(32, 32)),
        error=ErrorInfo(type=reason, message=message),
    )


def test_failures_are_grouped_by_reason_largest_first() -> None:
    groups = failures_by_reason(
        [
            failed("b", "InputImageError", "b.png"),
            failed("z", "StageError"),
            failed("a", "InputImageError", "a.png"),
        ]
    )
    assert [(g.reason, g.count, g.example_id, g.example_message) for g in groups] == [
        ("InputImageError", 2, "a", "a.png"),
        ("StageError", 1, "z", "m"),
    ]


def test_an_unknown_job_id_is_answered_with_the_jobs_of_its_name() -> None:
    known = ["cats-0123456789ab", "cats-ba9876543210", "dogs-0123456789ab", "catz-4"]
    assert suggested_ids("cats", known) == "did you mean one of 'cats-0123456789ab', 'cats-ba9876543210'?"
    assert suggested_ids("dogs-0123456789ac", known) == "did you mean 'dogs-0123456789ab'?"
    assert suggested_ids("catz-5", known) == "did you mean 'catz-4'?"  # no hash: spelt alike
    assert suggested_ids("birds", known) is None


def test_denoising_steps_follow_diffusers_img2img_schedule() -> None:
    assert denoising_steps(ResolvedParams(size=(8, 8), steps=40, strength=0.75)) == 30
    assert denoising_steps(ResolvedParams(size=(8, 8), steps=40)) == 40  # text2img, upscale
    assert denoising_steps(ResolvedParams(size=(8, 8))) == 0  # resize


def test_retry_overrides_are_validated_as_item_fields() -> None:
    item = Item(id="a", image="/in/a.png", steps=30)
    changed = with_overrides(item, {"steps": 4, "size": [64, 32]})
    assert (changed.steps, changed.size, changed.image) == (4, (64, 32), "/in/a.png")
    with pytest.raises(ValueError):
        with_overrides(item, {"strength": 7})


def test_estimate_counts_calls_and_steps_and_uses_recorded_rates(tmp_path: Path, registry: Registry) -> None:
    rows: list[dict[str, object]] = [{"id": f"i{n}", "image": "https://example.com/a.png"} for n in range(5)]
    rows.append({"id": "long", "image": "https://example.com/a.png", "steps": 8})
    spec = write_job(tmp_path, rows)  # strength 0.75, steps 4 -> 3 denoising steps; 8 -> 6
    job = validate_job(spec, registry, tmp_path / "parts", chunk_size=4)
    (unknown,) = estimate(job, lambda model: {})
    # Parts of 4 and 2 items; the item with its own steps runs in a call of its own.
    assert (unknown.chunks, unknown.calls, unknown.steps, unknown.seconds) == (2, 3, 5 * 3 + 6, None)
    # tiny-sd's DDIM evaluates the UNet once a step, on two rows with guidance 7.5.
    assert unknown.evaluations == 2 * (5 * 3 + 6)
    assert unknown.source == "no rate recorded for tiny-sd at img2img:32x32"
    rates = {"img2img:32x32": Rate(items=10, evaluations=60, seconds=6.0)}  # 0.1 s an evaluation
    (known,) = estimate(job, lambda model: rates if model == "tiny-sd" else {})
    assert known.seconds == pytest.approx(42 * 0.1)
    assert "rates of 10 item(s)" in known.source


def test_an_estimate_counts_the_samplers_unet_evaluations_not_the_steps_recorded(
    tmp_path: Path, registry: Registry
) -> None:
    """Rates recorded at 50 PNDM steps (strength 0.8: 40 steps, 41 calls with PLMS's warm-up, two rows
    each with guidance) estimate DPM++ 2M at 20 steps by its 2 x 16 evaluations, and LCM at 4 steps
    without guidance by its 3."""
    book = Book()
    recorder = RateRecorder(book)  # type: ignore[arg-type]
    chunk = ChunkInfo(job_id="j", chunk_id="c", model="tiny-sd", stage="s0-img2img", items=10, delivery=1)
    pndm = StageRecord(
        name="s0-img2img",
        model="tiny-sd",
        params=ResolvedParams(size=(32, 32), steps=50, strength=0.8, guidance_scale=7.5),
        timings={"infer_s": 8.2},
        sampler="pndm",
        steps_run=40,
        unet_evaluations=82,
    )
    recorder.chunk_started(chunk)
    recorder.items_handed_over(chunk, [pndm] * 10)
    recorder.chunk_done(chunk, 90.0, 82.0, 60.0)
    (sample,) = book.samples
    rates = {sample.shape: Rate(sample.items, sample.evaluations, sample.seconds)}  # 0.1 s an evaluation
    rows = [{"id": f"i{n}", "image": "https://example.com/a.png"} for n in range(10)]
    stages: dict[str, dict[str, object]] = {
        "fast": {"type": "img2img", "model": "tiny-sd", "sampler": "DPM++ 2M Karras", "steps": 20},
        "lcm": {"type": "img2img", "model": "tiny-sd", "preset": "lcm", "preset_lora": False},
    }
    expected = {"fast": 10 * 2 * 16, "lcm": 10 * 3}
    for name, stage in stages.items():
        spec = write_job(tmp_path / name, rows, stage={"strength": 0.8, **stage})
        (planned,) = estimate(validate_job(spec, registry, tmp_path / name / "parts"), lambda model: rates)
        assert planned.evaluations == expected[name]
        assert planned.seconds == pytest.approx(expected[name] * 0.1)


class Book:
    def __init__(self) -> None:
        self.samples: list[RateSample] = []

    def add(self, samples: list[RateSample]) -> None:
        self.samples.extend(samples)


def record(name: str, seconds: float | None, steps: int = 4) -> StageRecord:
    timings = {"infer_s": seconds} if seconds is not None else {}
    return StageRecord(
        name=name,
        model="sd",
        params=ResolvedParams(size=(64, 32), steps=steps, strength=0.5),
        timings=timings,
        steps_run=steps // 2,
        unet_evaluations=steps,  # guidance doubles the steps run
    )


def test_the_recorder_counts_each_item_of_the_chunks_stage_once() -> None:
    book = Book()
    recorder = RateRecorder(book)  # type: ignore[arg-type]
    chunk = ChunkInfo(job_id="j", chunk_id="c", model="sd", stage="s1-img2img", items=3, delivery=1)
    recorder.chunk_started(chunk)
    recorder.items_handed_over(chunk, [record("s1-img2img", 0.5)])
    finished = failed("x", "StageError").model_copy(
        update={"stages": [record("s0-img2img", 9.0), record("s1-img2img", 0.25)]}
    )
    not_run = failed("y", "InputImageError").model_copy(update={"stages": [record("s1-img2img", None)]})
    recorder.items_finished(chunk, [finished, not_run])
    recorder.chunk_done(chunk, 1.0, 0.75, 0.5)
    assert book.samples == [RateSample("sd", "img2img:64x32", items=2, evaluations=8, seconds=0.75)]


def test_recorded_rates_follow_a_change_of_hardware_and_keep_their_ratio(redis_server: EmbeddedRedis) -> None:
    book = RateBook(redis.Redis.from_url(redis_server.url))

    def run(chunks: int, seconds_per_step: float, model: str = "sd") -> None:
        # Chunks of 64 items of 30 UNet evaluations each, as workers add them.
        book.add([RateSample(model, "img2img:512x512", 64, 64 * 30, 64 * 30 * seconds_per_step)] * chunks)

    def seconds_per_step(model: str = "sd") -> float:
        rate = book.rates(model)["img2img:512x512"]
        return rate.seconds_for(1, 1)

    run(400, 0.05)  # 25,600 items on the old GPU: the sums were halved, their ratio kept
    assert book.rates("sd")["img2img:512x512"].items <= WINDOW_ITEMS
    assert seconds_per_step() == pytest.approx(0.05, rel=1e-4)  # halving an odd count drops half a step
    run(200, 0.02)  # 12,800 items on a faster one: the old ones weigh a few percent
    assert seconds_per_step() == pytest.approx(0.02, rel=0.15)
    run(1, 0.5, model="other")  # another model's rates are its own
    assert seconds_per_step() == pytest.approx(0.02, rel=0.15) and seconds_per_step("other") == 0.5


def test_next_firing_of_cron_and_interval_schedules() -> None:
    entry = {
        "name": "n",
        "source": "/in/*.png",
        "output": "/out",
        "stages": [{"type": "img2img", "model": "m"}],
    }
    nightly = ScheduleEntry.model_validate(entry | {"cron": "0 2 * * *"})
    now = datetime(2026, 12, 1, 10, 0, tzinfo=UTC).timestamp()
    assert next_firing(nightly, None, now) == datetime(2026, 12, 2, 2, 0, tzinfo=UTC).timestamp()
    hourly = ScheduleEntry.model_validate(entry | {"every_s": 3600})
    assert next_firing(hourly, None, now) is None
    assert next_firing(hourly, now - 600, now) == now + 3000
