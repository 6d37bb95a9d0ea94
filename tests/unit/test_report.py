"""report.html and its pages: the header's spec and counts, the failed items' view, paging past 200
items with relative links that stay in the job's prefix, thumbnails of every output format on the
first page and linked images on the others, escaping, an earlier end's pages deleted; and the job's
end writing them from a real run."""

from __future__ import annotations

import itertools
import posixpath
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from jobs.embedded import EmbeddedRedis
from kits.helpers import CPU, stage_plan, write_image
from kits.reports import JOB_ID, Page, failed, job_meta, ran, succeeded, write_output, write_report_of
from schemas.job import Item
from schemas.messages import ItemResult
from tests.chunkkit import harness
from workers import report
from workers.report import Summary, render_pages


def test_the_header_shows_the_spec_and_counts_by_state_and_by_failure_reason(tmp_path: Path) -> None:
    results = [
        succeeded("ok-1"),
        succeeded("ok-2", nsfw=True),
        failed("bad-input-1", "InputImageError", "in/1.png: No such file or directory"),
        succeeded("ok-3", stages=[ran("s0-img2img", steps=3)]),
        failed("bad-input-2", "InputImageError", "in/2.png: not a recognized image"),
        failed("flagged", "NsfwFlaggedError", "s0-img2img: flagged", nsfw=True),
        failed("late-1", "JobCancelledError", "the job was cancelled before the item ran", stage="s1-resize"),
        failed("late-2", "JobCancelledError", "the job was cancelled before the item ran", stage="s1-resize"),
    ]
    pages = write_report_of(tmp_path / "out", results)
    assert sorted(pages) == ["_report/failed-1.html", "report.html"]
    for key in pages:
        page = Page(pages[key])
        assert "report-test" in page.text and JOB_ID in page.text
        # What ran is read from the items' records: the sampler, and the range of steps run and of
        # UNet evaluations an item; a resize runs neither.
        assert page.tables["stages"] == [
            ["stage", "type", "model", "parameters", "ran", "saves", "hands over"],
            [
                "s0-img2img",
                "img2img",
                "tiny-sd",
                "steps=4, strength=0.6",
                "dpmpp_2m karras: 2-3 steps, 4-6 UNet evaluations an item",
                "",
                "image",
            ],
            ["s1-resize", "resize", "cpu", "format=webp, quality=70", "", "image", "none"],
        ]
        assert "dataset true" in page.text
        assert page.counts() == {
            "items": "8",
            "succeeded": "3",
            "failed": "3",
            "cancelled": "2",
            "flagged nsfw": "2",
        }
        assert page.tables["reasons"] == [
            ["failure reason", "items"],
            ["InputImageError", "2"],
            ["JobCancelledError", "2"],
            ["NsfwFlaggedError", "1"],
        ]

    failures = Page(pages["_report/failed-1.html"])
    assert failures.tables["failures"] == [
        ["id", "stage", "error", "message"],
        ["bad-input-1", "s0-img2img", "InputImageError", "in/1.png: No such file or directory"],
        ["bad-input-2", "s0-img2img", "InputImageError", "in/2.png: not a recognized image"],
        ["flagged", "s0-img2img", "NsfwFlaggedError", "s0-img2img: flagged"],
        ["late-1", "s1-resize", "JobCancelledError", "the job was cancelled before the item ran"],
        ["late-2", "s1-resize", "JobCancelledError", "the job was cancelled before the item ran"],
    ]
    assert failures.links.count("../report.html#item-bad-input-1") == 1
    assert "item-bad-input-1" in Page(pages["report.html"]).ids


def test_a_job_with_no_failure_says_so_and_shows_no_reasons(tmp_path: Path) -> None:
    pages = write_report_of(tmp_path / "out", [succeeded("a"), succeeded("b")])
    page = Page(pages["report.html"])
    assert page.counts() == {"items": "2", "succeeded": "2", "failed": "0", "cancelled": "0"}
    assert "reasons" not in page.tables
    # No failed items' page, and no link to one: the header says there are none.
    assert sorted(pages) == ["report.html"]
    assert not [link for link in page.links if "failed-" in link]
    assert "failed items: none" in page.text


def test_control_characters_are_shown_as_escapes(tmp_path: Path) -> None:
    """A job submitted before prompts were checked, or an error message, may hold control characters:
    a page shows them as escapes, never as they are."""
    results = [
        succeeded("a", prompt="a cat\x00 wizard\x1b[31m", negative_prompt="ugly\x7f"),
        failed("b", "StageError", "bad\x00input\x9b", prompt="x\x08y"),
    ]
    pages = write_report_of(tmp_path / "out", results)
    for html_text in pages.values():
        assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]", html_text)
    contact = Page(pages["report.html"])
    assert "a cat\\x00 wizard\\x1b[31m" in contact.text and "x\\x08y" in contact.text
    assert Page(pages["_report/failed-1.html"]).tables["failures"][1][3] == "bad\\x00input\\x9b"


def test_user_data_is_escaped_on_every_page(tmp_path: Path) -> None:
    script = "<script>alert(1)</script>"
    injected = '<img src=x onerror="alert(2)">'
    results = [
        succeeded("a", prompt=script, negative_prompt='"quoted" & <b>bold</b>'),
        failed("b", "InputImageError", f"in/{injected}.png: No such file", prompt=script),
    ]
    pages = write_report_of(tmp_path / "out", results)
    for html_text in pages.values():
        assert "<script" not in html_text and "<img src=x" not in html_text and "<b>" not in html_text
    contact = Page(pages["report.html"])
    assert script in contact.text and injected in contact.text  # shown as text, not run
    assert Page(pages["_report/failed-1.html"]).tables["failures"][1][3] == f"in/{injected}.png: No such file"


def resolve(page_key: str, link: str) -> tuple[str, str]:
    """The key a relative link leads to from the page at page_key, and its fragment."""
    target, _, fragment = link.partition("#")
    return posixpath.normpath(
        posixpath.join(posixpath.dirname(page_key), urllib.parse.unquote(target))
    ), fragment


def test_more_than_200_items_are_paged_and_every_link_stays_in_the_jobs_prefix(tmp_path: Path) -> None:
    job_dir = tmp_path / "out" / JOB_ID

    def result(n: int) -> ItemResult:
        item_id = f"i{n:03d}"
        if n % 100 == 7:
            return failed(item_id, "InputImageError", f"in/{n}.png: missing")
        # Outputs for every fifth item only: enough to follow their links, and the test stays quick.
        written = {"s1-resize": write_output(job_dir, item_id, "s1-resize", "webp")} if n % 5 == 0 else {}
        return succeeded(item_id, written)

    results = [result(n) for n in range(450)]
    pages = {key: Page(text) for key, text in write_report_of(tmp_path / "out", results).items()}
    assert sorted(pages) == [
        "_report/failed-1.html",
        "_report/items-2.html",
        "_report/items-3.html",
        "report.html",
    ]
    shown = [pages[key].sections for key in ("report.html", "_report/items-2.html", "_report/items-3.html")]
    assert [len(ids) for ids in shown] == [200, 200, 50]
    assert list(itertools.chain(*shown)) == [result.id for result in results]
    # Past the first page the outputs are linked, not inlined: the webp outputs of i400, i405, ... i445.
    assert pages["_report/items-3.html"].thumbnails() == []
    assert [
        resolve("_report/items-3.html", src)[0] for src in pages["_report/items-3.html"].linked_images()
    ] == [f"i{n}/s1-resize.webp" for n in range(400, 450, 5)]
    assert len(pages["report.html"].thumbnails()) == 40 and pages["report.html"].linked_images() == []

    assert {"_report/items-2.html", "_report/items-3.html", "_report/failed-1.html"} <= {
        resolve("report.html", link)[0] for link in pages["report.html"].links
    }
    assert "../report.html" in pages["_report/items-3.html"].links
    for key, page in pages.items():
        for link in page.links + page.linked_images():
            assert "://" not in link and not link.startswith("/"), link
            target, fragment = resolve(key, link)
            assert not target.startswith(".."), f"{key}: {link} leaves the job's prefix"
            assert (job_dir / target).is_file(), f"{key}: {link} leads nowhere"
            if fragment:
                assert fragment in pages[target].ids, f"{key}: {link}"
    failures = pages["_report/failed-1.html"].tables["failures"]
    assert [row[0] for row in failures[1:]] == ["i007", "i107", "i207", "i307", "i407"]


def test_jpeg_and_webp_outputs_get_thumbnails_and_latents_a_link(tmp_path: Path) -> None:
    job_dir = tmp_path / "out" / JOB_ID
    latent = job_dir / "a" / "s0-img2img.safetensors"
    latent.parent.mkdir(parents=True)
    latent.write_bytes(b"not read")
    outputs = {
        "s0-img2img.latent": str(latent),
        "s1-resize": write_output(job_dir, "a", "s1-resize", "jpeg"),
    }
    results = [
        succeeded("a", outputs, image=write_output(tmp_path / "in", "a", "input", "png")),
        succeeded("b", {"s1-resize": write_output(job_dir, "b", "s1-resize", "webp")}),
        succeeded("c", {"s1-resize": write_output(job_dir, "c", "s1-resize", "png")}),
        # Elsewhere than the job's prefix: pictured where readable, never linked.
        succeeded(
            "d", {"s1-resize": write_output(tmp_path / "out" / f"{JOB_ID}-other", "d", "s1-resize", "png")}
        ),
    ]
    page = Page(write_report_of(tmp_path / "out", results)["report.html"])
    assert page.thumbnails() == ["input", "s1-resize", "s1-resize", "s1-resize", "s1-resize"]
    outputs_linked = [link for link in page.links if not link.startswith(("_report/", "#"))]
    assert outputs_linked == [
        "a/s0-img2img.safetensors",
        "a/s1-resize.jpeg",
        "b/s1-resize.webp",
        "c/s1-resize.png",
    ]


def test_the_contact_sheet_stops_after_its_pages_and_the_failed_view_lists_every_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "CONTACT_PAGES", 1)
    job_dir = tmp_path / "out" / JOB_ID
    results = [
        succeeded(f"i{n:03d}", {"s1-resize": write_output(job_dir, f"i{n:03d}", "s1-resize", "jpeg")})
        for n in range(201)
    ]
    results.append(failed("late", "InputImageError", "late.png: no such file"))
    pages = write_report_of(tmp_path / "out", results)
    sheet = Page(pages["report.html"])
    assert len(sheet.thumbnails()) == 200 and "_report/items-2.html" not in pages
    assert "the other 2 are in results.jsonl" in sheet.text and "results.jsonl" in sheet.links
    assert sheet.counts() == {"items": "202", "succeeded": "201", "failed": "1", "cancelled": "0"}
    (row,) = Page(pages["_report/failed-1.html"]).tables["failures"][1:]
    assert row[:3] == ["late", "s0-img2img", "InputImageError"]
    assert not [link for link in Page(pages["_report/failed-1.html"]).links if "#item-late" in link]


def test_pages_are_made_as_the_results_stream_past_holding_one_page(tmp_path: Path) -> None:
    """A job of a million items: the first two pages come after reading their 400 items, not all."""
    read = 0

    def endless() -> Iterator[str]:
        nonlocal read
        for n in itertools.count():
            read += 1
            yield succeeded(f"i{n}").model_dump_json()

    meta = job_meta(tmp_path, 10**6)
    pages = render_pages(
        meta, Summary(items=10**6, succeeded=10**6), endless(), lambda uris: {}, str(tmp_path)
    )
    (first, _), (second, html_text) = next(pages), next(pages)
    assert (first, second, read) == ("report.html", "_report/items-2.html", 400)
    links = Page(html_text).links
    assert len(links) < 20 and f"items-{report.CONTACT_PAGES}.html" in links and "../report.html" in links


def test_the_jobs_end_writes_the_paged_report_with_webp_thumbnails(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    items = [
        Item(id=f"i{n:03d}", image=str(write_image(tmp_path / "in" / f"{n}.png", (24, 24))))
        for n in range(203)
    ]
    items[5] = Item(id="i005", image=str(tmp_path / "in" / "missing.png"))
    plan = stage_plan({"type": "resize", "format": "webp"}, CPU)
    job = harness(client, items, tmp_path / "out", recipe=[plan])
    job.run_all()

    assert job.store.meta("job").report == str(job.job_dir / "report.html")
    first, second = (Page((job.job_dir / key).read_text()) for key in ("report.html", "_report/items-2.html"))
    assert (len(first.sections), len(second.sections)) == (200, 3)
    assert (
        first.thumbnails().count("s0-resize") == 199 and first.thumbnails().count("input") == 199
    )  # i005 has no input
    # The second page links its outputs; its inputs lie outside the job's prefix, so it shows none.
    assert second.thumbnails() == [] and second.linked_images() == [
        f"../i{n}/s0-resize.webp" for n in range(200, 203)
    ]
    assert second.text.count(report.INPUT_NOT_IN_PREFIX) == 3
    assert first.counts() == {"items": "203", "succeeded": "202", "failed": "1", "cancelled": "0"}
    assert first.tables["reasons"] == [["failure reason", "items"], ["InputImageError", "1"]]
    (row,) = Page((job.job_dir / "_report" / "failed-1.html").read_text()).tables["failures"][1:]
    assert row[:3] == ["i005", "s0-resize", "InputImageError"] and "missing.png" in row[3]


def test_a_later_end_deletes_the_pages_an_earlier_one_wrote_and_it_did_not(tmp_path: Path) -> None:
    """A retry that leaves fewer items failed: the earlier end's second failed page would otherwise
    stay beside the new pages, with counts that no longer hold."""
    first_end = [failed(f"i{n:04d}", "InputImageError", "missing") for n in range(report.FAILED_PER_PAGE + 1)]
    pages = write_report_of(tmp_path / "out", first_end)
    assert {"_report/failed-1.html", "_report/failed-2.html", "_report/items-6.html"} <= set(pages)
    (tmp_path / "out" / JOB_ID / "_report" / "notes.txt").write_text("not the report's")

    second_end = [succeeded(result.id) for result in first_end[:-1]] + first_end[-1:]
    pages = write_report_of(tmp_path / "out", second_end)
    assert sorted(pages) == ["_report/failed-1.html"] + [f"_report/items-{n}.html" for n in range(2, 7)] + [
        "report.html"
    ]
    assert [row[0] for row in Page(pages["_report/failed-1.html"]).tables["failures"][1:]] == ["i1000"]


def test_a_long_error_message_is_clipped_on_both_views(tmp_path: Path) -> None:
    pages = write_report_of(tmp_path / "out", [failed("a", "StageError", "x" * 10_000)])
    shown = Page(pages["_report/failed-1.html"]).tables["failures"][1][3]
    assert shown == "x" * report.MESSAGE_CHARS + "…"
    assert pages["report.html"].count("x" * report.MESSAGE_CHARS + "…") == 1


def test_the_header_finds_what_ran_past_a_prompt_that_looks_like_json(tmp_path: Path) -> None:
    """The stage records are found in the raw results lines: a prompt with quotes, braces and the
    names of the fields after it must not hide them or be taken for them."""
    tricky = 'a "cat", {"sampler":"euler"} (wizard)1.2'
    record = ran("s0-img2img", steps=3).model_copy(update={"prompt": tricky, "prompt_truncated": True})
    pages = write_report_of(tmp_path / "out", [succeeded("ok", stages=[record])])
    row = Page(pages["report.html"]).tables["stages"][1]
    assert row[4] == "dpmpp_2m karras: 3 steps, 6 UNet evaluations an item"
