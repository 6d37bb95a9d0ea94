"""report.html: a self-contained contact sheet per item (input, then each saved stage output, with
prompt and parameters), thumbnails inlined so the file opens anywhere."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Iterable

from PIL import Image

from schemas.messages import ItemResult
from schemas.settings import Settings
from workers.imageio import LocalRoots, decode_image, fetch_bytes

THUMBNAIL_SIDE = 160
MAX_ITEMS = 200

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
.item { border-top: 1px solid #ccc; padding: .8rem 0; }
.item.failed h2 { color: #b00020; }
h2 { font-size: 1rem; margin: 0 0 .4rem; }
.row { display: flex; gap: .8rem; flex-wrap: wrap; }
figure { margin: 0; text-align: center; font-size: .75rem; }
img { display: block; width: 160px; height: 160px; object-fit: contain; background: #eee; }
.params { font: .75rem monospace; color: #555; white-space: pre-wrap; }
.nsfw { color: #8a5a00; font-weight: bold; }
"""


def _thumbnail(uri: str, settings: Settings, roots: LocalRoots) -> str | None:
    try:
        image = decode_image(fetch_bytes(uri, settings, roots), uri, settings)
    except Exception:  # a thumbnail is decoration: whatever stops it, the report shows none
        return None
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure(label: str, uri: str | None, settings: Settings, roots: LocalRoots) -> str:
    source = _thumbnail(uri, settings, roots) if uri else None
    picture = f'<img src="{source}" alt="{html.escape(label)}">' if source else "<img alt='not available'>"
    return f"<figure>{picture}<figcaption>{html.escape(label)}</figcaption></figure>"


def render_report(
    job_id: str, results: Iterable[ItemResult], total: int, settings: Settings, roots: LocalRoots
) -> str:
    sections = []
    for count, result in enumerate(results):
        if count >= MAX_ITEMS:
            break
        figures = [_figure("input", result.image, settings, roots)] if result.image else []
        figures += [
            _figure(name, uri, settings, roots)
            for name, uri in result.outputs.items()
            if uri.endswith(".png")
        ]
        stages = [
            {"stage": s.name, "model": s.model, **s.params.model_dump(exclude_none=True)}
            for s in result.stages
        ]
        details = json.dumps(
            {"seed": result.seed, "negative_prompt": result.negative_prompt, "stages": stages}
        )
        error = (
            f"<p>{html.escape(result.error.type)}: {html.escape(result.error.message)}</p>"
            if result.error
            else ""
        )
        flagged = (
            '<p class="nsfw">flagged by the safety checker: its output is black</p>' if result.nsfw else ""
        )
        sections.append(
            f'<section class="item {result.status}{" flagged" if result.nsfw else ""}">'
            f"<h2>{html.escape(result.id)}: {result.status}{' (nsfw)' if result.nsfw else ''}</h2>"
            f'<p>{html.escape(result.prompt)}</p>{error}{flagged}<div class="row">{"".join(figures)}</div>'
            f'<p class="params">{html.escape(details)}</p></section>'
        )
    shown = min(total, MAX_ITEMS)
    note = (
        f"<p>Showing the first {shown} of {total} items; results.jsonl lists all.</p>"
        if total > shown
        else ""
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>imgjobs {html.escape(job_id)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(job_id)}</h1>{note}{''.join(sections)}</body></html>"
    )
