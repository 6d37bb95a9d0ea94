"""A job's prompts as validation sees them (schemas/prompts.py says what is checked and why): each
stage's prompt after its prompt_template, and its negative prompt. For a compel stage, what workers
could not parse in bounded time or would weigh with a non-finite number is a problem of the line; for
the others, a prompt a CLIP text encoder must cut short is a warning, since only the model's own
tokenizer knows its limit and the worker records what it did (prompt_truncated in results.jsonl).

What the spec itself says (a template, the defaults, a stage's negative prompt) is checked once, as a
problem or warning of the spec; an item's own prompt on its line. Both are about linear in the
prompt: a few microseconds for a plain prompt longer than 75 characters, nothing for a shorter one or
for one that repeats the last item's; compel's checks are memoized by text.
"""

from __future__ import annotations

from schemas.job import DEFAULT_PROMPT_TEMPLATE, JobSpec, ResizeStage, StageSpec
from schemas.prompts import CLIP_PROMPT_TOKENS, clip_tokens_over, weighted_prompt_problem

MEMO_SIZE = 4096
Finding = tuple[str, str]  # (field, message)


def _after_template(index: int, stage: StageSpec) -> str:
    template = getattr(stage, "prompt_template", DEFAULT_PROMPT_TEMPLATE)
    return f" (as stages.{index}.prompt_template makes it)" if template != DEFAULT_PROMPT_TEMPLATE else ""


def cut_short(tokens: int) -> str:
    return (
        f"may be cut short by the model: it has at least {tokens} CLIP tokens, and CLIP text encoders "
        f"(SD 1.x, SDXL, Kandinsky 2.2, the upscalers) read the first {CLIP_PROMPT_TOKENS}; "
        "results.jsonl says per stage whether it was (prompt_truncated)"
    )


class PromptChecks:
    def __init__(self, spec: JobSpec) -> None:
        self.defaults = spec.defaults
        self.stages = [
            (index, stage) for index, stage in enumerate(spec.stages) if not isinstance(stage, ResizeStage)
        ]
        self.weighted = [(index, stage) for index, stage in self.stages if stage.prompt_syntax == "compel"]
        self.plain = [(index, stage) for index, stage in self.stages if stage.prompt_syntax == "plain"]
        self._memo: dict[str, str | None] = {}
        self._last: tuple[str | None, Finding | None] = (None, None)
        self.spec_problems: list[Finding] = []
        self.spec_warnings: list[Finding] = []
        # Stages whose template or defaults are refused already: their items are not told again.
        self._refused: set[int] = set()
        self._check_spec()

    def _problem(self, text: str) -> str | None:
        if text not in self._memo:
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            self._memo[text] = weighted_prompt_problem(text)
        return self._memo[text]

    @staticmethod
    def _tokens_warning(text: str) -> str | None:
        # Not memoized: the check costs about what a memo would (a few microseconds), and the items of
        # a row that share their prompt are told apart by item_warning at once.
        tokens = clip_tokens_over(text)
        return None if tokens is None else cut_short(tokens)

    def _check_spec(self) -> None:
        base = self.defaults.prompt
        for index, stage in self.stages:
            template = stage.prompt_template
            text = template.format(prompt=base or "")
            field = "defaults.prompt" if base is not None else f"stages.{index}.prompt_template"
            if stage.prompt_syntax == "compel":
                if (problem := self._problem(text)) is not None:
                    self.spec_problems.append((field, f"{problem}{_after_template(index, stage)}"))
                    self._refused.add(index)
                negative, where = stage.negative_prompt, f"stages.{index}.negative_prompt"
                if negative is None:
                    negative, where = self.defaults.negative_prompt, "defaults.negative_prompt"
                if negative is not None and (problem := self._problem(negative)) is not None:
                    self.spec_problems.append((where, problem))
            elif base is not None and (warning := self._tokens_warning(text)) is not None:
                self.spec_warnings.append((field, f"{warning}{_after_template(index, stage)}"))

    def item_problems(self, prompt: str | None, negative_prompt: str | None) -> list[Finding]:
        """An item's own prompt and negative prompt (None where it sets none) as compel stages take them."""
        found: dict[Finding, None] = {}
        for index, stage in self.weighted:
            if index in self._refused:
                continue
            if prompt is not None:
                problem = self._problem(stage.prompt_template.format(prompt=prompt))
                if problem is not None:
                    found[("prompt", f"{problem}{_after_template(index, stage)}")] = None
            if negative_prompt is not None and (problem := self._problem(negative_prompt)) is not None:
                found[("negative_prompt", problem)] = None
        return list(found)

    def item_warning(self, prompt: str | None) -> Finding | None:
        """The warning for an item's own prompt that a plain stage's model may cut short."""
        if prompt is None:
            return None
        if prompt == self._last[0]:  # items in a row mostly share their prompt
            return self._last[1]
        self._last = (prompt, self._item_warning(prompt))
        return self._last[1]

    def _item_warning(self, prompt: str) -> Finding | None:
        for index, stage in self.plain:
            template = stage.prompt_template
            text = prompt if template == DEFAULT_PROMPT_TEMPLATE else template.format(prompt=prompt)
            warning = self._tokens_warning(text)
            if warning is not None:
                return "prompt", f"{warning}{_after_template(index, stage)}"
        return None
