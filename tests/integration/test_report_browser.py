"""The report's pages as headless Chromium shows them: the header, the failed items' view and a
second page of the contact sheet, reached by following the pages' own relative links; and a scored
job's histograms, worst-first page and near-duplicate groups. .ci/run installs
Debian's chromium for these checks; without it they are skipped."""

from __future__ import annotations

import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from kits.reports import JOB_ID, Page, failed, succeeded, write_output, write_report_of
from schemas.messages import QualityRecord

pytestmark = pytest.mark.slow

INJECTED = '<img src=x onerror="alert(1)">'


def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium here; .ci/run installs Debian's chromium package for this check")
    return found


def chromium(url: str, *options: str) -> str:
    """Chromium's output for url: with --dump-dom, the page's DOM as the browser built it."""
    shown = subprocess.run(
        [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *options, url],
        capture_output=True,
        timeout=120,
        check=True,
        text=True,
    )
    return shown.stdout


def follow(url: str, page: Page, name: str) -> str:
    """The URL of the page's link to the page `name` (a link to no place in it), resolved as a browser
    resolves it."""
    (link,) = {link for link in page.links if "#" not in link and link.endswith(name)}
    return urllib.parse.urljoin(url, link)


@pytest.fixture(scope="module")
def report_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """report.html of 250 items, three of them failed, with jpeg and webp outputs."""
    output = tmp_path_factory.mktemp("report") / "out"
    job_dir = output / JOB_ID
    results = []
    for n in range(250):
        item_id = f"i{n:03d}"
        if n in (3, 120, 240):
            message = f"in/{INJECTED}.png: No such file" if n == 3 else f"in/{n}.png: No such file"
            results.append(failed(item_id, "InputImageError", message))
        else:
            image_format = "jpeg" if n % 2 else "webp"
            results.append(
                succeeded(item_id, {"s1-resize": write_output(job_dir, item_id, "s1-resize", image_format)})
            )
    write_report_of(output, results)
    return (job_dir / "report.html").as_uri()


@pytest.fixture(scope="module")
def first_page(report_url: str) -> Page:
    """report.html as the browser built it."""
    return Page(chromium(report_url, "--dump-dom"))


def path_of(url: str) -> Path:
    return Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))


def test_the_header_counts_and_the_links_to_every_page(report_url: str, first_page: Page) -> None:
    page = first_page
    assert page.counts() == {
        "items": "250",
        "succeeded": "247",
        "failed": "3",
        "cancelled": "0",
    }
    assert page.tables["reasons"][1:] == [["InputImageError", "3"]]
    assert page.tables["stages"][1][:3] == ["s0-img2img", "img2img", "tiny-sd"]
    assert len(page.sections) == 200 and page.sections[0] == "i000"
    for name in ("items-2.html", "failed-1.html"):
        target = follow(report_url, page, name)
        assert path_of(target).is_file(), target


def test_the_failed_items_view_shows_every_error_as_text(report_url: str, first_page: Page) -> None:
    url = follow(report_url, first_page, "failed-1.html")
    dom = chromium(url, "--dump-dom")
    rows = Page(dom).tables["failures"]
    assert rows[0] == ["id", "stage", "error", "message"]
    assert [row[:3] for row in rows[1:]] == [
        ["i003", "s0-img2img", "InputImageError"],
        ["i120", "s0-img2img", "InputImageError"],
        ["i240", "s0-img2img", "InputImageError"],
    ]
    assert rows[1][3] == f"in/{INJECTED}.png: No such file"  # shown as text: no element of it in the DOM
    assert Page(dom).images == [] and "<script" not in dom
    assert follow(url, Page(dom), "report.html") == report_url
    (to_item,) = (link for link in Page(dom).links if link.endswith("#item-i120"))
    assert urllib.parse.urljoin(url, to_item) == f"{report_url}#item-i120" and "item-i120" in first_page.ids


def test_the_second_page_shows_its_jpeg_and_webp_outputs(
    report_url: str, first_page: Page, tmp_path: Path
) -> None:
    url = follow(report_url, first_page, "items-2.html")
    page = Page(chromium(url, "--dump-dom"))
    assert page.sections == [f"i{n:03d}" for n in range(200, 250)]
    # Every output but that of i240, which failed: linked, not inlined, each to its file.
    shown = [urllib.parse.urljoin(url, src) for src in page.linked_images()]
    assert shown == [
        (path_of(report_url).parent / f"i{n}" / f"s1-resize.{'jpeg' if n % 2 else 'webp'}").as_uri()
        for n in range(200, 250)
        if n != 240
    ]
    assert all(path_of(image).is_file() for image in shown)
    shot = tmp_path / "page-2.png"
    chromium(url, f"--screenshot={shot}", "--window-size=1000,1400")
    screenshot = Image.open(shot).convert("RGB")
    assert screenshot.size == (1000, 1400)
    # The images render: the page holds far more than the few colours of text on white.
    assert len(set(screenshot.getdata())) > 500


@pytest.fixture(scope="module")
def scored_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """report.html of a job whose img2img stage scores its outputs: 40 items, the CLIP scores falling
    with the item's number, items 3 and 30 alike (their hashes a bit apart), item 39 failed low."""
    output = tmp_path_factory.mktemp("scored") / "out"
    job_dir = output / JOB_ID
    results = []
    for n in range(40):
        item_id = f"i{n:03d}"
        phash = {3: "f0f0f0f0f0f0f0f0", 30: "f0f0f0f0f0f0f0f1"}.get(n, f"{n * 0x0101010101010101:016x}")
        scores = QualityRecord(
            stage="s0-img2img",
            model="tiny-clip",
            clip_score=40.0 - n * 0.5,
            input_similarity=0.9 - (n % 7) * 0.05,
            phash=phash,
            low_score=n >= 30,
            seed=n,
        )
        outputs = {"s1-resize": write_output(job_dir, item_id, "s1-resize", "webp")}
        if n == 39:
            results.append(
                failed(item_id, "LowScoreError", "s0-img2img: CLIP score 20.5 is below", quality=scores)
            )
        else:
            results.append(succeeded(item_id, outputs, quality=scores))
    write_report_of(output, results, score={"model": "tiny-clip", "min_clip_score": 25})
    return (job_dir / "report.html").as_uri()


def test_a_scored_jobs_header_draws_each_scores_histogram(scored_url: str, tmp_path: Path) -> None:
    page = Page(chromium(scored_url, "--dump-dom"))
    assert page.counts()["low score"] == "10"
    charts = page.of_tag("svg", "histogram")
    assert [chart["aria-label"] for chart in charts] == [
        "CLIP score of 40 item(s): from 20.5 to 40.0; gate 25.0",
        "input similarity of 40 item(s): from 0.6 to 0.9",
    ]
    assert len(page.of_tag("rect")) >= 10 and len(page.of_tag("line", "gate")) == 1
    # Drawn, not only in the DOM: the bars' blue and the gate's red are on the screen.
    shot = tmp_path / "header.png"
    chromium(scored_url, f"--screenshot={shot}", "--window-size=1000,700")
    colours = set(Image.open(shot).convert("RGB").getdata())
    assert (0x4A, 0x7F, 0xB5) in colours and (0xB0, 0x00, 0x20) in colours


def test_worst_first_and_the_near_duplicates_from_the_headers_links(scored_url: str) -> None:
    header = Page(chromium(scored_url, "--dump-dom"))
    worst_url = follow(scored_url, header, "worst-clip-score.html")
    worst = Page(chromium(worst_url, "--dump-dom"))
    assert worst.sections == [f"i{n:03d}" for n in range(39, -1, -1)]
    assert "LowScoreError" in worst.text and "below the score gate of s0-img2img" in worst.text
    assert all(path_of(urllib.parse.urljoin(worst_url, src)).is_file() for src in worst.linked_images())
    duplicates_url = follow(scored_url, header, "duplicates.html")
    duplicates = Page(chromium(duplicates_url, "--dump-dom"))
    assert [section["id"] for section in duplicates.of_tag("section", "group")] == ["group-1"]
    assert [image["alt"] for image in duplicates.images] == ["i003", "i030"]
    (to_item,) = (link for link in duplicates.links if link.endswith("#item-i030"))
    assert urllib.parse.urljoin(duplicates_url, to_item) == f"{scored_url}#item-i030"
