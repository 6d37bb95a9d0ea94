"""What the report shows of a scored job, gathered in the report's first pass over results.jsonl:
each score's distribution (fixed bins, drawn as a small histogram in every page's header), the
lowest-scoring items of each score (for the "worst first" pages) and the perceptual hashes (for the
near-duplicate groups).

That pass reads each line as text. Of a scored line only its "quality" object is read, from the
key (the row's last field) on: its scores by one regular expression over pydantic's JSON, json's
raw_decode should that ever not match, so a 1M-item job's end parses no row whole for it. Memory
stays bounded: fixed bins, a heap of WORST_SHOWN lines per score, and 12 bytes per scored item for
its hash and position (12 MB at 1M items).

Near-duplicates are outputs whose 64-bit hashes differ in at most NEAR_BITS bits. Pairs are found
by multi-index hashing: split into NEAR_BITS + 1 bands of 16 bits, two hashes that close agree on at
least one band, so only hashes that share a band's value are compared. Equal hashes are folded
first, so a job of a million black images costs one comparison, not a trillion; should the
comparisons still pass PAIR_BUDGET (hashes crowding into few band values), the rest are left out and
the page says the groups may be incomplete.
"""

from __future__ import annotations

import heapq
import json
import re
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

QUALITY_KEY = '"quality":{'
WORST_SHOWN = 200
NEAR_BITS = 3  # of 64: the hashes of two outputs that look alike differ in a few bits at most
BAND_BITS = 16
PAIR_BUDGET = 40_000_000  # hash comparisons, at most, for the near-duplicate groups
GROUPS_SHOWN = 200
FINE_BINS = 200  # per score: the histogram is drawn from these, over the range the scores span
BARS = 24


@dataclass(frozen=True)
class ScoreKind:
    field: str  # in QualityRecord
    label: str
    low: float  # the score's range, for the fine bins
    high: float


SCORE_KINDS = (
    ScoreKind("clip_score", "CLIP score", 0.0, 100.0),
    ScoreKind("input_similarity", "input similarity", -1.0, 1.0),
)

_decoder = json.JSONDecoder()
# QualityRecord's fields as pydantic writes them, in their order; a key inside a string value has its
# quotes escaped, so it never matches.
_SCORES = re.compile(
    r'"clip_score":(null|[-+.0-9eE]+),"input_similarity":(null|[-+.0-9eE]+),'
    r'"phash":(?:null|"([0-9a-f]*)"),"low_score":(true|false)'
)


def _scores_in(line: str, start: int) -> tuple[float | None, float | None, str | None, bool]:
    """(clip_score, input_similarity, phash, low_score) of the quality object at `start`."""
    found = _SCORES.match(line, line.find('"clip_score":', start))
    if found is not None:
        clip, similarity, phash, low = found.groups()
        return (
            None if clip == "null" else float(clip),
            None if similarity == "null" else float(similarity),
            phash,
            low == "true",
        )
    record, _ = _decoder.raw_decode(line, start)
    return (
        record.get("clip_score"),
        record.get("input_similarity"),
        record.get("phash"),
        bool(record.get("low_score")),
    )


@dataclass
class Histogram:
    kind: ScoreKind
    bins: list[int] = field(default_factory=lambda: [0] * FINE_BINS)
    count: int = 0
    lowest: float = float("inf")
    highest: float = float("-inf")

    def add(self, value: float) -> None:
        index = int((value - self.kind.low) * FINE_BINS / (self.kind.high - self.kind.low))
        self.bins[0 if index < 0 else FINE_BINS - 1 if index >= FINE_BINS else index] += 1
        self.count += 1
        if value < self.lowest:
            self.lowest = value
        if value > self.highest:
            self.highest = value

    def bars(self) -> tuple[float, float, list[int]]:
        """(from, to, counts): up to BARS bars over the fine bins the scores fall in."""
        used = [index for index, count in enumerate(self.bins) if count]
        first, last = used[0], used[-1] + 1
        per_bar = -(-(last - first) // BARS)
        counts = [sum(self.bins[start : start + per_bar]) for start in range(first, last, per_bar)]
        width = (self.kind.high - self.kind.low) / FINE_BINS
        low = self.kind.low + first * width
        return low, low + len(counts) * per_bar * width, counts


@dataclass
class QualityTally:
    """A scored job's scores, as the report's first pass finds them."""

    histograms: dict[str, Histogram] = field(
        default_factory=lambda: {kind.field: Histogram(kind) for kind in SCORE_KINDS}
    )
    worst: dict[str, list[tuple[float, int, str]]] = field(
        default_factory=lambda: {kind.field: [] for kind in SCORE_KINDS}
    )
    scored: int = 0
    low: int = 0
    hashes: array[int] = field(default_factory=lambda: array("Q"))
    hashed_at: array[int] = field(default_factory=lambda: array("I"))
    _groups: list[list[int]] | None = None
    complete: bool = True  # whether the near-duplicate search compared every candidate pair

    def add(self, position: int, line: str) -> None:
        at = line.rfind(QUALITY_KEY)
        if at < 0:
            return
        clip_score, similarity, phash, low = _scores_in(line, at + len(QUALITY_KEY) - 1)
        self.scored += 1
        self.low += low
        if clip_score is not None:
            self._add_score("clip_score", clip_score, position, line)
        if similarity is not None:
            self._add_score("input_similarity", similarity, position, line)
        if phash:
            self.hashes.append(int(phash, 16))
            self.hashed_at.append(position)

    def _add_score(self, field: str, value: float, position: int, line: str) -> None:
        self.histograms[field].add(value)
        # A max-heap of the lowest scores by (-score, -position): the highest, then latest, leaves first.
        worst = self.worst[field]
        if len(worst) < WORST_SHOWN:
            heapq.heappush(worst, (-value, -position, line))
        elif -value >= worst[0][0]:
            heapq.heappushpop(worst, (-value, -position, line))

    def kinds(self) -> list[ScoreKind]:
        """The scores the job has, in their order."""
        return [kind for kind in SCORE_KINDS if self.histograms[kind.field].count]

    def worst_lines(self, kind: ScoreKind) -> list[str]:
        """The results lines of the lowest-scoring items, lowest first (a tie: manifest order)."""
        return [
            line for _, _, line in sorted(self.worst[kind.field], key=lambda entry: (-entry[0], -entry[1]))
        ]

    def groups(self) -> list[list[int]]:
        """The near-duplicate groups, as manifest positions: largest first, then by first position."""
        if self._groups is None:
            labels, self.complete = near_duplicate_labels(np.frombuffer(self.hashes, dtype=np.uint64))
            members: dict[int, list[int]] = {}
            for index, label in enumerate(labels.tolist()):
                members.setdefault(label, []).append(self.hashed_at[index])
            found = [sorted(group) for group in members.values() if len(group) > 1]
            self._groups = sorted(found, key=lambda group: (-len(group), group[0]))
        return self._groups

    def shown_positions(self, per_group: int) -> set[int]:
        """The positions of the group members the duplicates page shows."""
        return {position for group in self.groups()[:GROUPS_SHOWN] for position in group[:per_group]}


def tally(lines: Iterable[str]) -> QualityTally:
    found = QualityTally()
    for position, line in enumerate(lines):
        found.add(position, line)
    return found


# -- near-duplicates

_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


def bit_distance(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Bits that differ between two uint64 arrays of one shape: numpy's bitwise_count (numpy 2), else
    a lookup per byte."""
    xor = np.bitwise_xor(left, right)
    count = getattr(np, "bitwise_count", None)
    if count is not None:
        found: np.ndarray = count(xor)
        return found
    per_byte = _POPCOUNT[np.ascontiguousarray(xor).view(np.uint8)].reshape(*xor.shape, 8)
    counts: np.ndarray = per_byte.sum(axis=-1, dtype=np.uint8)
    return counts


def near_duplicate_labels(hashes: np.ndarray) -> tuple[np.ndarray, bool]:
    """A group label per hash: hashes within NEAR_BITS bits of each other, directly or through others,
    share one. And whether every candidate pair was compared (PAIR_BUDGET)."""
    unique, inverse = np.unique(hashes, return_inverse=True)
    left: list[np.ndarray] = []
    right: list[np.ndarray] = []
    budget = PAIR_BUDGET
    for band in range(NEAR_BITS + 1):
        keys = (unique >> np.uint64(band * BAND_BITS)) & np.uint64((1 << BAND_BITS) - 1)
        order = np.argsort(keys)
        ordered, ordered_keys = unique[order], keys[order]
        # Where each hash's run of equal band values ends, in band order.
        starts = np.flatnonzero(np.r_[True, ordered_keys[1:] != ordered_keys[:-1]])
        ends: np.ndarray = np.repeat(np.r_[starts[1:], len(order)], np.diff(np.r_[starts, len(order)]))
        # Each hash against the one `offset` places on in its run, for every offset the runs allow.
        offset = 1
        active = np.flatnonzero(np.arange(len(order)) + offset < ends)
        while active.size:
            budget -= active.size
            if budget < 0:
                return _labels(len(unique), left, right)[inverse], False
            close = active[bit_distance(ordered[active], ordered[active + offset]) <= NEAR_BITS]
            left.append(order[close])
            right.append(order[close + offset])
            offset += 1
            active = active[active + offset < ends[active]]
    return _labels(len(unique), left, right)[inverse], True


def _labels(count: int, left: list[np.ndarray], right: list[np.ndarray]) -> np.ndarray:
    labels: np.ndarray = np.arange(count, dtype=np.int64)
    if not left:
        return labels
    return _components(labels, np.concatenate(left), np.concatenate(right))


def _components(labels: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Connected components of the pairs, as the smallest index in each: labels move to the smaller of
    a pair's two and jump to their label's label until nothing changes."""
    while True:
        smaller = np.minimum(labels[left], labels[right])
        updated = labels.copy()
        np.minimum.at(updated, left, smaller)
        np.minimum.at(updated, right, smaller)
        updated = updated[updated]
        if np.array_equal(updated, labels):
            return labels
        labels = updated


# -- the histogram picture

HISTOGRAM_WIDTH = 240
HISTOGRAM_HEIGHT = 60
BAR_COLOUR = "#4a7fb5"
GATE_COLOUR = "#b00020"


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def histogram_svg(histogram: Histogram, threshold: float | None) -> str:
    """The distribution as an inline SVG bar chart, the gate's threshold as a red line where it falls
    inside the range drawn; its title says the same in words for readers without the picture."""
    low, high, counts = histogram.bars()
    tallest = max(counts)
    width = HISTOGRAM_WIDTH / len(counts)
    heights = [count / tallest * HISTOGRAM_HEIGHT for count in counts]
    bars = "".join(
        f'<rect x="{index * width:.2f}" y="{HISTOGRAM_HEIGHT - height:.2f}" width="{max(width - 1, 1):.2f}" '
        f'height="{height:.2f}" fill="{BAR_COLOUR}"><title>{count}</title></rect>'
        for index, (count, height) in enumerate(zip(counts, heights, strict=True))
    )
    gate = ""
    if threshold is not None and low <= threshold <= high:
        x = (threshold - low) / (high - low) * HISTOGRAM_WIDTH
        gate = (
            f'<line class="gate" x1="{x:.2f}" x2="{x:.2f}" y1="0" y2="{HISTOGRAM_HEIGHT}" '
            f'stroke="{GATE_COLOUR}" stroke-width="2" stroke-dasharray="4 2"/>'
        )
    label = histogram.kind.label
    words = (
        f"{label} of {histogram.count} item(s): from {_number(histogram.lowest)} to "
        f"{_number(histogram.highest)}" + (f"; gate {_number(threshold)}" if threshold is not None else "")
    )
    return (
        f'<svg class="histogram" role="img" width="{HISTOGRAM_WIDTH}" height="{HISTOGRAM_HEIGHT + 14}" '
        f'viewBox="0 0 {HISTOGRAM_WIDTH} {HISTOGRAM_HEIGHT + 14}" aria-label="{words}"><title>{words}</title>'
        f"{bars}{gate}"
        f'<text x="0" y="{HISTOGRAM_HEIGHT + 12}" font-size="10">{_number(low)}</text>'
        f'<text x="{HISTOGRAM_WIDTH}" y="{HISTOGRAM_HEIGHT + 12}" font-size="10" text-anchor="end">'
        f"{_number(high)}</text></svg>"
    )


def thresholds(gates: Sequence[tuple[float | None, float | None]]) -> dict[str, float | None]:
    """The gate of each score, from the last scored stage's (min_clip_score, min_input_similarity)."""
    clip, similarity = gates[-1] if gates else (None, None)
    return {"clip_score": clip, "input_similarity": similarity}
