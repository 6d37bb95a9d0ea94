"""What pipeline calls took, by model and shape: recorded by workers as they run chunks, read by
`submit --dry-run` to estimate a job's time. The one reader and writer of the rates keys.

A shape is "<stage type>:<width>x<height>" of the input a stage fits items to. Work is counted in
UNet evaluations, not steps (schemas/samplers.py): a second-order sampler evaluates the UNet twice a
step, an img2img stage runs int(steps * strength) steps, classifier-free guidance doubles the batch.
So a rate recorded at 50 PNDM steps with guidance estimates 20 steps of DPM++ 2M, or 4 of LCM
without guidance, by what they evaluate. What a call spends once per item (encoding the prompt and
the image, decoding the latents) is spread over its evaluations too: a few-step job estimated from
many-step rates comes out low by that part. The sums are halved together whenever a shape's items
pass WINDOW_ITEMS, so an estimate averages what the workers of a model ran at a shape, the most
recent work weighing most: the rate follows a change of GPU or of settings within a few thousand
items, not never.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources

import redis

from jobstate import keys

WINDOW_ITEMS = 5000  # a shape's items past which its sums are halved (add_rate.lua)
_ADD_RATE = (resources.files("jobstate") / "lua" / "add_rate.lua").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Rate:
    items: int
    evaluations: int  # UNet evaluations, summed over the items
    seconds: float  # inside pipeline calls

    def seconds_for(self, items: int, evaluations: int) -> float:
        """The expected seconds of `items` items costing `evaluations` UNet evaluations in all: by
        evaluation where both this rate and the plan have some, else by item."""
        if self.evaluations and evaluations:
            return self.seconds / self.evaluations * evaluations
        return self.seconds / max(self.items, 1) * items


@dataclass(frozen=True)
class RateSample:
    model: str
    shape: str
    items: int
    evaluations: int
    seconds: float


def shape_of(stage_type: str, size: tuple[int, int]) -> str:
    return f"{stage_type}:{size[0]}x{size[1]}"


class RateBook:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._add_rate = client.register_script(_ADD_RATE)

    def add(self, samples: Iterable[RateSample]) -> None:
        """One round trip for a chunk's samples; each is added atomically, since a model's workers
        add to the same sums."""
        pipe = self.client.pipeline(transaction=False)
        for sample in samples:
            self._add_rate(
                keys=[keys.model_rates(sample.model)],
                args=[sample.shape, sample.items, sample.evaluations, repr(sample.seconds), WINDOW_ITEMS],
                client=pipe,
            )
        pipe.execute()

    def rates(self, model: str) -> dict[str, Rate]:
        """The model's rates by shape."""
        fields: dict[str, dict[str, str]] = {}
        for field, value in self.client.hgetall(keys.model_rates(model)).items():
            shape, _, measure = _text(field).rpartition("|")
            fields.setdefault(shape, {})[measure] = _text(value)
        return {
            shape: Rate(
                int(got.get("items", 0)), int(got.get("evaluations", 0)), float(got.get("seconds", 0.0))
            )
            for shape, got in fields.items()
            if int(got.get("items", 0)) > 0
        }


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
