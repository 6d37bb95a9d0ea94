"""A stage's score gate, applied to one pipeline call's outputs before they are written: score each
output, run the items below the gate again with their next seeds when the stage re-rolls, and keep
each item's best output.

Below the gate (a score under `min_clip_score` or `min_input_similarity`), `on_low_score` says:
- flag: the output is kept, its record says `low_score`;
- fail: the engine fails the item with LowScoreError once its output is written;
- {reroll: N}: the item runs again with seed + 1, then seed + 2, ... (modulo 2**63), at most N more
  times, stopping at the first output that passes; the best output is kept (flagged if none passed).

The best of an item's outputs is the one that meets more gates, then the one whose worst margin is
largest: a score's distance above its threshold, as a share of the score's range (100 for the CLIP
score, 2 for the similarity), so that one gate alone ranks by its score. A tie keeps the earlier
seed. Seeds and choice depend only on the item and its scores: the same job re-rolls alike. A score
is left out of the gate where it does not exist (no prompt, no input image).

An item whose output cannot be scored fails alone, with ScoringError; a re-roll that cannot run or
be scored is recorded without scores and never kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from schemas.errors import ScoringError, StageError
from schemas.job import ScoreSpec
from schemas.messages import QualityRecord, ScoreAttempt
from workers.scoring import ClipScorer, Scores, Targets
from workers.stages.common import SplitOutput, StageBatch, StageOutput, take_rows

log = logging.getLogger(__name__)

SEED_LIMIT = 2**63  # seeds are below it (schemas.job.Seed)
CLIP_SCORE_RANGE = 100.0
SIMILARITY_RANGE = 2.0
# What a pipeline raises for inputs it refuses (as the engine catches it for a call), and what scoring
# may raise besides. Not Exception: a chunk's soft time limit is an Exception too, and must stop the run.
CALL_ERRORS = (StageError, ValueError, TypeError, RuntimeError)
SCORING_ERRORS = (*CALL_ERRORS, ScoringError, OSError, KeyError, IndexError)

RunAgain = Callable[[StageBatch], SplitOutput]


def next_seed(seed: int, attempt: int) -> int:
    """The seed of an item's attempt-th re-roll (the first run is attempt 0)."""
    return (seed + attempt) % SEED_LIMIT


@dataclass
class RowQuality:
    """What the gate made of one row of the call: its record (phash still to come, from the written
    image) or the error that fails it, and the seconds it spent scoring and re-rolling."""

    record: QualityRecord | None = None
    error: ScoringError | None = None
    score_s: float = 0.0
    reroll_s: float = 0.0


@dataclass
class Gated:
    output: StageOutput  # each row the item's kept output
    rows: list[RowQuality] = field(default_factory=list)


@dataclass
class _Best:
    scores: Scores
    seed: int
    attempts: list[ScoreAttempt]


class ScoreGate:
    def __init__(self, spec: ScoreSpec, stage: str, model: str, scorer: Callable[[], ClipScorer]) -> None:
        self.spec = spec
        self.stage = stage
        self.model = model
        self.scorer = scorer  # loads the scoring model on first use, then returns it

    # -- the gate's arithmetic

    def _gates(self, scores: Scores) -> list[tuple[float, float, float]]:
        """(score, threshold, range) of each gate that applies to these scores."""
        found = []
        if self.spec.min_clip_score is not None and scores.clip_score is not None:
            found.append((scores.clip_score, self.spec.min_clip_score, CLIP_SCORE_RANGE))
        if self.spec.min_input_similarity is not None and scores.input_similarity is not None:
            found.append((scores.input_similarity, self.spec.min_input_similarity, SIMILARITY_RANGE))
        return found

    def below(self, scores: Scores) -> bool:
        return any(score < threshold for score, threshold, _ in self._gates(scores))

    def rank(self, scores: Scores) -> tuple[int, float]:
        gates = self._gates(scores)
        met = sum(score >= threshold for score, threshold, _ in gates)
        margin = min(((score - threshold) / span for score, threshold, span in gates), default=0.0)
        return met, margin

    # -- one call

    def prepare_input(self, image: Image.Image) -> torch.Tensor:
        """An item's input image as the scoring model takes it: made where the input is read (on an
        I/O thread on a GPU host), so that the call's scoring does not wait for it."""
        return self.scorer().pixels([image])[0]

    def apply(
        self,
        batch: StageBatch,
        prompts: Sequence[str | None],
        inputs: Sequence[torch.Tensor | None],
        output: StageOutput,
        run_again: RunAgain,
    ) -> Gated:
        """The call's outputs gated: `batch` is what ran (row for row with `output`), `prompts` the
        items' prompts to score against, `inputs` their input images as prepare_input made them."""
        count = len(batch)
        rows = [RowQuality() for _ in range(count)]
        started = time.perf_counter()
        try:
            scorer = self.scorer()
            targets, first = self._first_scores(scorer, batch, prompts, inputs, output, rows)
        except ScoringError as exc:
            for failed in rows:
                failed.error = exc
            return Gated(output, rows)
        share = (time.perf_counter() - started) / count
        best: dict[int, _Best] = {}
        for row, scores in first.items():
            rows[row].score_s = share
            best[row] = _Best(
                scores, batch.seeds[row], [ScoreAttempt(seed=batch.seeds[row], **_fields(scores))]
            )
        kept = _Rows(output)
        pending = [row for row in sorted(best) if self.below(best[row].scores)]
        for attempt in range(1, self.spec.rerolls + 1):
            if not pending:
                break
            self._reroll(scorer, batch, targets, pending, attempt, best, kept, rows, run_again)
            pending = [row for row in pending if self.below(best[row].scores)]
        for row, chosen in best.items():
            rerolled = len(chosen.attempts) > 1
            rows[row].record = QualityRecord(
                stage=self.stage,
                model=self.model,
                clip_score=chosen.scores.clip_score,
                input_similarity=chosen.scores.input_similarity,
                low_score=self.below(chosen.scores),
                seed=chosen.seed,
                attempts=chosen.attempts if rerolled else [],
            )
        return Gated(kept.output(), rows)

    def _first_scores(
        self,
        scorer: ClipScorer,
        batch: StageBatch,
        prompts: Sequence[str | None],
        inputs: Sequence[torch.Tensor | None],
        output: StageOutput,
        rows: list[RowQuality],
    ) -> tuple[Targets, dict[int, Scores]]:
        """The targets and the first outputs' scores, in one batch each; should the batch fail, row by
        row, so that only the rows that cannot be scored fail (their error set in `rows`)."""
        images = _images(output)
        try:
            targets = scorer.targets(prompts, inputs)
            return targets, dict(enumerate(scorer.scores(images, targets)))
        except SCORING_ERRORS as exc:
            log.warning(
                "%s: scoring a batch of %d failed (%s); scoring its items one by one",
                self.stage,
                len(batch),
                exc,
            )
        texts: list[torch.Tensor | None] = []
        sources: list[torch.Tensor | None] = []
        found: dict[int, Scores] = {}
        for row in range(len(batch)):
            try:
                alone = scorer.targets([prompts[row]], [inputs[row]])
                found[row] = scorer.scores([images[row]], alone)[0]
                texts.append(alone.texts[0])
                sources.append(alone.inputs[0])
            except SCORING_ERRORS as exc:
                rows[row].error = ScoringError(
                    f"{self.stage}: could not score the output with {self.model}: {exc}"
                )
                texts.append(None)
                sources.append(None)
        return Targets(texts, sources), found

    def _reroll(
        self,
        scorer: ClipScorer,
        batch: StageBatch,
        targets: Targets,
        pending: list[int],
        attempt: int,
        best: dict[int, _Best],
        kept: _Rows,
        rows: list[RowQuality],
        run_again: RunAgain,
    ) -> None:
        """One more run of the rows in `pending`, each with its attempt-th next seed; a better output
        replaces the kept one."""
        seeds = [next_seed(batch.seeds[row], attempt) for row in pending]
        started = time.perf_counter()
        found: dict[int, Scores] = {}
        ran: list[int] = []
        split = SplitOutput(None, {})
        try:
            split = run_again(take_rows(batch, pending, seeds))
            ran = [index for index in range(len(pending)) if index not in split.failed]
            if split.output is not None:
                rerolled = scorer.scores(
                    _images(split.output), targets.take([pending[index] for index in ran])
                )
                found = dict(zip(ran, rerolled, strict=True))
        except SCORING_ERRORS as exc:
            # Kept out: the items keep the outputs they have.
            log.warning("%s: re-roll %d of %d item(s) failed: %s", self.stage, attempt, len(pending), exc)
            found = {}
        share = (time.perf_counter() - started) / len(pending)
        for index, row in enumerate(pending):
            rows[row].reroll_s += share
            scores = found.get(index)
            chosen = best[row]
            chosen.attempts.append(ScoreAttempt(seed=seeds[index], **_fields(scores or Scores())))
            if scores is not None and self.rank(scores) > self.rank(chosen.scores):
                chosen.scores, chosen.seed = scores, seeds[index]
                assert split.output is not None
                kept.replace(row, split.output, ran.index(index))


def describe_shortfall(record: QualityRecord, spec: ScoreSpec) -> str:
    """Which of a record's scores are below their gate, in words."""
    below = []
    if (
        spec.min_clip_score is not None
        and record.clip_score is not None
        and record.clip_score < spec.min_clip_score
    ):
        below.append(f"CLIP score {record.clip_score:g} is below min_clip_score {spec.min_clip_score:g}")
    if (
        spec.min_input_similarity is not None
        and record.input_similarity is not None
        and record.input_similarity < spec.min_input_similarity
    ):
        below.append(
            f"input similarity {record.input_similarity:g} is below min_input_similarity "
            f"{spec.min_input_similarity:g}"
        )
    tried = f" (best of {len(record.attempts)} seeds)" if record.attempts else ""
    return "; ".join(below) + tried


def _fields(scores: Scores) -> dict[str, float | None]:
    return {"clip_score": scores.clip_score, "input_similarity": scores.input_similarity}


def _images(output: StageOutput) -> list[np.ndarray]:
    """The output's images, to be scored (as they are written: ClipScorer makes them 8-bit)."""
    if output.images is None:
        raise ScoringError("the stage made no image to score")
    return list(output.images)


class _Rows:
    """A call's output with some rows replaced by a re-roll's: copied on the first replacement."""

    def __init__(self, output: StageOutput) -> None:
        self.original = output
        self.images: np.ndarray | None = None
        self.latents: torch.Tensor | None = None
        self.nsfw: list[bool] | None = None
        self.changed = False

    def replace(self, row: int, source: StageOutput, index: int) -> None:
        if not self.changed:
            original = self.original
            self.images = None if original.images is None else original.images.copy()
            self.latents = None if original.latents is None else original.latents.clone()
            self.nsfw = None if original.nsfw is None else list(original.nsfw)
            self.changed = True
        if self.images is not None and source.images is not None:
            self.images[row] = source.images[index]
        if self.latents is not None and source.latents is not None:
            self.latents[row] = source.latents[index]
        if self.nsfw is not None:
            self.nsfw[row] = bool(source.nsfw[index]) if source.nsfw is not None else False

    def output(self) -> StageOutput:
        if not self.changed:
            return self.original
        return StageOutput(images=self.images, latents=self.latents, nsfw=self.nsfw)
