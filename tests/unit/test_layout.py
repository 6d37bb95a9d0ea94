"""A job's folder (jobstate/layout.py) and its chunks' ids (schemas.messages.ChunkId): the names
the README documents, none an item can take, handover parts read only from the job's own run, and
chunk ids that read back as the chunks they name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from jobs import redrive
from jobs.embedded import EmbeddedRedis
from jobstate import layout
from jobstate.meta import JobMeta
from jobstate.parts import HandoverItem, JobParts
from jobstate.storage import LocalStorage
from kits.helpers import write_image
from schemas.errors import StorageError
from schemas.job import ITEM_ID_PATTERN, RESERVED_ITEM_IDS, Item
from schemas.messages import Chunk, ChunkId, StageInput
from tests.chunkkit import harness, resize_recipe


def test_the_jobs_own_names_are_the_documented_ones_and_no_item_takes_one() -> None:
    names = (layout.RESULTS, layout.REPORT, layout.DATASET, layout.SHARDS, layout.REPORT_PAGES, layout.PARTS)
    assert names == ("results.jsonl", "report.html", "dataset", "shards", "_report", "_imgjobs")
    assert {layout.RESULTS, layout.REPORT, layout.DATASET} == RESERVED_ITEM_IDS
    assert not ITEM_ID_PATTERN.match(layout.REPORT_PAGES) and not ITEM_ID_PATTERN.match(layout.PARTS)
    # An item may be called `shards`: its outputs never take a shard's file name.
    plan = resize_recipe()[0]
    shard = layout.ShardKeys(layout.shard_name(0, 1), "webdataset")
    assert layout.output_key("shards", plan, "image") == "shards/s0-resize.png"
    assert layout.output_key("shards", plan, "image") not in (shard.shard, shard.index, shard.stats)
    assert layout.items_page(1) == layout.REPORT and layout.items_page(2) == "_report/items-2.html"


def test_a_handover_part_is_read_only_from_its_own_runs_folder(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "job")
    ours, theirs = JobParts(storage, "run-a"), JobParts(storage, "run-b")
    handed = [HandoverItem(slot=1, input=StageInput(kind="image", uri="x/s0-resize.png"))]
    key = ours.put_handover(3, 1, "0a1b", handed)
    assert key == "_imgjobs/run-a/carry/p0000003/s1.0a1b.jsonl"  # where chunks already queued name it
    assert ours.handover(key) == handed
    for elsewhere in (key.replace("run-a", "run-b"), layout.RESULTS, "_imgjobs/run-a/items/p0000003.jsonl"):
        with pytest.raises(StorageError, match="not one of this run's"):
            ours.handover(elsewhere)
    with pytest.raises(StorageError, match="not one of this run's"):
        theirs.handover(key)


def test_a_chunk_queued_with_the_handover_parts_json_name_still_runs() -> None:
    queued = {"job_id": "j", "run_id": "r", "chunk_id": "j:s0:c0/s1.ab", "part": 0, "stage_index": 1}
    chunk = Chunk.model_validate({**queued, "carry": "_imgjobs/r/carry/p0000000/s1.ab.jsonl"})
    assert chunk.handover_part == "_imgjobs/r/carry/p0000000/s1.ab.jsonl"
    (args,) = chunk.task_args()
    assert json.loads(json.dumps(args)) == {**queued, "carry": chunk.handover_part}


@pytest.mark.parametrize(
    "text", ["job-0a:s0:c7", "job-0a:r2:s0:c12", "job-0a:s0:c0/s1.0a1b2c3d4e5f/s2.ffee00112233"]
)
def test_a_chunk_id_reads_back_as_minted(text: str) -> None:
    assert str(ChunkId.parse(text)) == text


@pytest.mark.parametrize("text", ["job", "job:s1:c0", "job:s0:cx", "job:s0:c1/s1", "job:r:s0:c1"])
def test_what_is_not_a_chunk_id_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a chunk id"):
        ChunkId.parse(text)


def test_every_chunk_id_names_its_chunks_part_stage_and_retry_round(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    """The ids that submit, a handover and a retry mint read back as the chunk they name: its part,
    its stage, and the retry round that sent it."""
    image = write_image(tmp_path / "in" / "a.png", size=(24, 24))
    late = tmp_path / "in" / "late.png"  # missing until the retry
    items = [Item(id="a", image=str(image)), Item(id="b", image=str(image)), Item(id="late", image=str(late))]
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    job = harness(client, items, tmp_path / "out", recipe=resize_recipe(2), chunk_size=2)

    def run_reading_ids(chunks: list[Chunk], retry_round: int) -> list[Chunk]:
        """Run `chunks`, checking each id; returns the chunks they handed over."""
        for chunk in chunks:
            named = ChunkId.parse(chunk.chunk_id)
            assert (named.job_id, named.part, named.stage_index) == (
                chunk.job_id,
                chunk.part,
                chunk.stage_index,
            )
            assert named.retry_round == retry_round, chunk.chunk_id
            job.run(chunk)
        handed, job.sent[:] = list(job.sent), []
        return handed

    handed = run_reading_ids(job.chunks, 0)
    assert [chunk.part for chunk in handed] == [0]  # `late` failed at stage 0
    assert run_reading_ids(handed, 0) == []
    write_image(late, size=(24, 24))
    retried: list[Chunk] = []

    def send(_meta: JobMeta, chunks: list[Chunk]) -> None:
        retried.extend(chunks)

    assert redrive.retry(job.store, job.meta.job_id, None, send, job.ends.append) == 1
    handed = run_reading_ids(retried, 1)
    assert [(chunk.part, chunk.stage_index) for chunk in handed] == [(1, 1)]
    assert run_reading_ids(handed, 1) == []
    assert job.store.status(job.meta.job_id).succeeded == 3
