"""Prompts as validation checks them, before anything is sent: control characters are refused in every
prompt, compel prompts that workers could not parse in bounded time (or would weigh by a number that
is not finite) are refused with their line, and a prompt a CLIP text encoder must cut short is a
warning with its line. Every check is linear in the prompt's length."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from jobs.manifest import validate_job
from jobs.registry import Registry
from kits.helpers import write_job
from schemas.errors import SpecError
from schemas.job import Item, JobSpec
from schemas.prompts import MAX_WEIGHTED_PROMPT_CHARS, clip_tokens_at_least, weighted_prompt_problem

REGISTRY = Registry.load(None)
COMPEL = {"type": "img2img", "model": "sd15", "prompt_syntax": "compel"}
PLAIN = {"type": "img2img", "model": "sd15"}
# Prompts that stall compel: its parser without memoizing takes 13 s for 6 levels, over a minute for 8,
# and never ends for 32 unclosed parentheses.
SIX_LEVELS = "(" * 6 + "masterpiece" + ")" * 6
UNCLOSED = "(" * 32 + "masterpiece"


def problems(spec: Path) -> list[str]:
    with pytest.raises(SpecError) as caught:
        validate_job(spec, REGISTRY)
    return [str(problem) for problem in caught.value.problems]


def test_compel_prompts_workers_cannot_take_are_refused_with_their_line(tmp_path: Path) -> None:
    prompts = [
        "a (cat)1.3 wizard, jungle--",
        SIX_LEVELS,  # accepted: workers parse it in milliseconds
        UNCLOSED,
        '("a cat", "a dog").blend(nan, 1)',
        '("a cat", "a dog").blend(1, -1)',  # normalized by their sum, 0
        '("a cat", "a dog").blend(1, -1, no_normalize)',
        "x" * (MAX_WEIGHTED_PROMPT_CHARS + 1),
        "a \\(literal\\) parenthesis" + "\\(" * 40,
    ]
    rows = [{"id": f"i{n}", "image": "a.png", "prompt": prompt} for n, prompt in enumerate(prompts)]
    rows.append({"id": "neg", "image": "a.png", "negative_prompt": "(" * 20 + "ugly"})
    spec = write_job(tmp_path, rows, stage=COMPEL)
    started = time.perf_counter()
    found = problems(spec)
    assert time.perf_counter() - started < 5
    items = tmp_path / "items.jsonl"
    assert [line.split(": ", 2)[:2] for line in found] == [
        [f"{items}:3", "prompt"],
        [f"{items}:4", "prompt"],
        [f"{items}:5", "prompt"],
        [f"{items}:7", "prompt"],
        [f"{items}:9", "negative_prompt"],
    ]
    assert "nests parentheses 32 levels deep" in found[0] and "at most 16" in found[0]
    assert "the weight 'nan' is not a finite number" in found[1]
    assert "the weights sum to 0" in found[2] and "no_normalize" in found[2]
    assert f"{MAX_WEIGHTED_PROMPT_CHARS + 1} characters" in found[3]
    assert "20 levels deep" in found[4]

    # Plain prompts are never parsed: the same parentheses are just text there.
    assert validate_job(write_job(tmp_path / "plain", rows, stage=PLAIN), REGISTRY).total == len(rows)


def test_a_template_or_the_spec_s_own_prompts_are_refused_once_on_their_spec_line(tmp_path: Path) -> None:
    rows = [{"id": f"i{n}", "image": "a.png", "prompt": "a cat"} for n in range(50)]
    stage = {**COMPEL, "prompt_template": "(" * 17 + "{prompt}", "negative_prompt": "(a, b).and(inf, 1)"}
    spec = write_job(tmp_path, rows, stage=stage)
    found = problems(spec)
    assert len(found) == 2, found  # not one per item
    assert found[0].startswith(f"{spec}:") and ": stages.0.prompt_template: " in found[0]
    assert "17 levels deep" in found[0]
    assert ": stages.0.negative_prompt: .and(inf, 1): the weight 'inf' is not a finite number" in found[1]


def test_control_characters_are_refused_in_every_prompt(tmp_path: Path) -> None:
    rows = [
        {"id": "nul", "image": "a.png", "prompt": "a cat\x00 wizard"},
        {"id": "escape", "image": "a.png", "negative_prompt": "ugly\x1b[31m"},
        {"id": "ok", "image": "a.png", "prompt": "tabs\tand\nline breaks are text"},
    ]
    spec = write_job(tmp_path, rows, stage=PLAIN)
    items = tmp_path / "items.jsonl"
    assert problems(spec) == [
        f"{items}:1: prompt: contains the control character U+0000 at character 6; prompts are text "
        "(tab and line breaks are allowed)",
        f"{items}:2: negative_prompt: contains the control character U+001B at character 5; prompts are "
        "text (tab and line breaks are allowed)",
    ]
    with pytest.raises(ValidationError, match=r"U\+0007"):
        JobSpec.model_validate(
            {**json.loads(spec.read_text()), "stages": [{**PLAIN, "prompt_template": "{prompt}\x07"}]}
        )
    with pytest.raises(ValidationError, match=r"U\+0085"):
        Item(id="a", prompt="next\x85line")  # a C1 control, as `retry --set prompt=...` would give it


def test_a_prompt_a_clip_encoder_must_cut_short_is_a_warning_with_its_line(tmp_path: Path) -> None:
    long = " ".join(["word"] * 80)
    rows = [
        {"id": "short", "image": "a.png", "prompt": "a cat wizard"},
        *({"id": f"long{n}", "image": "a.png", "prompt": long} for n in range(7)),
    ]
    job = validate_job(write_job(tmp_path, rows, stage=PLAIN), REGISTRY)
    items = tmp_path / "items.jsonl"
    notes = job.notes(distributed=False)
    assert len(notes) == 6, notes  # five lines shown, the rest counted
    assert notes[0].startswith(f"{items}:2: prompt: may be cut short by the model: it has at least 80 CLIP")
    assert "results.jsonl says per stage whether it was (prompt_truncated)" in notes[0]
    assert notes[-1] == f"{items}: 2 more item(s) whose prompt may be cut short"
    # compel encodes a long prompt in pieces: nothing is cut there.
    compel = validate_job(write_job(tmp_path / "compel", rows, stage=COMPEL), REGISTRY)
    assert compel.notes(distributed=False) == []


def test_the_checks_are_linear_in_the_prompt() -> None:
    for text in (UNCLOSED * 100, "(" * 3000, '("a", "b").blend(1, 2)' * 150, "word " * 20_000):
        started = time.perf_counter()
        weighted_prompt_problem(text)
        clip_tokens_at_least(text)
        assert time.perf_counter() - started < 0.5, text[:40]
    assert weighted_prompt_problem(SIX_LEVELS) is None
    assert clip_tokens_at_least("It's 8k, a cat") == 7  # it 's 8 k , a cat: CLIP's pieces, a lower bound
