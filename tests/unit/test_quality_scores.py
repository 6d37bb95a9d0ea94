"""Scores and gates on tiny models (fp32, on the CPU): a stage with `score:` runs through the worker's
own chunk code against a real Redis, and what its rows record is checked against CLIP called
directly, gate mode by gate mode."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import redis
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from jobs import redrive
from jobs.embedded import EmbeddedRedis
from kits.helpers import local_model, stage_plan, write_image
from schemas.job import Defaults, Item, OutputFormat
from schemas.messages import ItemResult, StagePlan
from schemas.registry import ResolvedModel
from schemas.settings import Settings
from tests.chunkkit import harness
from workers.imageio import load_input
from workers.models import LoadedModel
from workers.scoring import ClipScorer, Targets, dhash
from workers.tiny_models import write_tiny_clip

pytestmark = pytest.mark.slow

SIZE = (32, 32)
PROMPTS = ["a cat wizard", "astronaut in a jungle", "a red fox in snow", "a lighthouse at dusk"]
STAGE: dict[str, Any] = {"type": "img2img", "strength": 0.75, "guidance_scale": 7.5, "steps": 4}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="module")
def sd(tiny_sd_dir: Path) -> LoadedModel:
    return LoadedModel("tiny-sd", local_model("tiny-sd", tiny_sd_dir).entry)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path / "redis") as running:
        yield running


def items(tmp_path: Path, count: int = 4, seeds: Sequence[int] | None = None) -> list[Item]:
    return [
        Item(
            id=f"i{n}",
            image=str(write_image(tmp_path / "in" / f"{n}.png", color=(n * 50, 90, 200 - n * 40))),
            prompt=PROMPTS[n % len(PROMPTS)],
            seed=seeds[n] if seeds is not None else 10 + n,
        )
        for n in range(count)
    ]


def scored_plan(sd: LoadedModel, scorer: ResolvedModel, index: int = 0, **score: Any) -> StagePlan:
    plan = stage_plan(
        {**STAGE, "score": {"model": scorer.name, **score}},
        local_model("tiny-sd", Path(sd.entry.source)),
        index=index,
    )
    return plan.model_copy(update={"scorer": scorer})


def run_job(
    server: EmbeddedRedis,
    output: Path,
    rows: list[Item],
    recipe: list[StagePlan],
    sd: LoadedModel,
    job_id: str = "job",
    dataset: bool = False,
    output_format: OutputFormat = "files",
) -> dict[str, ItemResult]:
    client = redis.Redis.from_url(server.url)
    job = harness(
        client,
        rows,
        output,
        recipe=recipe,
        model=sd,
        job_id=job_id,
        defaults=Defaults(size=SIZE),
        dataset=dataset,
        output_format=output_format,
    )
    job.run_all()
    return job.results()


class DirectClip:
    """CLIP called as its model card shows: the processor on text and images, the model's forward, its
    (unit) image and text embeddings; the CLIP score as torchmetrics defines it."""

    def __init__(self, folder: Path) -> None:
        self.model = CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
        self.processor = CLIPProcessor.from_pretrained(folder, backend="pil")

    def scores(self, image: Image.Image, prompt: str, reference: Image.Image) -> tuple[float, float]:
        inputs = self.processor(text=[prompt], images=[image, reference], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = self.model(**inputs)
        clip_score = 100 * max(float(out.image_embeds[0] @ out.text_embeds[0]), 0.0)
        return clip_score, float(out.image_embeds[0] @ out.image_embeds[1])


def fitted(item: Item) -> Image.Image:
    assert item.image is not None
    return load_input(item.image, SIZE, Settings())


def test_scores_are_recorded_and_equal_a_direct_computation(
    server: EmbeddedRedis, tmp_path: Path, sd: LoadedModel, clip_dir: Path
) -> None:
    rows = items(tmp_path)
    scorer = local_model("tiny-clip", clip_dir)
    results = run_job(server, tmp_path / "out", rows, [scored_plan(sd, scorer)], sd, dataset=True)
    direct = DirectClip(clip_dir)
    # The dataset's metadata carries the scores: it can be filtered without its images.
    metadata = (tmp_path / "out" / "job" / "dataset" / "metadata.jsonl").read_text().splitlines()
    by_id = {row["id"]: row for row in map(json.loads, metadata)}
    for item in rows:
        result = results[item.id]
        assert result.status == "succeeded" and result.quality is not None
        quality = result.quality
        assert result.stages[0].quality == quality and (quality.stage, quality.model) == (
            "s0-img2img",
            "tiny-clip",
        )
        assert quality.seed == item.seed and quality.attempts == [] and not quality.low_score
        output = Image.open(result.outputs["s0-img2img"]).convert("RGB")
        clip_score, similarity = direct.scores(output, item.prompt or "", fitted(item))
        assert quality.clip_score == pytest.approx(clip_score, abs=1e-3)
        assert quality.input_similarity == pytest.approx(similarity, abs=2e-4)
        assert quality.phash == dhash(output)
        assert result.timings["score_s"] > 0
        assert {key: by_id[item.id][key] for key in ("clip_score", "input_similarity", "phash")} == {
            "clip_score": quality.clip_score,
            "input_similarity": quality.input_similarity,
            "phash": quality.phash,
        }
    # Random weights still give each item its own scores.
    assert len({results[item.id].quality.clip_score for item in rows}) == len(rows)  # type: ignore[union-attr]


def baseline_scores(
    server: EmbeddedRedis, tmp_path: Path, sd: LoadedModel, clip_dir: Path
) -> dict[str, float]:
    """The items' CLIP scores with no gate: what the gates below are set between."""
    plan = scored_plan(sd, local_model("tiny-clip", clip_dir))
    results = run_job(server, tmp_path / "baseline", items(tmp_path), [plan], sd, job_id="baseline")
    return {item_id: result.quality.clip_score for item_id, result in results.items()}  # type: ignore[misc,union-attr]


def between(scores: dict[str, float]) -> tuple[float, set[str]]:
    """A threshold with about half the items below it, and which."""
    ordered = sorted(scores.values())
    middle = len(ordered) // 2
    threshold = (ordered[middle - 1] + ordered[middle]) / 2
    return threshold, {item_id for item_id, score in scores.items() if score < threshold}


def test_flag_keeps_the_low_outputs_and_marks_them(
    server: EmbeddedRedis, tmp_path: Path, sd: LoadedModel, clip_dir: Path
) -> None:
    threshold, low = between(baseline_scores(server, tmp_path, sd, clip_dir))
    plan = scored_plan(sd, local_model("tiny-clip", clip_dir), min_clip_score=threshold)
    results = run_job(server, tmp_path / "out", items(tmp_path), [plan], sd)
    assert all(result.status == "succeeded" for result in results.values())
    assert {
        item_id for item_id, result in results.items() if result.quality and result.quality.low_score
    } == low
    assert all(Path(result.outputs["s0-img2img"]).is_file() for result in results.values())


def test_fail_fails_the_low_items_with_their_own_error(
    server: EmbeddedRedis, tmp_path: Path, sd: LoadedModel, clip_dir: Path
) -> None:
    threshold, low = between(baseline_scores(server, tmp_path, sd, clip_dir))
    plan = scored_plan(sd, local_model("tiny-clip", clip_dir), min_clip_score=threshold, on_low_score="fail")
    client = redis.Redis.from_url(server.url)
    job = harness(
        client, items(tmp_path), tmp_path / "out", recipe=[plan], model=sd, defaults=Defaults(size=SIZE)
    )
    job.run_all()
    results = job.results()
    failed = {item_id for item_id, result in results.items() if result.status == "failed"}
    assert failed == low
    for item_id in failed:
        result = results[item_id]
        assert result.error is not None and result.error.type == "LowScoreError"
        assert (
            f"below min_clip_score {threshold:g}" in result.error.message
            and result.failed_stage == "s0-img2img"
        )
        # The scores and the output stay in the row: they are what to look at.
        assert result.quality is not None and result.quality.low_score
        assert Path(result.outputs["s0-img2img"]).is_file()
    # `imgjobs failures --reason` and `retry --reason` find them by their error type.
    found = {result.id for result in redrive.failures(job.store, job.meta.job_id, "LowScoreError")}
    assert found == low


def test_reroll_is_deterministic_and_keeps_the_best(
    server: EmbeddedRedis, tmp_path: Path, sd: LoadedModel, clip_dir: Path
) -> None:
    scorer = local_model("tiny-clip", clip_dir)
    # A gate nothing passes: every item runs with seed, seed + 1 and seed + 2, and keeps its best.
    plan = scored_plan(sd, scorer, min_clip_score=100, on_low_score={"reroll": 2})
    rows = items(tmp_path, count=3)
    first = run_job(server, tmp_path / "a", rows, [plan], sd, job_id="a")
    again = run_job(server, tmp_path / "b", rows, [plan], sd, job_id="b")
    for item in rows:
        quality = first[item.id].quality
        assert quality is not None and item.seed is not None
        assert [attempt.seed for attempt in quality.attempts] == [item.seed, item.seed + 1, item.seed + 2]
        best = max(quality.attempts, key=lambda attempt: attempt.clip_score or 0.0)
        assert (quality.seed, quality.clip_score) == (best.seed, best.clip_score)
        assert quality.low_score and first[item.id].status == "succeeded"
        assert first[item.id].timings["reroll_s"] > 0
        # The same job re-rolls alike: same seeds, scores and choice.
        assert again[item.id].quality == quality.model_copy(update={"phash": again[item.id].quality.phash})  # type: ignore[union-attr]
    # Each attempt is what that seed gives alone: the kept output and the scores of every seed tried.
    tried = [(item, attempt.seed) for item in rows for attempt in first[item.id].quality.attempts]  # type: ignore[union-attr]
    single = [item.model_copy(update={"id": f"{item.id}-s{seed}", "seed": seed}) for item, seed in tried]
    alone = run_job(server, tmp_path / "alone", single, [scored_plan(sd, scorer)], sd, job_id="alone")
    for item in rows:
        quality = first[item.id].quality
        assert quality is not None
        for attempt in quality.attempts:
            own = alone[f"{item.id}-s{attempt.seed}"].quality
            # Run in batches of other sizes, an output may round a pixel the other way (below), and the
            # tiny random CLIP moves by a few thousandths for it.
            assert own is not None and attempt.clip_score == pytest.approx(own.clip_score, abs=0.01)
        kept = np.asarray(Image.open(first[item.id].outputs["s0-img2img"]), dtype=np.int16)
        same_seed = np.asarray(
            Image.open(alone[f"{item.id}-s{quality.seed}"].outputs["s0-img2img"]), dtype=np.int16
        )
        assert np.abs(kept - same_seed).max() <= 1  # batches of other sizes round a pixel at most


def test_reroll_stops_at_the_first_seed_that_passes(
    server: EmbeddedRedis, tmp_path: Path, sd: LoadedModel, clip_dir: Path
) -> None:
    scorer = local_model("tiny-clip", clip_dir)
    rows = items(tmp_path, count=4)
    probe = run_job(
        server,
        tmp_path / "probe",
        rows,
        [scored_plan(sd, scorer, min_clip_score=100, on_low_score={"reroll": 1})],
        sd,
        job_id="probe",
    )
    # A gate between an item's first and second seed's scores: it passes at its first re-roll.
    gaps = [
        (item_id, result.quality.attempts)
        for item_id, result in probe.items()
        if result.quality
        and result.quality.attempts[1].clip_score > result.quality.attempts[0].clip_score + 0.5  # type: ignore[operator]
    ]
    assert gaps, "no item scored higher with its next seed"
    item_id, attempts = gaps[0]
    threshold = (attempts[0].clip_score + attempts[1].clip_score) / 2  # type: ignore[operator]
    plan = scored_plan(sd, scorer, min_clip_score=threshold, on_low_score={"reroll": 3})
    results = run_job(server, tmp_path / "out", rows, [plan], sd)
    quality = results[item_id].quality
    assert quality is not None and not quality.low_score
    assert [attempt.seed for attempt in quality.attempts] == [attempts[0].seed, attempts[1].seed]
    assert quality.seed == attempts[1].seed


def test_a_scoring_failure_fails_its_item_alone(
    server: EmbeddedRedis, tmp_path: Path, sd: LoadedModel, clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ClipScorer.load(str(clip_dir), "cpu", torch.float32)

    class Unscorable(ClipScorer):
        """The scoring model refusing one item's prompt: the batch fails, then that item alone."""

        def targets(self, prompts: Sequence[str | None], inputs: Sequence[torch.Tensor | None]) -> Targets:
            if any(prompt and "unscorable" in prompt for prompt in prompts):
                raise ValueError("this prompt breaks the scorer")
            return super().targets(prompts, inputs)

    fake = Unscorable(real.model, real.processor, real.device, real.dtype)
    monkeypatch.setattr(sd, "scorer", lambda _model: fake)
    rows = items(tmp_path)
    rows[1] = rows[1].model_copy(update={"prompt": "an unscorable cat"})
    results = run_job(
        server, tmp_path / "out", rows, [scored_plan(sd, local_model("tiny-clip", clip_dir))], sd
    )
    broken = results["i1"]
    assert broken.status == "failed" and broken.error is not None and broken.error.type == "ScoringError"
    assert "this prompt breaks the scorer" in broken.error.message and "s0-img2img" not in broken.outputs
    for item_id in ("i0", "i2", "i3"):
        assert results[item_id].status == "succeeded" and results[item_id].quality is not None


def test_a_scoring_model_that_cannot_load_fails_the_items_and_the_job_ends(
    server: EmbeddedRedis, tmp_path: Path, sd: LoadedModel, tiny_sd_dir: Path
) -> None:
    not_clip = local_model("not-clip", tiny_sd_dir)  # a diffusers pipeline folder
    results = run_job(server, tmp_path / "out", items(tmp_path, count=2), [scored_plan(sd, not_clip)], sd)
    for result in results.values():
        assert result.status == "failed" and result.error is not None and result.error.type == "ScoringError"
        assert "scoring model not-clip cannot load" in result.error.message


def test_a_stage_that_hands_latents_is_scored_and_a_later_one_compares_with_the_input(
    server: EmbeddedRedis, tmp_path: Path, sd: LoadedModel, clip_dir: Path
) -> None:
    scorer = local_model("tiny-clip", clip_dir)
    model = local_model("tiny-sd", Path(sd.entry.source), vae_family="tiny-sd")
    first = stage_plan({**STAGE, "score": {"model": "tiny-clip"}}, model, index=0, handover="latent", save=())
    second = stage_plan({**STAGE, "score": {"model": "tiny-clip"}}, model, index=1)
    recipe = [first.model_copy(update={"scorer": scorer}), second.model_copy(update={"scorer": scorer})]
    rows = items(tmp_path, count=2)
    results = run_job(server, tmp_path / "out", rows, recipe, sd)
    direct = DirectClip(clip_dir)
    for item in rows:
        result = results[item.id]
        assert result.status == "succeeded", result.error
        scored = [record.quality for record in result.stages]
        assert all(quality is not None for quality in scored) and list(result.outputs) == ["s1-img2img"]
        assert result.quality == scored[1]
        output = Image.open(result.outputs["s1-img2img"]).convert("RGB")
        _, similarity = direct.scores(output, item.prompt or "", fitted(item))
        assert result.quality is not None and result.quality.input_similarity == pytest.approx(
            similarity, abs=2e-4
        )


def test_a_sharded_jobs_indexes_carry_the_scores(
    server: EmbeddedRedis, tmp_path: Path, sd: LoadedModel, clip_dir: Path
) -> None:
    """An output shard's index holds each item's scores beside its seed and parameters: the dataset can
    be filtered without reading its images."""
    rows = items(tmp_path, count=2)
    scorer = local_model("tiny-clip", clip_dir)
    plan = scored_plan(sd, scorer)
    results = run_job(server, tmp_path / "out", rows, [plan], sd, output_format="parquet")
    (index,) = (tmp_path / "out" / "job" / "shards").glob("*.parquet")
    table = pq.read_table(index, columns=["id", "seed", "clip_score", "input_similarity", "phash"])
    for row in table.to_pylist():
        quality = results[row["id"]].quality
        assert quality is not None and quality.clip_score is not None
        assert (row["clip_score"], row["input_similarity"], row["phash"]) == (
            quality.clip_score,
            quality.input_similarity,
            quality.phash,
        )
    assert sorted(table.column("id").to_pylist()) == ["i0", "i1"]
