"""The imgjobs error tree.

    ImgjobsError                  root: every error we raise on purpose
    ├── SpecError                 the job spec or an item is invalid; carries every Problem found
    ├── ConfigError               a setting, env var or registry entry is wrong
    │   └── UnknownModelError     a stage names a model that is neither registered nor a folder
    ├── UnknownJobError           no job of that id on the broker (never submitted, or pruned)
    ├── BrokerUnavailableError    Redis cannot be reached
    ├── StorageError              reading or writing a job's files failed (retryable)
    │   └── StorageRefusedError   ... for good: a path through a file, no permission, a bad bucket
    └── ItemError                 one item failed; it is recorded and the rest of the job goes on
        ├── InputImageError       missing, unreadable, oversized or undecodable input image
        │   └── InputShardError   the shard holding the input is missing, truncated or changed since submit
        ├── StageError            the pipeline rejected or failed on the item's inputs
        ├── PromptError           the item's prompt cannot be used: unparsable in time, non-finite weights
        ├── TimeLimitError        the item's chunk ran past its time limit before the item finished
        ├── NsfwFlaggedError      the safety checker flagged the output, and the model fails such items
        ├── NonFiniteOutputError  the output (image or latents) holds NaN or infinity: a numeric overflow
        ├── LowScoreError         the output scored below its stage's score gate, which fails such items
        ├── ScoringError          the output could not be scored (the scoring model failed)
        ├── JobCancelledError     the job was cancelled before the item ran
        └── PoisonChunkError      the item's chunk was delivered too often: its worker died each time

`retryable` is policy as data: retries look at it rather than at the class names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


class ImgjobsError(Exception):
    retryable: ClassVar[bool] = False


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, located as precisely as we can."""

    file: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class SpecError(ImgjobsError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s); first: {problems[0]}" if problems else "invalid job")


class ConfigError(ImgjobsError):
    pass


class UnknownModelError(ConfigError):
    pass


class UnknownJobError(ImgjobsError):
    pass


class BrokerUnavailableError(ImgjobsError):
    pass


class StorageError(ImgjobsError):
    retryable = True


class StorageRefusedError(StorageError):
    retryable = False


class ItemError(ImgjobsError):
    pass


class InputImageError(ItemError):
    pass


class InputShardError(InputImageError):
    pass


class StageError(ItemError):
    pass


class PromptError(ItemError):
    pass


class TimeLimitError(ItemError):
    pass


class NsfwFlaggedError(ItemError):
    pass


class NonFiniteOutputError(ItemError):
    """Not retryable: the same seed, inputs and dtype overflow the same way again. Running the item
    once more in float32 was weighed and left out: it needs the model a second time in float32 (twice
    the GPU memory, and another compilation when compiled) for rare items, whose outputs would then
    come from another dtype than the rest of their job's. The message names the dtype; bfloat16 (the
    default on GPUs that have it) or float32 in the model's registry entry is the fix."""


class LowScoreError(ItemError):
    pass


class ScoringError(ItemError):
    pass


class JobCancelledError(ItemError):
    pass


class PoisonChunkError(ItemError):
    pass
