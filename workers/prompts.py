"""Prompts for a batched pipeline call: plain strings, or Compel-weighted embeddings
(`a (cat)1.3 wizard`, `jungle--`) turned into prompt_embeds per item; each weighted prompt checked
alone first, so that one compel cannot take fails its own item only; and which prompts the model's
tokenizer cuts short.

compel's pyparsing grammar backtracks, exponentially in the nesting of parentheses. pyparsing's packrat
memoizing makes it about linear and gives the same parses (compel's own parser tests pass with it; its
left-recursion mode is as fast but changes 4 of their 22 results), so workers turn it on before compel
parses anything. It is a switch for the whole process: nothing else in a worker uses pyparsing. Each
weighted prompt is then parsed within PARSE_LIMIT_S, a bound that what validation accepts stays far
below (schemas/prompts.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from schemas.errors import PromptError, StageError
from schemas.prompts import weighted_prompt_problem

log = logging.getLogger(__name__)

PARSE_LIMIT_S = 10.0


def prompt_arguments(
    pipeline: Any, prompts: list[str], negatives: list[str | None], syntax: str
) -> dict[str, Any]:
    # diffusers reads a missing negative prompt as the empty string; a list must be all strings.
    negative = [text or "" for text in negatives]
    if syntax == "plain":
        return {"prompt": prompts, "negative_prompt": negative}
    _compel_parser()  # packrat on before compel parses
    # Imported only for weighted prompts: compel pulls in transformers, seconds at every worker start.
    from compel import Compel, CompelForSD, CompelForSDXL, ReturnedEmbeddingsType

    encoder = getattr(pipeline, "text_encoder", None)
    encoder_2 = getattr(pipeline, "text_encoder_2", None)
    if encoder is not None and encoder_2 is not None:
        sdxl = CompelForSDXL(pipeline, device=pipeline.device)(prompts, negative_prompt=negative)
        return {
            "prompt_embeds": sdxl.embeds,
            "pooled_prompt_embeds": sdxl.pooled_embeds,
            "negative_prompt_embeds": sdxl.negative_embeds,
            "negative_pooled_prompt_embeds": sdxl.negative_pooled_embeds,
        }
    if encoder_2 is not None:
        # The SDXL refiner has only the second text encoder, which also gives the pooled embedding.
        compel = Compel(
            tokenizer=pipeline.tokenizer_2,
            text_encoder=encoder_2,
            requires_pooled=True,
            truncate_long_prompts=False,
            returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
            device=pipeline.device,
        )
        embeds, pooled = compel(prompts)
        negative_embeds, negative_pooled = compel(negative)
        embeds, negative_embeds = compel.pad_conditioning_tensors_to_same_length([embeds, negative_embeds])
        return {
            "prompt_embeds": embeds,
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative_embeds,
            "negative_pooled_prompt_embeds": negative_pooled,
        }
    if encoder is not None and getattr(pipeline, "tokenizer", None) is not None:
        sd = CompelForSD(pipeline, device=pipeline.device)(prompts, negative_prompt=negative)
        return {"prompt_embeds": sd.embeds, "negative_prompt_embeds": sd.negative_embeds}
    raise StageError(
        f"prompt_syntax: compel works with SD 1.x and SDXL pipelines, not {type(pipeline).__name__}"
    )


class _ParseTimeUp(BaseException):
    """Raised into compel's parser when its time is up; a BaseException, so that no handler of the
    parser's own takes it for a failed match."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise _ParseTimeUp into the block once `seconds` have passed: with a timer signal, on the main
    thread, where a worker runs its pipeline calls. Elsewhere the block runs unbounded, as what
    validation accepts parses in well under a second."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def time_up(_signum: int, _frame: Any) -> None:
        raise _ParseTimeUp

    previous = signal.signal(signal.SIGALRM, time_up)
    outer = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer[0] > 0:  # a timer someone else had set goes on, less the time spent here
            signal.setitimer(signal.ITIMER_REAL, max(outer[0] - (time.monotonic() - started), 1e-3), outer[1])


_parser: Any = None


def _compel_parser() -> Any:
    """compel's prompt parser, with packrat memoizing on for the whole process (see the module's doc)."""
    global _parser
    if _parser is None:
        import pyparsing

        pyparsing.ParserElement.enable_packrat()
        from compel.prompt_parser import PromptParser

        _parser = PromptParser()
    return _parser


def _non_finite(node: Any) -> str | None:
    """What in a parsed prompt weighs the embeddings by a number that is not finite: a weight, or blend
    weights that sum to zero (compel divides by their sum)."""
    weights = getattr(node, "weights", None)
    if isinstance(weights, list):
        for weight in weights:
            if not math.isfinite(weight):
                return f"a weight of {weight}"
        if getattr(node, "normalize_weights", False) and weights and sum(weights) == 0:
            return "blend weights that sum to 0"
    weight = getattr(node, "weight", None)
    if isinstance(weight, int | float) and not math.isfinite(weight):
        return f"a weight of {weight} for {getattr(node, 'text', '')!r}"
    for name in ("prompts", "children", "original", "edited"):
        for child in getattr(node, name, None) or ():
            if (found := _non_finite(child)) is not None:
                return found
    return None


def weighted_prompt_error(text: str, which: str = "prompt") -> PromptError | None:
    """Why compel cannot take `text` (the prompt after its template, or the negative prompt) for one
    item: too long or deeply nested to parse in bounded time, not parsed within PARSE_LIMIT_S, not
    parsable, or weighted by a number that is not finite. None when it can."""
    problem = weighted_prompt_problem(text)
    if problem is not None:
        return PromptError(f"prompt_syntax: compel: the {which} {problem}")
    parser = _compel_parser()  # outside the limit: its first call imports compel
    try:
        with _time_limit(PARSE_LIMIT_S):
            parsed = parser.parse_conjunction(text)
    except _ParseTimeUp:
        return PromptError(f"prompt_syntax: compel could not parse the {which} within {PARSE_LIMIT_S:g} s")
    except RecursionError:
        return PromptError(f"prompt_syntax: compel: the {which} is nested too deeply to parse")
    except Exception as exc:  # the parser's own error, or one of its actions' (float("x"), overflow)
        return PromptError(f"prompt_syntax: compel cannot parse the {which}: {type(exc).__name__}: {exc}")
    found = _non_finite(parsed)
    if found is not None:
        return PromptError(f"prompt_syntax: compel: the {which} has {found}, which would make the image NaN")
    return None


def _tokenizer(pipeline: Any) -> Any:
    """The tokenizer of the text encoder a pipeline reads its prompt with."""
    for name in ("tokenizer", "tokenizer_2", "prior_tokenizer"):
        tokenizer = getattr(pipeline, name, None)
        if tokenizer is not None:
            return tokenizer
    return None


def prompts_cut_short(pipeline: Any, prompts: list[str], syntax: str) -> list[bool]:
    """Per prompt, whether the pipeline's tokenizer cuts it to its limit (77 tokens for CLIP), as
    diffusers does, dropping the rest without a word but a log line. compel encodes a long prompt in
    pieces instead, so weighted prompts are never cut."""
    tokenizer = _tokenizer(pipeline) if syntax == "plain" and pipeline is not None else None
    limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer is None or not isinstance(limit, int):
        return [False] * len(prompts)
    # Tokenizing only what needs it: a token is a byte at least, besides the start and end markers.
    long = [index for index, prompt in enumerate(prompts) if len(prompt.encode()) + 2 > limit]
    cut = [False] * len(prompts)
    if not long:
        return cut
    try:
        ids = tokenizer([prompts[index] for index in long], truncation=False).input_ids
    except Exception:  # what is only recorded must never fail the call
        log.warning("could not count the tokens of %d prompt(s)", len(long), exc_info=True)
        return cut
    for index, tokens in zip(long, ids, strict=True):
        cut[index] = len(tokens) > limit
    return cut
