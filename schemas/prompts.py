"""What can be told of a prompt without its model, in time linear in its length, so that the producer
checks every item and a worker checks again before it parses or encodes one:

- control characters, which no prompt needs and which would reach logs and report.html as they are;
- with `prompt_syntax: compel`, whether compel's parser takes the prompt in bounded time, and whether
  the weights it names are finite;
- a lower bound of its CLIP tokens, for the warning that a prompt may be cut short.

compel parses with a pyparsing grammar that backtracks: left as it is, its time grows exponentially
with the nesting of parentheses, an unclosed `(` counting as a level (bench/compel_parse.py: 5 levels
3-5 s, 6 levels 16-24 s, 8 or 32 unclosed `(` over a minute). Workers turn on pyparsing's packrat
memoizing (workers/prompts.py), which makes it about linear (milliseconds for any of those, under a
second for 4,000 characters); its recursion still deepens with the nesting, and past about 30 levels
Python's recursion limit stops it. Hence the bounds on length and nesting.
"""

from __future__ import annotations

import math
import re
import string

MAX_WEIGHTED_PROMPT_CHARS = 4000
MAX_WEIGHTED_PROMPT_NESTING = 16
# CLIP's tokenizers keep 77 tokens, two of them the start and end markers: 75 of the prompt's own.
CLIP_PROMPT_TOKENS = 75

# C0 controls but tab, line feed and carriage return; DEL; C1 controls.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# A parenthesis, or an escaped character (compel's `\(` is a literal parenthesis).
_PARENTHESES = re.compile(r"\\.|[()]", re.DOTALL)
# compel's operators whose arguments are weights: `(a, b).blend(0.7, 0.3)`, `.and(...)`, `x.attend(1.2)`.
_WEIGHTED_OPERATOR = re.compile(r"\.(blend|and|add|attend)\(([^()]*)\)")
NO_NORMALIZE = "no_normalize"
# CLIP's pre-tokenizer (lower-cased text): contractions, letter runs, single digits, runs of other
# symbols. BPE makes one token or more of each piece, so their count is a lower bound of the tokens.
_CLIP_PIECES = re.compile(r"'(?:s|t|re|ve|m|ll|d)|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)
# The same for ASCII text, twice as fast: a contraction counts as two pieces here (the apostrophe and
# its letters), so the apostrophes are taken off again.
_ASCII_PIECES = re.compile(r"[a-zA-Z]+|\d|[^a-zA-Z\d\s]+")
_LETTERS_AND_SPACES = str.maketrans("", "", string.ascii_letters + " ")


def control_character_problem(text: str) -> str | None:
    """Why a prompt (or a template or negative prompt) is refused for a control character."""
    found = _CONTROL.search(text)
    if found is None:
        return None
    return (
        f"contains the control character U+{ord(found.group()):04X} at character {found.start() + 1}; "
        "prompts are text (tab and line breaks are allowed)"
    )


def _nesting(text: str) -> int:
    """The deepest nesting of parentheses, each `(` not closed yet counting as a level, as compel's
    parser tries it."""
    depth = deepest = 0
    for found in _PARENTHESES.finditer(text):
        mark = found.group()
        if mark == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif mark == ")":
            depth = max(depth - 1, 0)
    return deepest


def _weight_problem(operator: str, arguments: str) -> str | None:
    """A non-finite weight among an operator's arguments, or blend weights that sum to zero (compel
    divides by their sum): what turns the embeddings, and so the image, into NaN."""
    values = []
    normalize = True
    for argument in arguments.split(","):
        value = argument.partition("=")[2] if "=" in argument else argument
        value = value.strip()
        if value == NO_NORMALIZE:
            normalize = False
            continue
        try:
            number = float(value)
        except ValueError:
            continue  # `+`, `-`, a flag: not a number compel reads as a weight
        if not math.isfinite(number):
            return f".{operator}({arguments}): the weight {value!r} is not a finite number"
        values.append(number)
    if operator == "blend" and normalize and values and sum(values) == 0:
        return (
            f".blend({arguments}): the weights sum to 0, and compel divides by their sum; "
            f"change them or add {NO_NORMALIZE}"
        )
    return None


def weighted_prompt_problem(text: str) -> str | None:
    """Why compel's parser (as workers run it) cannot take the prompt in bounded time, or would give
    weights that are not finite; None when it can."""
    if len(text) > MAX_WEIGHTED_PROMPT_CHARS:
        return (
            f"is {len(text)} characters; with prompt_syntax: compel, at most {MAX_WEIGHTED_PROMPT_CHARS} "
            "(compel's parser takes about a second per 4,000)"
        )
    if text.count("(") > MAX_WEIGHTED_PROMPT_NESTING:
        nesting = _nesting(text)
        if nesting > MAX_WEIGHTED_PROMPT_NESTING:
            return (
                f"nests parentheses {nesting} levels deep (an unclosed `(` counts as a level); with "
                f"prompt_syntax: compel, at most {MAX_WEIGHTED_PROMPT_NESTING}; write `\\(` for a "
                "literal parenthesis"
            )
    if "." in text:
        for found in _WEIGHTED_OPERATOR.finditer(text):
            problem = _weight_problem(found.group(1), found.group(2))
            if problem is not None:
                return problem
    return None


def clip_tokens_over(text: str, limit: int = CLIP_PROMPT_TOKENS) -> int | None:
    """clip_tokens_at_least(text) where it is over `limit`, else None; ruled out first, where it can
    be, by an upper bound of the pieces that costs a third of counting them: each piece begins a word
    or begins at a character that is not a letter, and no more than two begin at one."""
    if len(text) <= limit:
        return None  # a piece is a character at least
    if text.isascii() and len(text.split()) + 2 * len(text.translate(_LETTERS_AND_SPACES)) <= limit:
        return None
    tokens = clip_tokens_at_least(text)
    return tokens if tokens > limit else None


def clip_tokens_at_least(text: str) -> int:
    """A lower bound of the tokens a CLIP tokenizer makes of the text, its start and end markers
    left out. The model's own tokenizer decides; this only says when it cannot be fewer."""
    if text.isascii():
        return len(_ASCII_PIECES.findall(text)) - text.count("'")
    return len(_CLIP_PIECES.findall(text))
