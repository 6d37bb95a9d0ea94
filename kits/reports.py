"""Reports made from results built in the test, and what the tests read of their pages (as written,
or as a browser's DOM dump has them)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from PIL import Image

from jobstate import layout
from jobstate.meta import JobMeta
from jobstate.storage import LocalStorage
from kits.helpers import CPU, local_model, stage_plan
from schemas.job import JobSpec, ResolvedParams
from schemas.messages import ErrorInfo, ItemResult, StageRecord
from schemas.settings import LocalRoots, Settings
from workers.imageio import encode_image
from workers.report import write_report

JOB_ID = "report-test-0123abcd"
PARAMS = ResolvedParams(size=(16, 16))


def job_meta(output: Path, total: int, score: dict[str, Any] | None = None) -> JobMeta:
    """A two-stage job: img2img on tiny-sd handing its image to a resize that writes webp; with
    `score`, the img2img stage scores its outputs so."""
    stages: list[dict[str, Any]] = [
        {"type": "img2img", "strength": 0.6, "steps": 4, **({"score": score} if score else {})},
        {"type": "resize", "format": "webp", "quality": 70},
    ]
    spec = JobSpec.model_validate(
        {
            "version": 1,
            "name": "report-test",
            "output": str(output),
            "items": "items.jsonl",
            "dataset": True,
            "stages": [{"model": "tiny-sd", **stages[0]}, stages[1]],
        }
    )
    recipe = (
        stage_plan(stages[0], local_model("tiny-sd", output / "models"), index=0, handover="image", save=()),
        stage_plan(stages[1], CPU, index=1),
    )
    return JobMeta(
        job_id=JOB_ID,
        name="report-test",
        output=str(output),
        total=total,
        chunk_size=64,
        run_id="run-1",
        spec=spec,
        recipe=recipe,
        submitted_at=0.0,
    )


@functools.cache
def encoded(image_format: str) -> bytes:
    """A small image of many colours, in the format a stage writes."""
    ramp = Image.linear_gradient("L").resize((32, 32))
    image = Image.merge("RGB", (ramp, ramp.rotate(90), ramp.rotate(180)))
    return encode_image(image, image_format)


def write_output(job_dir: Path, item_id: str, name: str, image_format: str) -> str:
    """The image as the stage would write it; its URI."""
    path = job_dir / item_id / f"{name}.{image_format}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded(image_format))
    return str(path)


def succeeded(item_id: str, outputs: dict[str, str] | None = None, **fields: Any) -> ItemResult:
    return ItemResult.model_validate(
        {
            "id": item_id,
            "status": "succeeded",
            "outputs": outputs or {},
            "seed": 0,
            "model": "cpu",
            "prompt": f"prompt of {item_id}",
            "params": PARAMS,
            "stages": [ran("s0-img2img"), StageRecord(name="s1-resize", model="cpu", params=PARAMS)],
            **fields,
        }
    )


def ran(stage: str, steps: int = 2) -> StageRecord:
    """The record of an img2img stage that ran DPM++ 2M Karras, `steps` steps with guidance."""
    params = ResolvedParams(size=(16, 16), steps=4, strength=0.6, sampler="dpmpp_2m", schedule="karras")
    return StageRecord(
        name=stage,
        model="tiny-sd",
        params=params,
        sampler="dpmpp_2m",
        schedule="karras",
        steps_run=steps,
        unet_evaluations=2 * steps,
    )


def failed(item_id: str, reason: str, message: str, stage: str = "s0-img2img", **fields: Any) -> ItemResult:
    return succeeded(
        item_id,
        status="failed",
        error=ErrorInfo(type=reason, message=message),
        failed_stage=stage,
        **fields,
    )


def write_report_of(
    output: Path, results: Sequence[ItemResult], score: dict[str, Any] | None = None
) -> dict[str, str]:
    """The report of `results` as the job's end writes it (its img2img stage scoring as `score` says);
    every page's HTML by its key."""
    meta = job_meta(output, len(results), score)
    job_dir = output / meta.job_id
    results_path = output / "results.jsonl"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text("".join(result.model_dump_json() + "\n" for result in results))
    settings = Settings()
    uri = write_report(
        meta, results_path, LocalStorage(job_dir), settings, LocalRoots.of(settings, str(job_dir))
    )
    assert uri == str(job_dir / layout.REPORT)
    return {
        path.relative_to(job_dir).as_posix(): path.read_text(encoding="utf-8")
        for path in sorted(job_dir.rglob("*.html"))
    }


class Page(HTMLParser):
    """What the tests read of a page: its tables' rows (by the table's class), links, element ids,
    item sections and images."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.links: list[str] = []
        self.ids: list[str] = []
        self.sections: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.elements: list[tuple[str, dict[str, str | None]]] = []  # every element, in order
        self.texts: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.texts).split())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.elements.append((tag, attributes))
        if attributes.get("id"):
            self.ids.append(str(attributes["id"]))
        if tag == "section" and "item" in (attributes.get("class") or "").split():
            self.sections.append(str(attributes.get("id", "")).removeprefix("item-"))
        elif tag == "a" and attributes.get("href"):
            self.links.append(str(attributes["href"]))
        elif tag == "img":
            self.images.append(attributes)
        elif tag == "table":
            self._table = attributes.get("class") or ""
            self.tables.setdefault(self._table, [])
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._table is not None and self._cell is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        self.texts.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def of_tag(self, tag: str, css_class: str | None = None) -> list[dict[str, str | None]]:
        """The attributes of each element of `tag` (of that class, when given)."""
        return [
            attributes
            for name, attributes in self.elements
            if name == tag and (css_class is None or css_class in (attributes.get("class") or "").split())
        ]

    def counts(self) -> dict[str, str]:
        """The header's counts by state, as shown."""
        return {label: count for label, count in self.tables["counts"]}

    def thumbnails(self) -> list[str]:
        """The alt text of each image shown with an inlined thumbnail."""
        return [str(image["alt"]) for image in self.images if (image.get("src") or "").startswith("data:")]

    def linked_images(self) -> list[str]:
        """The src of each image shown from a file (not inlined): each loads lazily."""
        linked = [image for image in self.images if not (image.get("src") or "").startswith("data:")]
        assert all(image.get("loading") == "lazy" for image in linked), linked
        return [str(image["src"]) for image in linked]
