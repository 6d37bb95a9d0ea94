"""Score gates without a model: the spec's fields and what `validate` says of them, the gate's
arithmetic, the perceptual hash against imagehash's, the dry run's upper bound for re-rolls, and what
the report makes of a scored job's rows (histograms, worst first, near-duplicate groups)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydantic import TypeAdapter, ValidationError

from jobs.console import print_estimate
from jobs.estimate import estimate
from jobs.manifest import validate_job
from jobs.registry import Registry
from jobstate.rates import Rate
from kits.helpers import local_model, stage_plan, write_job
from kits.reports import PARAMS, Page, failed, succeeded, write_output, write_report_of
from schemas.errors import SpecError
from schemas.job import ScoreSpec, StageSpec
from schemas.messages import QualityRecord, ScoreAttempt, StageRecord
from workers import quality_report
from workers.quality import ScoreGate, describe_shortfall, next_seed
from workers.quality_report import Histogram, QualityTally, near_duplicate_labels
from workers.scoring import Scores, dhash

ROWS: list[dict[str, object]] = [{"id": f"i{n}", "image": "https://example.com/a.png"} for n in range(5)]


# -- the spec


def test_a_score_spec_defaults_to_flag_and_bounds_its_fields() -> None:
    plain = ScoreSpec(model="clip")
    assert (plain.on_low_score, plain.rerolls, plain.gated) == ("flag", 0, False)
    rerolled = ScoreSpec.model_validate(
        {"model": "clip", "min_clip_score": 25, "on_low_score": {"reroll": 3}}
    )
    assert (rerolled.rerolls, rerolled.gated) == (3, True)
    wrongs: list[tuple[dict[str, Any], str]] = [
        ({"on_low_score": "fail"}, "need min_clip_score or min_input_similarity"),
        ({"on_low_score": {"reroll": 2}}, "need min_clip_score or min_input_similarity"),
        ({"min_clip_score": 101}, "less than or equal to 100"),
        ({"min_input_similarity": -1.5}, "greater than or equal to -1"),
        ({"min_clip_score": 20, "on_low_score": {"reroll": 0}}, "greater than or equal to 1"),
        ({"min_clip_score": 20, "on_low_score": {"reroll": 9}}, "less than or equal to 8"),
        ({"min_clip_score": 20, "on_low_score": "drop"}, "on_low_score"),
    ]
    for wrong, message in wrongs:
        with pytest.raises(ValidationError, match=message):
            ScoreSpec.model_validate({"model": "clip", **wrong})
    with pytest.raises(ValidationError, match="score"):  # resize stages have nothing to score
        TypeAdapter(StageSpec).validate_python({"type": "resize", "score": {"model": "clip"}})


@pytest.fixture
def scoring_registry(tmp_path: Path) -> Registry:
    """tiny-sd-like and CLIP folders as validate sees them (their configs), and a pipeline folder."""
    clip = tmp_path / "models" / "clip"
    clip.mkdir(parents=True)
    (clip / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["CLIPModel"]}))
    pipe = tmp_path / "models" / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionImg2ImgPipeline"}))
    registry = tmp_path / "models.yaml"
    registry.write_text(
        "models:\n"
        "  tiny-sd: {source: models/pipe, dtype: float32}\n"
        "  tiny-clip: {source: models/clip, dtype: float32}\n"
    )
    return Registry.load(registry)


def problems(spec: Path, registry: Registry) -> list[str]:
    with pytest.raises(SpecError) as caught:
        validate_job(spec, registry)
    return [f"{problem.field}: {problem.message}" for problem in caught.value.problems]


def test_validate_resolves_the_scoring_model_and_refuses_what_cannot_score(
    tmp_path: Path, scoring_registry: Registry
) -> None:
    stage: dict[str, Any] = {"type": "img2img", "model": "tiny-sd", "steps": 4}
    job = validate_job(
        write_job(tmp_path, ROWS, stage={**stage, "score": {"model": "tiny-clip"}}), scoring_registry
    )
    assert job.recipe[0].scorer is not None and job.recipe[0].scorer.name == "tiny-clip"
    builtin = validate_job(
        write_job(tmp_path, ROWS, stage={**stage, "score": {"model": "clip-vit-large-patch14"}}),
        scoring_registry,
    )
    assert builtin.recipe[0].scorer is not None and builtin.recipe[0].scorer.entry.pipeline == "CLIPModel"

    def refused(changed: dict[str, Any], **job: Any) -> list[str]:
        return problems(
            write_job(tmp_path, job.pop("rows", ROWS), stage={**stage, **changed}, **job), scoring_registry
        )

    (unknown,) = refused({"score": {"model": "tiny-clp"}})
    assert (
        unknown.startswith("stages.0.score.model: unknown model 'tiny-clp'")
        and "did you mean 'tiny-clip'" in unknown
    )
    (pipeline,) = refused({"score": {"model": "tiny-sd"}})
    assert pipeline == (
        "stages.0.score.model: tiny-sd is a StableDiffusionImg2ImgPipeline, not a CLIP checkpoint (CLIPModel)"
    )
    (resize,) = refused({"score": {"model": "cpu"}})
    assert "is a resize, not a CLIP checkpoint" in resize
    assert refused({"model": "tiny-clip"}) == [
        "stages.0.model: tiny-clip is a scoring model (a CLIP checkpoint): name it in a stage's score.model"
    ]
    text = [{"id": "t", "prompt": "a cat"}]
    (no_input,) = refused(
        {"type": "text2img", "score": {"model": "tiny-clip", "min_input_similarity": 0.5}}, rows=text
    )
    assert no_input.startswith("stages.0.score.min_input_similarity: the job's items have no input image")


# -- the gate


def gate(**spec: Any) -> ScoreGate:
    def no_model() -> Any:
        raise AssertionError("the arithmetic needs no model")

    return ScoreGate(ScoreSpec(model="clip", **spec), "s0-img2img", "clip", no_model)


def test_the_gate_ranks_by_gates_met_then_by_the_worst_margin() -> None:
    both = gate(min_clip_score=20, min_input_similarity=0.8)
    assert not both.below(Scores(25, 0.9)) and both.below(Scores(19.9, 0.9)) and both.below(Scores(25, 0.7))
    # A score an item does not have is no gate for it: no prompt, or no input image.
    assert not both.below(Scores(None, 0.9)) and not both.below(Scores(25, None))
    # 19 misses by 1 of 100; 0.79 by 0.01 of 2: the second is closer, so better.
    ranked = sorted([Scores(25, 0.85), Scores(19, 0.9), Scores(25, 0.79), Scores(10, 0.1)], key=both.rank)
    assert ranked == [Scores(10, 0.1), Scores(19, 0.9), Scores(25, 0.79), Scores(25, 0.85)]
    one = gate(min_clip_score=20)
    assert sorted([Scores(21, 0.1), Scores(30, 0.0), Scores(5, 1.0)], key=one.rank) == [
        Scores(5, 1.0),
        Scores(21, 0.1),
        Scores(30, 0.0),
    ]
    assert next_seed(7, 2) == 9 and next_seed(2**63 - 1, 1) == 0


def test_the_shortfall_says_which_gate_and_how_many_seeds() -> None:
    spec = ScoreSpec(model="clip", min_clip_score=20, min_input_similarity=0.8)
    record = QualityRecord(
        stage="s0-img2img",
        model="clip",
        clip_score=12.5,
        input_similarity=0.7,
        low_score=True,
        seed=3,
        attempts=[ScoreAttempt(seed=3, clip_score=12.5), ScoreAttempt(seed=4, clip_score=11.0)],
    )
    assert describe_shortfall(record, spec) == (
        "CLIP score 12.5 is below min_clip_score 20; input similarity 0.7 is below min_input_similarity 0.8"
        " (best of 2 seeds)"
    )


def test_the_perceptual_hash_is_imagehash_dhash() -> None:
    """Vectors from imagehash 4.3.2's `str(dhash(image))` on these images, with this project's Pillow."""
    ramp = Image.linear_gradient("L").resize((64, 64))
    shapes = Image.new("RGB", (64, 64), (30, 60, 90))
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((8, 8, 40, 40), fill=(250, 240, 10))
    draw.rectangle((36, 30, 60, 60), fill=(0, 0, 0))
    noise = Image.fromarray((np.random.default_rng(7).random((48, 80, 3)) * 255).astype("uint8"))
    assert dhash(Image.merge("RGB", (ramp, ramp.rotate(90), ramp.rotate(180)))) == "ffffffffffffffff"
    assert dhash(noise) == "4d44899bd2d2d645"
    assert dhash(shapes) == "6ce2d2d3e1619141"
    assert dhash(Image.new("RGB", (32, 32), (128, 128, 128))) == "0000000000000000"


def test_the_dry_run_counts_every_re_roll_as_an_upper_bound(
    tmp_path: Path, scoring_registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    score = {"model": "tiny-clip", "min_clip_score": 20, "on_low_score": {"reroll": 2}}
    stage = {"type": "img2img", "model": "tiny-sd", "strength": 0.75, "steps": 4, "score": score}
    job = validate_job(
        write_job(tmp_path, ROWS, stage=stage), scoring_registry, tmp_path / "parts", chunk_size=4
    )
    rates = {"img2img:32x32": Rate(items=10, evaluations=60, seconds=6.0)}  # 0.1 s a UNet evaluation
    (bound,) = estimate(job, lambda model: rates)
    unscored = {key: value for key, value in stage.items() if key != "score"}
    spec = write_job(tmp_path / "once", ROWS, stage=unscored)
    (once,) = estimate(
        validate_job(spec, scoring_registry, tmp_path / "once" / "parts", chunk_size=4), lambda model: rates
    )
    # Parts of 4 and 1 items: 2 calls and 5 x 3 steps when nothing re-rolls; three times that at most.
    assert (bound.attempts, bound.calls, bound.steps) == (3, 2 * 3, 5 * 3 * 3)
    assert (once.attempts, once.calls, once.steps) == (1, 2, 5 * 3)
    assert once.evaluations >= 5 * 3 * 2  # each step a classifier-free guidance pair, at least
    assert bound.evaluations == 3 * once.evaluations
    assert bound.seconds == pytest.approx(bound.evaluations * 0.1)
    print_estimate(job.job_id, job.total, [bound])
    shown = capsys.readouterr().out
    assert f"≤ {bound.seconds:.1f}s" in shown and "s0-img2img re-rolls items below its score gate" in shown


# -- the report


def quality(clip_score: float | None, phash: str | None = None, **fields: Any) -> QualityRecord:
    return QualityRecord(
        stage="s0-img2img", model="clip", clip_score=clip_score, phash=phash, seed=0, **fields
    )


def test_the_report_reads_each_rows_own_scores_from_its_line() -> None:
    tally = QualityTally()
    # Two scored stages, and a prompt that spells what the report looks for: the row's own is read.
    first = quality(90.0, "00000000000000ff")
    row = succeeded(
        "a",
        prompt='"quality":{"clip_score":99}',
        stages=[
            StageRecord(name="s0-img2img", model="m", params=PARAMS, quality=first),
            StageRecord(
                name="s1-img2img", model="m", params=PARAMS, quality=quality(12.5, "ff00000000000000")
            ),
        ],
        quality=quality(12.5, "ff00000000000000", low_score=True),
    )
    tally.add(0, row.model_dump_json())
    tally.add(1, succeeded("unscored").model_dump_json())
    assert (tally.scored, tally.low) == (1, 1)
    assert tally.histograms["clip_score"].lowest == 12.5 and list(tally.hashes) == [0xFF << 56]


def test_near_duplicates_are_within_three_bits_through_chains_and_equal_hashes_fold() -> None:
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=2000, dtype=np.uint64) * np.uint64(2)
    hashes[10] = hashes[5] ^ np.uint64(0b101)  # 2 bits from 5
    hashes[20] = hashes[10] ^ np.uint64(1 << 40)  # 1 bit from 10, 3 from 5
    hashes[30] = hashes[5]  # equal
    hashes[40] = hashes[7] ^ np.uint64(0b1111)  # 4 bits: not near
    labels, complete = near_duplicate_labels(hashes)
    groups = {tuple(np.flatnonzero(labels == label).tolist()) for label in set(labels.tolist())}
    assert complete and {group for group in groups if len(group) > 1} == {(5, 10, 20, 30)}
    # A million equal hashes (a job of black images) are one group, at the cost of one.
    labels, complete = near_duplicate_labels(np.zeros(1_000_000, dtype=np.uint64))
    assert complete and set(labels.tolist()) == {0}


def test_past_its_budget_the_search_says_it_is_incomplete(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quality_report, "PAIR_BUDGET", 100)
    crowded: np.ndarray = np.arange(1000, dtype=np.uint64)  # every hash shares its three upper bands
    _, complete = near_duplicate_labels(crowded)
    assert not complete


def test_the_histogram_spans_the_scores_and_marks_the_gate() -> None:
    histogram = Histogram(quality_report.SCORE_KINDS[0])
    for value in (20.0, 20.2, 24.9, 31.0, 31.0):
        histogram.add(value)
    low, high, counts = histogram.bars()
    assert (
        low == pytest.approx(20.0)
        and high >= 31.0
        and sum(counts) == 5
        and len(counts) <= quality_report.BARS
    )
    svg = Page(quality_report.histogram_svg(histogram, 25.0))
    assert len(svg.of_tag("rect")) == len(counts) and len(svg.of_tag("line", "gate")) == 1
    assert "CLIP score of 5 item(s): from 20.0 to 31.0; gate 25.0" in svg.text
    assert Page(quality_report.histogram_svg(histogram, 90.0)).of_tag("line", "gate") == []


def test_a_scored_jobs_report_shows_histograms_worst_first_and_near_duplicates(tmp_path: Path) -> None:
    output = tmp_path / "out"
    job_dir = output / "report-test-0123abcd"
    results = []
    for n in range(260):
        item_id = f"i{n:03d}"
        # Items 0, 100 and 250 look alike; 7 and 8 are equal. Scores fall with n past 100.
        phash = {
            0: "0f0f0f0f0f0f0f0f",
            100: "0f0f0f0f0f0f0f0e",
            250: "0f0f0f0f0f0f0f0c",
            7: "aa",
            8: "aa",
        }.get(n, f"{(n * 0x9E3779B97F4A7C15) % 2**64:016x}")
        scores = quality(50.0 - max(n - 100, 0) * 0.2, phash, input_similarity=0.5, low_score=n >= 200)
        outputs = {"s1-resize": write_output(job_dir, item_id, "s1-resize", "webp")}
        if n == 255:
            results.append(
                failed(item_id, "LowScoreError", "s0-img2img: CLIP score 19 is below", quality=scores)
            )
        else:
            results.append(succeeded(item_id, outputs, quality=scores))
    pages = write_report_of(output, results, score={"model": "clip", "min_clip_score": 20})
    assert {
        "_report/worst-clip-score.html",
        "_report/worst-input-similarity.html",
        "_report/duplicates.html",
    } <= set(pages)
    header = Page(pages["report.html"])
    assert header.counts()["low score"] == "60" and header.tables["reasons"][1:] == [["LowScoreError", "1"]]
    assert len(header.of_tag("svg", "histogram")) == 2 and len(header.of_tag("line", "gate")) == 1
    assert (
        "near-duplicate groups (2)" in header.text and "CLIP score 50 · input similarity 0.5" in header.text
    )
    worst = Page(pages["_report/worst-clip-score.html"])
    # The 200 lowest, lowest first; equal scores in manifest order.
    assert worst.sections == [f"i{n:03d}" for n in range(259, 100, -1)] + [f"i{n:03d}" for n in range(41)]
    assert "below the score gate of s0-img2img" in worst.text
    duplicates = Page(pages["_report/duplicates.html"])
    assert [figure for figure in duplicates.of_tag("section", "group")] == [
        {"class": "group", "id": "group-1"},
        {"class": "group", "id": "group-2"},
    ]
    captions = [image["alt"] for image in duplicates.images]
    assert captions == ["i000", "i100", "i250", "i007", "i008"]
    # Each member links to its place in the contact sheet, relative to the page.
    assert {"../report.html#item-i000", "items-2.html#item-i250"} <= set(duplicates.links)


def test_what_scores_nothing_keeps_the_json_it_had() -> None:
    """A job's id digests its spec and recipe as JSON, and results.jsonl's readers read its rows: a job
    that scores nothing writes both as before stages could score."""
    stage = TypeAdapter(StageSpec).validate_python({"type": "img2img", "model": "m"})
    plan = stage_plan({"type": "img2img"}, local_model("m", Path("/models/m")))
    row = succeeded("a")
    assert "score" not in stage.model_dump(mode="json") and '"score"' not in stage.model_dump_json()
    assert "scorer" not in plan.model_dump(mode="json") and '"quality"' not in row.model_dump_json()
    scored = succeeded("b", quality=quality(20.0, "00ff00ff00ff00ff"))
    assert type(scored).model_validate_json(scored.model_dump_json()) == scored
