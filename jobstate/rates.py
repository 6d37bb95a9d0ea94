"""What pipeline calls took, by model and shape: recorded by workers as they run chunks, read by
`submit --dry-run` to estimate a job's time. The one reader and writer of the rates keys.

A shape is "<stage type>:<width>x<height>" of the input a stage fits items to; the steps are the
denoising steps the pipeline ran (an img2img stage runs int(steps * strength) of them). Counts are
cumulative, so an estimate is the average of everything the workers of a model have run at a shape.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import redis

from jobstate import keys


@dataclass(frozen=True)
class Rate:
    items: int
    steps: int  # denoising steps, summed over the items
    seconds: float  # inside pipeline calls

    def seconds_for(self, items: int, steps: int) -> float:
        """The expected seconds of `items` items running `steps` denoising steps in all: by step where
        both this rate and the plan have steps, else by item."""
        if self.steps and steps:
            return self.seconds / self.steps * steps
        return self.seconds / max(self.items, 1) * items


@dataclass(frozen=True)
class RateSample:
    model: str
    shape: str
    items: int
    steps: int
    seconds: float


def shape_of(stage_type: str, size: tuple[int, int]) -> str:
    return f"{stage_type}:{size[0]}x{size[1]}"


class RateBook:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def add(self, samples: Iterable[RateSample]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for sample in samples:
            key = keys.model_rates(sample.model)
            pipe.hincrby(key, f"{sample.shape}|items", sample.items)
            pipe.hincrby(key, f"{sample.shape}|steps", sample.steps)
            pipe.hincrbyfloat(key, f"{sample.shape}|seconds", sample.seconds)
        pipe.execute()

    def rates(self, model: str) -> dict[str, Rate]:
        """The model's rates by shape."""
        fields: dict[str, dict[str, str]] = {}
        for field, value in self.client.hgetall(keys.model_rates(model)).items():
            shape, _, measure = _text(field).rpartition("|")
            fields.setdefault(shape, {})[measure] = _text(value)
        return {
            shape: Rate(int(got.get("items", 0)), int(got.get("steps", 0)), float(got.get("seconds", 0.0)))
            for shape, got in fields.items()
            if int(got.get("items", 0)) > 0
        }


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
