"""How long compel's prompt parser takes on nested and unclosed parentheses, as it is and with
pyparsing's memoizing (packrat, what workers turn on; left recursion, the other mode pyparsing has),
and what validation's linear checks cost on the same prompts. Each parse runs in a fresh interpreter
with a time limit, since without memoizing it may never end.

    .venv/bin/python bench/compel_parse.py [--limit-s 60]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

MODES = ("none", "packrat", "left-recursion")
PROMPTS = {
    "5 nested levels": "(" * 5 + "masterpiece" + ")" * 5,
    "6 nested levels": "(" * 6 + "masterpiece" + ")" * 6,
    "8 nested levels": "(" * 8 + "masterpiece" + ")" * 8,
    "16 nested levels": "(" * 16 + "masterpiece" + ")" * 16,
    "32 unclosed (": "(" * 32 + "masterpiece",
    "3,984 characters of weighted words": "(a photo)1.1 of a cat-- " * 166,
}
# Loaded from its file: `import compel.prompt_parser` runs compel's __init__, which imports torch.
CHILD = """
import importlib.util, sys, time
import pyparsing
mode, prompt = sys.argv[1], sys.argv[2]
if mode == "packrat":
    pyparsing.ParserElement.enable_packrat()
elif mode == "left-recursion":
    pyparsing.ParserElement.enable_left_recursion()
spec = importlib.util.find_spec("compel")
path = spec.submodule_search_locations[0] + "/prompt_parser.py"
module_spec = importlib.util.spec_from_file_location("compel_prompt_parser", path)
module = importlib.util.module_from_spec(module_spec)
module_spec.loader.exec_module(module)
parser = module.PromptParser()
started = time.perf_counter()
try:
    parser.parse_conjunction(prompt)
    outcome = "parsed"
except RecursionError:
    outcome = "RecursionError"
print(f"{time.perf_counter() - started:.3f} {outcome}")
"""


def parse_time(mode: str, prompt: str, limit_s: float) -> str:
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, mode, prompt],
            capture_output=True,
            text=True,
            timeout=limit_s,
            check=True,
        )
    except subprocess.TimeoutExpired:
        return f"over {limit_s:g} s"
    seconds, outcome = done.stdout.split()
    return f"{float(seconds):.3f} s" + ("" if outcome == "parsed" else f" ({outcome})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-s", type=float, default=60.0)
    args = parser.parse_args()
    from schemas.prompts import weighted_prompt_problem

    print(f"| prompt | {' | '.join(MODES)} | validation's check |")
    print(f"|---|{'---|' * len(MODES)}---|")
    for name, prompt in PROMPTS.items():
        started = time.perf_counter()
        problem = weighted_prompt_problem(prompt)
        check = f"{(time.perf_counter() - started) * 1e6:.0f} µs, {'refused' if problem else 'accepted'}"
        times = [parse_time(mode, prompt, args.limit_s) for mode in MODES]
        print(f"| {name} | {' | '.join(times)} | {check} |", flush=True)


if __name__ == "__main__":
    main()
