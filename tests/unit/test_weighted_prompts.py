"""Prompts on the worker, through the chunk runner on the tiny SD model against a real Redis: a
weighted prompt that compel cannot parse in bounded time, cannot parse at all or would weigh by a
number that is not finite fails its own item, before the pipeline call, and the rest of the call
runs; nested parentheses parse in milliseconds; the parse is bounded in time whatever the parser
does; and each stage records the prompt it ran with and whether the model's tokenizer cut it short."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image

from jobs.embedded import EmbeddedRedis
from kits.helpers import local_model, stage_plan, write_image
from schemas.errors import PromptError
from schemas.job import Defaults, Item
from schemas.messages import ItemResult
from tests.chunkkit import harness
from workers import prompts
from workers.models import LoadedModel

STAGE = {"type": "img2img", "strength": 0.75, "guidance_scale": 7.5, "steps": 4}


@pytest.fixture(scope="module")
def tiny_sd(tiny_sd_dir: Path) -> LoadedModel:
    return LoadedModel("tiny-sd", local_model("tiny-sd", tiny_sd_dir).entry)


def run_items(
    redis_server: EmbeddedRedis,
    tmp_path: Path,
    tiny_sd: LoadedModel,
    item_prompts: dict[str, str],
    **stage: Any,
) -> dict[str, ItemResult]:
    """One chunk of the items (one pipeline call: the model's batch size is 8), run to its results."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    image = str(write_image(tmp_path / "in.png", (32, 32)))
    items = [Item(id=item_id, image=image, prompt=prompt) for item_id, prompt in item_prompts.items()]
    plan = stage_plan({**STAGE, **stage}, local_model("tiny-sd", Path(tiny_sd.entry.source)))
    job = harness(
        client, items, tmp_path / "out", recipe=[plan], model=tiny_sd, defaults=Defaults(size=(32, 32))
    )
    job.run_all()
    return job.results()


@pytest.mark.slow
@pytest.mark.timeout(120)  # compel's parser without memoizing never ends on these prompts
def test_a_weighted_prompt_compel_cannot_take_fails_its_own_item_only(
    redis_server: EmbeddedRedis, tmp_path: Path, tiny_sd: LoadedModel
) -> None:
    started = time.perf_counter()
    results = run_items(
        redis_server,
        tmp_path,
        tiny_sd,
        {
            "good": "a (cat)1.3 wizard, jungle--",
            "nested": "(" * 8 + "masterpiece" + ")" * 8,  # over a minute for compel's parser as it is
            "unclosed": "(" * 32 + "masterpiece",  # never ends for it
            "nan": '("a cat", "a dog").blend(nan, 1)',  # NaN embeddings: a black image
            "zero": '("a cat", "a dog").blend(1, -1)',  # normalized by their sum, 0
            "unparsable": '("a cat", "a dog").blend(heavy, 1)',  # compel's float("heavy") fails the call
        },
        prompt_syntax="compel",
    )
    assert time.perf_counter() - started < 60
    assert {item_id: result.status for item_id, result in results.items()} == {
        "good": "succeeded",
        "nested": "succeeded",
        "unclosed": "failed",
        "nan": "failed",
        "zero": "failed",
        "unparsable": "failed",
    }
    errors = {item_id: result.error for item_id, result in results.items() if result.error}
    assert {error.type for error in errors.values()} == {PromptError.__name__}
    assert "nests parentheses 32 levels deep" in errors["unclosed"].message
    assert "the weight 'nan' is not a finite number" in errors["nan"].message
    assert "the weights sum to 0" in errors["zero"].message
    assert "compel cannot parse the prompt: ValueError" in errors["unparsable"].message
    for item_id in ("good", "nested"):
        pixels = np.asarray(Image.open(results[item_id].outputs["s0-img2img"]))
        assert pixels.std() > 1, f"{item_id}: not a flat (black) image"
    assert results["unclosed"].failed_stage == "s0-img2img" and results["unclosed"].stages[0].prompt


def test_the_parse_is_bounded_in_time_whatever_the_parser_does(monkeypatch: pytest.MonkeyPatch) -> None:
    class Endless:
        def parse_conjunction(self, text: str) -> None:
            while True:
                pass

    monkeypatch.setattr(prompts, "_parser", Endless())
    monkeypatch.setattr(prompts, "PARSE_LIMIT_S", 0.2)
    signal.setitimer(signal.ITIMER_REAL, 100.0)  # a timer of someone else's, which must go on
    try:
        started = time.perf_counter()
        error = prompts.weighted_prompt_error("a (cat)1.3")
        assert time.perf_counter() - started < 2
        assert isinstance(error, PromptError) and "could not parse the prompt within 0.2 s" in str(error)
        assert 90 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def test_the_bound_is_the_parse_s_not_the_parser_s_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's first weighted prompt imports compel (seconds, on a cold disk): not on its clock."""

    class Quick:
        def parse_conjunction(self, text: str) -> object:
            return object()

    def slow_to_import() -> Quick:
        time.sleep(0.5)
        return Quick()

    monkeypatch.setattr(prompts, "_compel_parser", slow_to_import)
    monkeypatch.setattr(prompts, "PARSE_LIMIT_S", 0.2)
    assert prompts.weighted_prompt_error("a (cat)1.3") is None


@pytest.mark.slow
def test_each_stage_records_its_prompt_and_whether_the_tokenizer_cut_it(
    redis_server: EmbeddedRedis, tmp_path: Path, tiny_sd: LoadedModel
) -> None:
    """The tiny tokenizer makes a token of each character: 77 with the start and end markers."""
    long = (
        "a watercolor of a lighthouse on a cliff at dawn with seagulls, crashing waves, soft light and mist"
    )
    results = run_items(
        redis_server,
        tmp_path,
        tiny_sd,
        {"short": "a cat", "long": long},
        prompt_template="{prompt}, ink",
    )
    short, cut = results["short"].stages[0], results["long"].stages[0]
    assert (short.prompt, short.prompt_truncated) == ("a cat, ink", False)
    assert (cut.prompt, cut.prompt_truncated) == (f"{long}, ink", True)
    assert results["long"].prompt == long  # the row's prompt stays the item's own
