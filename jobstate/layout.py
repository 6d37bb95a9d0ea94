"""A job's folder: every key imgjobs writes under {output}/{job_id}/, in one place (as jobstate/keys.py
names every Redis key). Keys are relative to the job's storage (jobstate/storage.py, open_storage).

    {item_id}/s<N>-<type>.<png|jpeg|webp>      a stage's image output, where saved or handed over
    {item_id}/s<N>-<type>.safetensors          a stage's latent output, likewise
    dataset/{item_id}.<format>                 with `dataset: true`: the last stage's image, and
    dataset/metadata.jsonl                     a row per succeeded item (the imagefolder layout)
    shards/<shard>.tar                         an output shard (webdataset): a fixed range of items,
    shards/<shard>.parquet                     its index; or, for parquet, the shard itself
    shards/<shard>_stats.json                  its counts, written last (workers/shard_sink.py)
    results.jsonl                              one line per item, in manifest order (the job's end)
    report.html                                the report's first page, and its other pages:
    _report/items-<N>.html, _report/failed-<N>.html, _report/worst-<score>.html,
    _report/duplicates.html
    _imgjobs/<run id>/items/p<part>.jsonl      the job's parts: what Redis does not hold of it
    _imgjobs/<run id>/results/p<part>/<attempt>.tsv
    _imgjobs/<run id>/carry/p<part>/s<stage>.<tag>.jsonl
                                               (jobstate/parts.py says what each holds)

An item's folder never meets one of the job's own names: item ids start with a letter or a digit
(never `_`), `results.jsonl`, `report.html` and `dataset` are reserved (schemas.job.RESERVED_ITEM_IDS),
and an item called `shards` holds only `s<N>-<type>.*` files, which no shard is named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from schemas.messages import StagePlan

RESULTS = "results.jsonl"
REPORT = "report.html"
REPORT_PAGES = "_report"
DATASET = "dataset"
DATASET_METADATA = f"{DATASET}/metadata.jsonl"
SHARDS = "shards"
PARTS = "_imgjobs"
# The handover parts' folder keeps the name it has in storage and in chunks already queued, so that
# workers of two releases read each other's (docs/operations.md, "Message format").
HANDOVER_PARTS = "carry"
LATENT_SUFFIX = ".safetensors"
DUPLICATES_PAGE = f"{REPORT_PAGES}/duplicates.html"


def job_root(output: str, job_id: str) -> str:
    """{output}/{job_id}: the folder (or S3 prefix) every key below is relative to."""
    return f"{output.rstrip('/')}/{job_id}"


# -- outputs


def output_key(item_id: str, plan: StagePlan, kind: Literal["image", "latent"]) -> str:
    extension = plan.image_format if kind == "image" else LATENT_SUFFIX.removeprefix(".")
    return f"{item_id}/{plan.name}.{extension}"


def is_latent(uri: str) -> bool:
    return uri.endswith(LATENT_SUFFIX)


def dataset_file_name(item_id: str, image_format: str) -> str:
    """An image's name in the dataset folder, as its metadata.jsonl row's `file_name` says it."""
    return f"{item_id}.{image_format}"


def dataset_image(item_id: str, image_format: str) -> str:
    return f"{DATASET}/{dataset_file_name(item_id, image_format)}"


def shard_name(part: int, parts: int) -> str:
    """00000, 00001, ...: five digits at least, as img2dataset names its shards, more where needed."""
    return f"{part:0{max(5, len(str(max(parts - 1, 0))))}d}"


@dataclass(frozen=True)
class ShardKeys:
    """Where one output shard's files go."""

    name: str
    output_format: str

    @property
    def shard(self) -> str:
        suffix = "tar" if self.output_format == "webdataset" else "parquet"
        return f"{SHARDS}/{self.name}.{suffix}"

    @property
    def index(self) -> str:
        return f"{SHARDS}/{self.name}.parquet"

    @property
    def stats(self) -> str:
        return f"{SHARDS}/{self.name}_stats.json"


# -- the report's pages


def items_page(page: int) -> str:
    """The contact sheet's page `page` (from 1): report.html itself, then pages of their own."""
    return REPORT if page == 1 else f"{REPORT_PAGES}/items-{page}.html"


def failed_page(page: int) -> str:
    return f"{REPORT_PAGES}/failed-{page}.html"


def worst_page(score_field: str) -> str:
    """The page of the lowest-scoring items by a score (a QualityRecord field, e.g. clip_score)."""
    return f"{REPORT_PAGES}/worst-{score_field.replace('_', '-')}.html"


# -- the job's parts (jobstate/parts.py)


@dataclass(frozen=True)
class PartKeys:
    """Where one run's parts go: a run of the job id has its own, apart from an earlier run's."""

    run_id: str

    @property
    def folder(self) -> str:
        return f"{PARTS}/{self.run_id}"

    def items(self, part: int) -> str:
        return f"{self.folder}/items/p{part:07d}.jsonl"

    def results(self, part: int, file_name: str = "") -> str:
        """The folder of a part's results, or the results file `file_name` in it."""
        folder = f"{self.folder}/results/p{part:07d}"
        return f"{folder}/{file_name}" if file_name else folder

    def handover(self, part: int, stage_index: int, tag: str) -> str:
        return f"{self.folder}/{HANDOVER_PARTS}/p{part:07d}/s{stage_index}.{tag}.jsonl"

    def is_handover(self, key: str) -> bool:
        """Whether `key` names a handover part of this run (a chunk's message names its own)."""
        return key.startswith(f"{self.folder}/{HANDOVER_PARTS}/")
