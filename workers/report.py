"""report.html and its pages: a static HTML report of a job, written at the job's end.

Every page opens with the job's header (name, id, the spec's stages with their models and key
parameters, the items' counts by state and the failures' counts by reason) and links to the other
pages. report.html is the contact sheet of items 1-200 (input, each saved stage output, prompt and
parameters), _report/items-N.html of the next 200 each, and _report/failed-N.html lists the failed
items (id, stage, error type and message). The pages link to each other and to the outputs by
relative links inside the job's prefix, so the report works the same from a local folder, an S3
website or a copy of the prefix. `_report` is never an item's folder: item ids start with a letter
or a digit.

report.html's thumbnails are small JPEGs inlined as data URIs, so the page a user opens first is
one object that opens anywhere, with no thumbnail objects to fetch, permit or keep in step with the
outputs. The later pages show each output by a relative link to it (the browser scales it down and
loads it when it scrolls into view), and an input only when it lies in the job's prefix: a
thumbnail costs the job's end a fetch and a decode, about 6.5 ms for a 512x512 PNG, so thumbnails for
the whole contact sheet (20,000 images) would take minutes of the end's time, on every job. Pages
are rendered and written one at a time from the results file, so memory holds one page whatever
the job's size. The contact sheet stops after CONTACT_PAGES pages, as thousands of pages would cost
a storage write each. Later items are in results.jsonl; the failed view lists every failed item.

A job whose stages score their outputs also gets, in every page's header, each score's distribution
as a small histogram, and pages of its own: _report/worst-<score>.html, the lowest-scoring items
first as a contact sheet, and _report/duplicates.html, the near-duplicate groups
(workers/quality_report.py gathers them in the first pass).
Only the lines those pages show are parsed: the counts come from a scan of the raw lines. Pages an
earlier end of the job wrote (before a retry) and this one did not are deleted.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from PIL import Image

from jobstate import layout
from jobstate.meta import JobMeta
from jobstate.storage import Storage, check_key
from schemas.errors import JobCancelledError, StorageRefusedError
from schemas.messages import ItemResult, QualityRecord, StagePlan
from schemas.settings import LocalRoots, Settings
from workers.imageio import decode_image, fetch_bytes
from workers.quality_report import (
    GROUPS_SHOWN,
    WORST_SHOWN,
    QualityTally,
    ScoreKind,
    histogram_svg,
    thresholds,
)

ITEMS_PER_PAGE = 200
FAILED_PER_PAGE = 1000  # rows of text only, so more to a page than the contact sheet's
CONTACT_PAGES = 50  # 10,000 items
THUMBNAIL_SIDE = 160
THUMBNAIL_QUALITY = 80
THUMBNAIL_THREADS = 8  # fetching is mostly waiting on storage; Pillow decodes without the GIL
MESSAGE_CHARS = 2000  # of an error message shown: a page stays small whatever a pipeline raised
NAV_SPREAD = 3  # page links shown either side of the current one
HTML_TYPE = "text/html; charset=utf-8"
CANCELLED = JobCancelledError.__name__

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
header h1 { margin: 0; } .job-id { font: .9rem monospace; color: #555; margin: .2rem 0 .8rem; }
table { border-collapse: collapse; margin: .4rem 0 .8rem; font-size: .85rem; }
th, td { border: 1px solid #ccc; padding: .2rem .5rem; text-align: left; vertical-align: top; }
td.count { text-align: right; }
.tallies { display: flex; gap: 1.5rem; align-items: flex-start; }
.stages td, .failures td { font-family: monospace; }
.failures td.message { white-space: pre-wrap; max-width: 60rem; }
nav { margin: .6rem 0; } nav a, nav strong { margin-right: .35rem; }
.item { border-top: 1px solid #ccc; padding: .8rem 0; }
.item.failed h2 { color: #b00020; }
h2 { font-size: 1rem; margin: 0 0 .4rem; }
.row { display: flex; gap: .8rem; flex-wrap: wrap; }
figure { margin: 0; text-align: center; font-size: .75rem; }
img, .placeholder { display: block; width: 160px; height: 160px; object-fit: contain; background: #eee; }
.placeholder { display: flex; align-items: center; justify-content: center; color: #777; }
.params { font: .75rem monospace; color: #555; white-space: pre-wrap; }
.nsfw { color: #8a5a00; font-weight: bold; }
.low-score { color: #b00020; font-weight: bold; }
.quality { display: flex; gap: 1.5rem; align-items: flex-start; margin: .2rem 0 .6rem; }
.quality figure { text-align: left; } svg.histogram { display: block; background: #f6f6f6; }
.group { border-top: 1px solid #ccc; padding: .6rem 0; }
"""

# uris -> their thumbnails as data URIs (None where there is none)
Thumbnails = Callable[[Sequence[str]], Mapping[str, str | None]]
INPUT_NOT_IN_PREFIX = "outside the job's folder"  # past report.html, inputs are linked, not fetched


# A stage's record in a results line (StageRecord's JSON, its fields in their order: what the stage
# ran, then its scores where it was scored): its name, and the sampler, schedule, steps and UNet
# evaluations it ran. Found without parsing the line; a record's params and timings hold no nested
# object.
_STRING = r'"(?:[^"\\]|\\.)*"'
_RAN = re.compile(
    r'\{"name":"(?P<stage>[^"]+)","model":' + _STRING + r',"params":\{[^{}]*\},"timings":\{[^{}]*\},'
    r'"nsfw":(?:true|false),"prompt":(?:null|' + _STRING + r'),"prompt_truncated":(?:true|false),'
    r'"sampler":(?P<sampler>null|'
    + _STRING
    + r'),"schedule":(?P<schedule>null|'
    + _STRING
    + r'),"steps_run":(?P<steps>null|\d+),"unet_evaluations":(?P<evaluations>null|\d+)[,}]'
)


@dataclass
class StageRuns:
    """What a stage ran for the items that reached it: its samplers, and the range of its steps and
    of its UNet evaluations an item."""

    samplers: set[str] = field(default_factory=set)
    steps: tuple[int, int] | None = None
    evaluations: tuple[int, int] | None = None

    def add(self, sampler: str, steps: int | None, evaluations: int | None) -> None:
        self.samplers.add(sampler)
        self.steps = _widened(self.steps, steps)
        self.evaluations = _widened(self.evaluations, evaluations)

    def shown(self) -> str:
        """e.g. "dpmpp_2m karras: 3-6 steps, 6-12 UNet evaluations an item"."""
        if not self.samplers:
            return ""
        counts = [f"{_range(self.steps)} steps"] if self.steps is not None else []
        if self.evaluations is not None:
            counts.append(f"{_range(self.evaluations)} UNet evaluations an item")
        samplers = ", ".join(sorted(self.samplers))
        return f"{samplers}: {', '.join(counts)}" if counts else samplers


def _widened(span: tuple[int, int] | None, value: int | None) -> tuple[int, int] | None:
    if value is None:
        return span
    return (value, value) if span is None else (min(span[0], value), max(span[1], value))


def _range(span: tuple[int, int]) -> str:
    return str(span[0]) if span[0] == span[1] else f"{span[0]}-{span[1]}"


@dataclass
class Summary:
    """The counts every page's header shows, from one pass over the results."""

    items: int = 0
    succeeded: int = 0
    failed: int = 0  # those cancelled are counted apart
    cancelled: int = 0
    flagged: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    runs: dict[str, StageRuns] = field(default_factory=dict)  # by stage name
    quality: QualityTally | None = None  # a scored job's scores

    def add(self, line: str) -> None:
        """Count one results line, parsing it only when it failed (for its reason)."""
        if self.quality is not None:
            self.quality.add(self.items, line)
        self.items += 1
        self.flagged += NSFW_MARK in line
        for found in _RAN.finditer(line):
            sampler = found["sampler"]
            if sampler == "null":
                continue  # a stage that runs no sampler (resize)
            schedule = found["schedule"]
            ran = json.loads(sampler) + ("" if schedule == "null" else f" {json.loads(schedule)}")
            steps, evaluations = found["steps"], found["evaluations"]
            self.runs.setdefault(found["stage"], StageRuns()).add(
                ran,
                None if steps == "null" else int(steps),
                None if evaluations == "null" else int(evaluations),
            )
        result = parsed_if_failed(line)
        if result is None:
            self.succeeded += 1
            return
        reason = _reason(result)
        self.reasons[reason] += 1
        if reason == CANCELLED:
            self.cancelled += 1
        else:
            self.failed += 1

    @property
    def item_pages(self) -> int:
        return min(max(1, -(-self.items // ITEMS_PER_PAGE)), CONTACT_PAGES)

    @property
    def beyond_contact_sheet(self) -> int:
        return max(self.items - CONTACT_PAGES * ITEMS_PER_PAGE, 0)

    @property
    def failed_pages(self) -> int:
        """Pages of failed and cancelled items: none when every item succeeded."""
        return -(-(self.failed + self.cancelled) // FAILED_PER_PAGE)


def summarize(lines: Iterable[str], scored: bool = False) -> Summary:
    """The counts of results.jsonl's lines; with `scored`, their scores too."""
    summary = Summary(quality=QualityTally() if scored else None)
    for line in lines:
        summary.add(line)
    return summary


# ItemResult's JSON (pydantic's, without spaces) has these only as its own keys: a quote inside a
# string value is escaped.
FAILED_MARK = '"status":"failed"'
NSFW_MARK = '"nsfw":true'


def parsed_if_failed(line: str) -> ItemResult | None:
    if FAILED_MARK not in line:
        return None
    result = ItemResult.model_validate_json(line)
    return result if result.status == "failed" else None


@dataclass(frozen=True)
class FailedRow:
    """What the failures view shows of a failed item; not the whole result, so a page of them is small."""

    position: int
    id: str
    stage: str
    reason: str
    message: str

    @classmethod
    def of(cls, result: ItemResult, position: int) -> FailedRow:
        message = _clipped(result.error.message) if result.error else ""
        return cls(position, result.id, result.failed_stage or "", _reason(result), message)


def _reason(result: ItemResult) -> str:
    return result.error.type if result.error else "unknown"


def _clipped(message: str) -> str:
    return message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS] + "…"


# -- links


@dataclass(frozen=True)
class Place:
    """The page being rendered: its number in its list of pages (items or failed items)."""

    key_of: Callable[[int], str]
    page: int

    @property
    def key(self) -> str:
        return self.key_of(self.page)


def relative_link(from_key: str, to_key: str) -> str:
    """to_key as a link from the page at from_key, both keys in the job's prefix: the link climbs no
    higher than the prefix, so it works wherever the prefix is served or copied."""
    here, there = from_key.split("/")[:-1], to_key.split("/")
    common = 0
    while common < len(here) and common < len(there) - 1 and here[common] == there[common]:
        common += 1
    return "/".join([".."] * (len(here) - common) + there[common:])


# Control characters shown as escapes: validation refuses them in prompts, but a page shows what
# results.jsonl holds (an error message, a job submitted before), and a NUL or an escape sequence in
# HTML is what a browser or a terminal may take for something else.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _escape(text: str) -> str:
    """Text as HTML: markup escaped, control characters as visible escapes such as \\x00."""
    return html.escape(_CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text))


def _href(from_key: str, to_key: str, fragment: str = "") -> str:
    link = urllib.parse.quote(relative_link(from_key, to_key))
    return _escape(link + (f"#{urllib.parse.quote(fragment)}" if fragment else ""))


def key_in_prefix(uri: str, root: str) -> str | None:
    """The key of `uri` under the job's storage root, or None when it lies elsewhere (an input, an
    output of another job): only files of the job's own prefix are linked."""
    prefix = root.rstrip("/") + "/"
    if not uri.startswith(prefix):
        return None
    try:
        return check_key(uri[len(prefix) :])
    except StorageRefusedError:
        return None


# -- thumbnails


def thumbnail(uri: str, settings: Settings, roots: LocalRoots) -> str | None:
    """A JPEG data URI of the image at uri, fetched and decoded within the settings' byte and pixel
    limits; None when there is none to show."""
    try:
        image = decode_image(fetch_bytes(uri, settings, roots), uri, settings)
    except Exception:  # a thumbnail is decoration: whatever stops it, the report shows none
        return None
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass(frozen=True)
class Thumbnailer:
    """Thumbnails of one page's images, made on a pool's threads."""

    settings: Settings
    roots: LocalRoots
    pool: Executor

    def __call__(self, uris: Sequence[str]) -> dict[str, str | None]:
        unique = list(dict.fromkeys(uris))
        return dict(zip(unique, self.pool.map(self._one, unique), strict=True))

    def _one(self, uri: str) -> str | None:
        return thumbnail(uri, self.settings, self.roots)


def in_a_shard(uri: str) -> bool:
    """Whether the image is a sample of a shard (`.../00000.tar#key.jpg`), which has no object of its
    own to fetch: a thumbnail would cost a ranged read of the shard per image."""
    shard, sep, _member = uri.rpartition("#")
    return bool(sep) and shard.lower().endswith((".tar", ".parquet"))


def pictured(result: ItemResult) -> list[str]:
    """The images of an item that get a thumbnail: its input and every image output, whatever its
    format (png, jpeg, webp); latents are linked, not pictured, and samples of shards are not."""
    images = [result.image] if result.image else []
    return [
        uri
        for uri in images + list(result.outputs.values())
        if not layout.is_latent(uri) and not in_a_shard(uri)
    ]


# -- the header and the navigation


def _plain(value: object) -> str:
    """A spec's value as the spec file would say it: text bare, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _stage_row(plan: StagePlan, runs: StageRuns | None) -> str:
    params = plan.spec.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    for shown_apart in ("type", "model", "save", "handover"):
        params.pop(shown_apart, None)
    shown = ", ".join(f"{name}={_plain(value)}" for name, value in params.items())
    ran = runs.shown() if runs is not None else ""
    cells = (plan.name, plan.spec.type, plan.model.name, shown, ran, ", ".join(plan.save), plan.handover)
    return "<tr>" + "".join(f"<td>{_escape(cell)}</td>" for cell in cells) + "</tr>"


def _count_rows(counts: Sequence[tuple[str, int]]) -> str:
    return "".join(
        f'<tr><th>{_escape(label)}</th><td class="count">{count}</td></tr>' for label, count in counts
    )


def render_header(meta: JobMeta, summary: Summary, place: Place) -> str:
    spec = meta.spec
    options = spec.model_dump(
        mode="json", exclude_defaults=True, exclude={"version", "name", "output", "items", "stages"}
    )
    states = [
        ("items", summary.items),
        ("succeeded", summary.succeeded),
        ("failed", summary.failed),
        ("cancelled", summary.cancelled),
    ]
    if summary.flagged:
        states.append(("flagged nsfw", summary.flagged))
    if summary.quality is not None and summary.quality.low:
        states.append(("low score", summary.quality.low))
    reasons = sorted(summary.reasons.items(), key=lambda pair: (-pair[1], pair[0]))
    stage_rows = "".join(_stage_row(plan, summary.runs.get(plan.name)) for plan in meta.recipe)
    reasons_table = (
        f'<table class="reasons"><tr><th>failure reason</th><th>items</th></tr>{_count_rows(reasons)}</table>'
        if reasons
        else ""
    )
    return (
        f"<header><h1>{_escape(meta.name)}</h1>"
        f'<p class="job-id">{_escape(meta.job_id)}</p>'
        f"<p>output {_escape(meta.output)}"
        f"{''.join(f'; {_escape(k)} {_escape(_plain(v))}' for k, v in options.items())}</p>"
        '<table class="stages"><tr><th>stage</th><th>type</th><th>model</th><th>parameters</th><th>ran</th>'
        f"<th>saves</th><th>hands over</th></tr>{stage_rows}</table>"
        f'<div class="tallies"><table class="counts">{_count_rows(states)}</table>{reasons_table}</div>'
        f"{_quality_block(meta, summary, place)}{_nav(summary, place)}</header>"
    )


def _gates(meta: JobMeta) -> dict[str, float | None]:
    scored = [plan.score for plan in meta.recipe if plan.score is not None]
    return thresholds([(score.min_clip_score, score.min_input_similarity) for score in scored])


def _quality_block(meta: JobMeta, summary: Summary, place: Place) -> str:
    """Each score's distribution as a picture, with links to its lowest-scoring items, and a link to
    the near-duplicate groups; nothing for a job that scored nothing."""
    tally = summary.quality
    if tally is None or not tally.scored:
        return ""
    gates = _gates(meta)
    figures = [
        f'<figure class="score">{histogram_svg(tally.histograms[kind.field], gates[kind.field])}'
        f"<figcaption>{html.escape(kind.label)}: "
        f'<a href="{_href(place.key, layout.worst_page(kind.field))}">lowest first</a></figcaption></figure>'
        for kind in tally.kinds()
    ]
    groups = len(tally.groups())
    duplicates = f'<a href="{_href(place.key, layout.DUPLICATES_PAGE)}">near-duplicate groups ({groups})</a>'
    return f'<div class="quality">{"".join(figures)}<p>{duplicates}</p></div>'


def _page_links(label: str, pages: int, key_of: Callable[[int], str], place: Place) -> str:
    """Links to the first, the last and the pages near the current one: a few, however many pages."""
    current = place.page if place.key_of is key_of else None
    near = current or 1
    shown = sorted({1, pages, *range(max(1, near - NAV_SPREAD), min(pages, near + NAV_SPREAD) + 1)})
    links, previous = [], 0
    for page in shown:
        if page > previous + 1:
            links.append("<span>…</span>")
        links.append(
            f"<strong>{page}</strong>"
            if page == current
            else f'<a href="{_href(place.key, key_of(page))}">{page}</a>'
        )
        previous = page
    return f"<p>{_escape(label)}: {''.join(links)}</p>"


def _nav(summary: Summary, place: Place) -> str:
    failed = summary.failed + summary.cancelled
    failed_links = (
        _page_links(f"failed items ({failed})", summary.failed_pages, layout.failed_page, place)
        if summary.failed_pages
        else "<p>failed items: none</p>"
    )
    return (
        '<nav class="pages">'
        + _page_links(f"items ({summary.items})", summary.item_pages, layout.items_page, place)
        + failed_links
        + "</nav>"
    )


def _document(meta: JobMeta, title: str, header: str, body: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>imgjobs {_escape(meta.job_id)}: {_escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{header}<main>{body}</main></body></html>"
    )


# -- the pages


def _figure(label: str, source: str | None, link: str | None, missing: str) -> str:
    caption = _escape(label)
    if source is None:
        picture = f'<span class="placeholder">{_escape(missing)}</span>'
    elif source.startswith("data:"):
        picture = f'<img src="{source}" alt="{caption}">'
    else:  # the image itself, from the job's prefix: fetched only once it is scrolled to
        picture = f'<img src="{source}" alt="{caption}" loading="lazy">'
    if link:
        picture = f'<a href="{link}">{picture}</a>'
    return f"<figure>{picture}<figcaption>{caption}</figcaption></figure>"


def _item_section(
    result: ItemResult,
    thumbnails: Mapping[str, str | None],
    here: str,
    root: str,
    missing: str,
    input_missing: str,
) -> str:
    def link(uri: str) -> str | None:
        key = key_in_prefix(uri, root)
        return _href(here, key) if key else None

    figures = [_figure("input", thumbnails.get(result.image), None, input_missing)] if result.image else []
    for name, uri in result.outputs.items():
        shown = "latent" if layout.is_latent(uri) else missing
        figures.append(
            _figure(name, None if layout.is_latent(uri) else thumbnails.get(uri), link(uri), shown)
        )
    stages = [
        {"stage": s.name, "model": s.model, **s.params.model_dump(exclude_none=True)} for s in result.stages
    ]
    about: dict[str, object] = {"seed": result.seed, "negative_prompt": result.negative_prompt}
    quality = result.quality
    if quality is not None:
        about["scores"] = quality.model_dump(exclude={"stage", "model", "attempts"}, exclude_none=True)
        if quality.attempts:
            about["seeds tried"] = [attempt.seed for attempt in quality.attempts]
    details = json.dumps({**about, "stages": stages})
    error = (
        f"<p>{_escape(result.error.type)}: {_escape(_clipped(result.error.message))}</p>"
        if result.error
        else ""
    )
    flagged = '<p class="nsfw">flagged by the safety checker: its output is black</p>' if result.nsfw else ""
    if quality is not None:
        flagged += f'<p class="scores">{html.escape(_scores_line(quality))}</p>'
    if quality is not None and quality.low_score:
        flagged += f'<p class="low-score">below the score gate of {html.escape(quality.stage)}</p>'
    return (
        f'<section class="item {result.status}{" flagged" if result.nsfw else ""}" '
        f'id="item-{_escape(result.id)}">'
        f"<h2>{_escape(result.id)}: {result.status}{' (nsfw)' if result.nsfw else ''}</h2>"
        f'<p>{_escape(result.prompt)}</p>{error}{flagged}<div class="row">{"".join(figures)}</div>'
        f'<p class="params">{_escape(details)}</p></section>'
    )


def _scores_line(quality: QualityRecord) -> str:
    shown = []
    if quality.clip_score is not None:
        shown.append(f"CLIP score {quality.clip_score:g}")
    if quality.input_similarity is not None:
        shown.append(f"input similarity {quality.input_similarity:g}")
    if quality.attempts:
        shown.append(f"best of {len(quality.attempts)} seeds")
    return " · ".join(shown) or "scored"


def render_items_page(
    meta: JobMeta,
    summary: Summary,
    page: int,
    results: Sequence[ItemResult],
    thumbnails: Thumbnails,
    root: str,
) -> str:
    """One page of the contact sheet: the first with inlined thumbnails, a later one with links to the
    images in the job's prefix. The last page says where the items after the sheet are."""
    place = Place(layout.items_page, page)
    here = place.key
    first = (page - 1) * ITEMS_PER_PAGE + 1
    title = f"items {first}-{first + len(results) - 1} of {summary.items}"
    uris = [uri for result in results for uri in pictured(result)]
    missing = "not available"
    if page == 1:
        shown, input_missing = thumbnails(uris), missing
    else:
        shown = {uri: _href(here, key) for uri in uris if (key := key_in_prefix(uri, root))}
        input_missing = INPUT_NOT_IN_PREFIX
    note = (
        f"<p>The contact sheet shows the first {CONTACT_PAGES * ITEMS_PER_PAGE} items; the other "
        f'{summary.beyond_contact_sheet} are in <a href="{_href(here, layout.RESULTS)}">results.jsonl</a>, '
        "and the failed ones among them in the failed items' pages.</p>"
        if page == CONTACT_PAGES and summary.beyond_contact_sheet
        else ""
    )
    sections = "".join(_item_section(result, shown, here, root, missing, input_missing) for result in results)
    body = f"<h2>{_escape(title)}</h2>{note}{sections}" if results else "<p>The job has no items.</p>"
    return _document(meta, title, render_header(meta, summary, place), body)


def _linked_sections(results: Sequence[ItemResult], here: str, root: str) -> str:
    """Item sections whose images are shown from their files in the job's prefix, as later pages do."""
    uris = [uri for result in results for uri in pictured(result)]
    shown = {uri: _href(here, key) for uri in uris if (key := key_in_prefix(uri, root))}
    return "".join(
        _item_section(result, shown, here, root, "not available", INPUT_NOT_IN_PREFIX) for result in results
    )


def render_worst_page(meta: JobMeta, summary: Summary, kind: ScoreKind, root: str) -> str:
    """The lowest-scoring items of one score, lowest first, as a contact sheet."""
    assert summary.quality is not None
    place = Place(lambda _page: layout.worst_page(kind.field), 1)
    results = [ItemResult.model_validate_json(line) for line in summary.quality.worst_lines(kind)]
    scored = summary.quality.histograms[kind.field].count
    title = f"lowest {kind.label} first: {len(results)} of {scored} scored item(s)"
    note = (
        f"<p>The {WORST_SHOWN} lowest are shown; the others are in results.jsonl.</p>"
        if scored > WORST_SHOWN
        else ""
    )
    body = f"<h2>{html.escape(title)}</h2>{note}{_linked_sections(results, place.key, root)}"
    return _document(meta, title, render_header(meta, summary, place), body)


GROUP_MEMBERS_SHOWN = 12


def _output_of(result: ItemResult) -> str | None:
    """The item's last image output: what its perceptual hash was taken of, where it was saved."""
    images = [uri for uri in result.outputs.values() if not layout.is_latent(uri)]
    return images[-1] if images else None


def render_duplicates_page(meta: JobMeta, summary: Summary, members: Mapping[int, str], root: str) -> str:
    """The near-duplicate groups, largest first: each member's output, linked to its place in the
    contact sheet; `members` holds the results lines of the members shown, by position."""
    assert summary.quality is not None
    place = Place(lambda _page: layout.DUPLICATES_PAGE, 1)
    here = place.key
    groups = summary.quality.groups()
    sections = []
    for number, group in enumerate(groups[:GROUPS_SHOWN], start=1):
        figures = []
        for position in group[:GROUP_MEMBERS_SHOWN]:
            result = ItemResult.model_validate_json(members[position])
            output = _output_of(result)
            key = key_in_prefix(output, root) if output else None
            page = position // ITEMS_PER_PAGE + 1
            link = (
                _href(here, layout.items_page(page), f"item-{result.id}") if page <= CONTACT_PAGES else None
            )
            figures.append(_figure(result.id, _href(here, key) if key else None, link, "not available"))
        more = f" (the first {GROUP_MEMBERS_SHOWN} shown)" if len(group) > GROUP_MEMBERS_SHOWN else ""
        sections.append(
            f'<section class="group" id="group-{number}"><h2>group {number}: {len(group)} items{more}</h2>'
            f'<div class="row">{"".join(figures)}</div></section>'
        )
    title = f"near-duplicate groups: {len(groups)}"
    notes = "<p>Outputs whose perceptual hashes (64-bit dHash) differ in at most 3 bits.</p>"
    if len(groups) > GROUPS_SHOWN:
        notes += f"<p>The {GROUPS_SHOWN} largest groups are shown.</p>"
    if not summary.quality.complete:
        notes += "<p>Too many outputs hash alike to compare every pair: some groups may be missing.</p>"
    body = f"<h2>{html.escape(title)}</h2>{notes}{''.join(sections) or '<p>No near-duplicates.</p>'}"
    return _document(meta, title, render_header(meta, summary, place), body)


def render_quality_pages(
    meta: JobMeta, summary: Summary, members: Mapping[int, str], root: str
) -> Iterator[tuple[str, str]]:
    """(key, HTML) of a scored job's own pages: worst first per score, and the near-duplicates."""
    if summary.quality is None or not summary.quality.scored:
        return
    for kind in summary.quality.kinds():
        yield layout.worst_page(kind.field), render_worst_page(meta, summary, kind, root)
    yield layout.DUPLICATES_PAGE, render_duplicates_page(meta, summary, members, root)


def _failed_line(row: FailedRow, here: str) -> str:
    """The failed item's row, its id linked to its section in the contact sheet."""
    page = row.position // ITEMS_PER_PAGE + 1
    shown_id = _escape(row.id)
    if page <= CONTACT_PAGES:
        shown_id = f'<a href="{_href(here, layout.items_page(page), f"item-{row.id}")}">{shown_id}</a>'
    return (
        f"<tr><td>{shown_id}</td><td>{_escape(row.stage)}</td>"
        f"<td>{_escape(row.reason)}</td>"
        f'<td class="message">{_escape(row.message)}</td></tr>'
    )


def render_failed_page(meta: JobMeta, summary: Summary, page: int, rows: Sequence[FailedRow]) -> str:
    place = Place(layout.failed_page, page)
    first = (page - 1) * FAILED_PER_PAGE + 1
    title = f"failed items {first}-{first + len(rows) - 1} of {summary.failed + summary.cancelled}"
    lines = "".join(_failed_line(row, place.key) for row in rows)
    body = (
        f'<h2>{_escape(title)}</h2><table class="failures"><tr><th>id</th><th>stage</th>'
        f"<th>error</th><th>message</th></tr>{lines}</table>"
    )
    return _document(meta, title, render_header(meta, summary, place), body)


def render_pages(
    meta: JobMeta, summary: Summary, lines: Iterable[str], thumbnails: Thumbnails, root: str
) -> Iterator[tuple[str, str]]:
    """(key, HTML) of every page, in one pass over results.jsonl's `lines` (manifest order), holding
    one page of items and one of failures at a time; a line past the contact sheet is parsed only
    when it failed."""
    items: list[ItemResult] = []
    failed: list[FailedRow] = []
    item_page = failed_page = 1
    contact_items = CONTACT_PAGES * ITEMS_PER_PAGE

    def items_page() -> str:
        return render_items_page(meta, summary, item_page, items, thumbnails, root)

    for position, line in enumerate(lines):
        if position < contact_items:
            result: ItemResult | None = ItemResult.model_validate_json(line)
            assert result is not None
            items.append(result)
            if result.status != "failed":
                result = None
        else:
            result = parsed_if_failed(line)
        if result is not None:
            failed.append(FailedRow.of(result, position))
        if len(items) == ITEMS_PER_PAGE:
            yield layout.items_page(item_page), items_page()
            item_page, items = item_page + 1, []
        if len(failed) == FAILED_PER_PAGE:
            yield layout.failed_page(failed_page), render_failed_page(meta, summary, failed_page, failed)
            failed_page, failed = failed_page + 1, []
    if items or item_page == 1:
        yield layout.items_page(item_page), items_page()
    if failed:
        yield layout.failed_page(failed_page), render_failed_page(meta, summary, failed_page, failed)


def read_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as lines:
        yield from lines


def _keeping(lines: Iterable[str], wanted: set[int], kept: dict[int, str]) -> Iterator[str]:
    """The lines, keeping those at the positions `wanted` in `kept` on the way."""
    for position, line in enumerate(lines):
        if position in wanted:
            kept[position] = line
        yield line


def write_report(
    meta: JobMeta, results_path: Path, storage: Storage, settings: Settings, roots: LocalRoots
) -> str:
    """Every page of the report, from results.jsonl as written at `results_path` (read twice: the
    counts first, since every page's header shows them); returns report.html's URI."""
    summary = summarize(read_lines(results_path), scored=any(plan.score for plan in meta.recipe))
    # The near-duplicate groups' members shown, picked up as the second pass goes by.
    wanted = summary.quality.shown_positions(GROUP_MEMBERS_SHOWN) if summary.quality else set()
    members: dict[int, str] = {}
    first_page = ""
    written: set[str] = set()
    with ThreadPoolExecutor(THUMBNAIL_THREADS, thread_name_prefix="imgjobs-thumbnail") as pool:
        lines = _keeping(read_lines(results_path), wanted, members)
        pages = render_pages(meta, summary, lines, Thumbnailer(settings, roots, pool), storage.root)
        for key, page in chain(pages, render_quality_pages(meta, summary, members, storage.root)):
            if key == layout.REPORT:
                first_page = page
            else:
                storage.put(key, page.encode(), HTML_TYPE)
                written.add(key)
    # Last, so that once report.html is there, the pages it links to are too.
    uri = storage.put(layout.REPORT, first_page.encode(), HTML_TYPE)
    # An earlier end's pages that this one has no more of (a retry that left fewer failed items) would
    # otherwise be found beside the new ones, with counts that no longer hold.
    for key in storage.list(layout.REPORT_PAGES):
        if key not in written:
            storage.delete(key)
    return uri
