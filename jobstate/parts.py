"""A job's parts: the files in its storage prefix that hold what Redis does not (where each lies:
jobstate/layout.py).

    items part      the items of part <part> (manifest positions part * chunk_size onwards), one Item
                    JSON a line, local paths made absolute: written at submit, read by the first stage
                    and by retries
    results part    one pipeline call's finished items: "<slot>\\t<s or f>\\t<ItemResult JSON>" a line,
                    written before the items are marked done; results.jsonl, `failures` and `retry` are
                    made from these. Its name, r<round>.s<stage>.t<retry>.d<delivery>.<tag>.tsv, says
                    which attempt wrote it (Attempt), so that among an item's rows the latest wins
    handover part   what one handed-over chunk takes to stage <stage>: each item's input, the outputs
                    and the stage records so far (HandoverItem JSON a line)

A part's name sorts in part order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobstate import layout
from jobstate.storage import Storage
from schemas.errors import StorageError
from schemas.job import Item
from schemas.messages import ItemResult, StageInput, StageRecord

_RESULTS_NAME = re.compile(r"^r(\d+)\.s(\d+)\.t(\d+)\.d(\d+)\.[A-Za-z0-9_-]+\.tsv\Z")


@dataclass(frozen=True, order=True)
class Attempt:
    """Which run of an item wrote a result: later rounds (retries) win, then later stages (an item
    only moves forward within a round), then a task's later retries and later deliveries (a worker
    that died after writing a row but before marking its items done)."""

    round: int
    stage: int
    retries: int
    delivery: int

    def file_name(self, tag: str) -> str:
        return f"r{self.round}.s{self.stage}.t{self.retries}.d{self.delivery}.{tag}.tsv"

    @classmethod
    def of_file(cls, name: str) -> Attempt | None:
        match = _RESULTS_NAME.match(name)
        return cls(*(int(group) for group in match.groups())) if match else None


class HandoverItem(BaseModel):
    """One item handed over to the next stage: a ChunkItem without the item, which the items part has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slot: int = Field(ge=0)
    input: StageInput
    outputs: dict[str, str] = Field(default_factory=dict)
    stages: list[StageRecord] = Field(default_factory=list)


@dataclass(frozen=True)
class ResultRow:
    attempt: Attempt
    failed: bool
    line: str  # the ItemResult, JSON


class JobParts:
    """The part files of one run of a job, in its storage."""

    def __init__(self, storage: Storage, run_id: str) -> None:
        self.storage = storage
        self.keys = layout.PartKeys(run_id)

    # -- items

    def items_key(self, part: int) -> str:
        return self.keys.items(part)

    def put_items(self, part: int, data: bytes) -> None:
        self.storage.put(self.items_key(part), data, "application/x-ndjson")

    def items(self, part: int) -> list[Item]:
        key = self.items_key(part)
        lines = self.storage.get(key).decode("utf-8").splitlines()
        try:
            return [Item.model_validate_json(line) for line in lines]
        except ValidationError as exc:
            raise StorageError(
                f"{self.storage.uri(key)}: not an items part: {exc.errors()[0]['msg']}"
            ) from None

    # -- results

    def results_folder(self, part: int) -> str:
        return self.keys.results(part)

    def put_results(
        self, part: int, attempt: Attempt, tag: str, rows: Sequence[tuple[int, ItemResult]]
    ) -> None:
        lines = "".join(
            f"{slot}\t{'f' if result.status == 'failed' else 's'}\t{result.model_dump_json()}\n"
            for slot, result in rows
        )
        key = self.keys.results(part, attempt.file_name(tag))
        self.storage.put(key, lines.encode("utf-8"), "text/tab-separated-values")

    def results(self, part: int) -> dict[int, list[ResultRow]]:
        """Every row written for the items of `part`, by slot."""
        rows: dict[int, list[ResultRow]] = {}
        for key in self.storage.list(self.results_folder(part)):
            attempt = Attempt.of_file(key.rsplit("/", 1)[1])
            if attempt is None:
                continue  # not ours (an editor's backup, say)
            for line in self.storage.get(key).decode("utf-8").splitlines():
                slot, status, result = line.split("\t", 2)
                rows.setdefault(int(slot), []).append(ResultRow(attempt, status == "f", result))
        return rows

    # -- handovers to the next stage

    def put_handover(self, part: int, stage_index: int, tag: str, items: Iterable[HandoverItem]) -> str:
        key = self.keys.handover(part, stage_index, tag)
        data = "".join(item.model_dump_json(exclude_none=True) + "\n" for item in items)
        self.storage.put(key, data.encode("utf-8"), "application/x-ndjson")
        return key

    def handover(self, key: str) -> list[HandoverItem]:
        if not self.keys.is_handover(key):
            raise StorageError(f"refusing handover part {key!r}: not one of this run's")
        lines = self.storage.get(key).decode("utf-8").splitlines()
        return [HandoverItem.model_validate_json(line) for line in lines]
