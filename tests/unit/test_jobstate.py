"""The job-state owner against a real Redis server: counts always add up, finished items stay
finished, the job's end is claimed once, cancel accounts for everything at once, and what Redis
keeps per item is a few bits."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from jobs.embedded import EmbeddedRedis
from jobstate import keys
from jobstate.bits import mask
from jobstate.parts import Attempt, JobParts
from jobstate.results import part_results
from jobstate.storage import LocalStorage
from jobstate.store import JobStore
from kits.helpers import write_image
from schemas.errors import UnknownJobError
from schemas.job import Item
from schemas.messages import ItemResult
from schemas.progress import JobState
from tests.chunkkit import PARAMS, harness, resize_recipe


def items(tmp_path: Path, count: int) -> list[Item]:
    image = str(write_image(tmp_path / "in" / "a.png", size=(24, 24)))
    return [Item(id=f"i{n}", image=image) for n in range(count)]


def client_of(server: EmbeddedRedis) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=True)


def test_counts_follow_the_chunk_and_finished_items_stay_finished(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    job = harness(client_of(redis_server), items(tmp_path, 5), tmp_path / "out", chunk_size=3)
    store, (first, second) = job.store, job.chunks
    assert store.status("job").state == JobState.PENDING

    started = store.start_chunk(job.meta, first, 0, b"")
    assert (started.verdict, started.delivery, started.slots) == ("run", 1, (0, 1, 2))
    status = store.status("job")
    assert (status.state, status.pending, status.running) == (JobState.RUNNING, 2, 3)

    assert store.finish_items(first, "s0-resize", [(0, False), (1, True)]) == ("open", [True, True])
    assert store.finish_items(first, "s0-resize", [(0, True)]) == ("open", [False])  # finished already
    status = store.status("job")
    assert (status.succeeded, status.failed, status.running, status.pending) == (1, 1, 1, 2)
    # Delivered again: only what is still open runs; the delivery is counted.
    again = store.start_chunk(job.meta, first, 0, b"")
    assert (again.delivery, again.slots) == (2, (2,))
    assert store.end_chunk(first, 0) is None  # item 2 and the second part are open: no end yet
    assert store.status("job").running == 0

    store.start_chunk(job.meta, second, 0, b"")
    store.finish_items(second, "s0-resize", [(3, False), (4, False)])
    store.finish_items(first, "s0-resize", [(2, False)])
    assert store.end_chunk(second, 0) == 0  # the last work: round 0's end is due
    status = store.status("job")
    assert (status.state, status.succeeded, status.failed, status.pending) == (JobState.RUNNING, 4, 1, 0)
    assert status.stages[0].done == 4

    assert store.claim_end(job.meta, 0, "end-a") == "run"
    assert store.claim_end(job.meta, 0, "end-b") == "claimed"  # a second end task sent for it
    assert store.claim_end(job.meta, 0, "end-a") == "run"  # the first, delivered again
    assert not store.finish_job(job.meta, 0, "end-b", "results", "report")
    assert store.finish_job(job.meta, 0, "end-a", "results", "report")
    status = store.status("job")
    assert (status.state, status.finished) == (JobState.FAILED, True)
    assert store.claim_end(job.meta, 0, "end-a") == "finished"


def test_items_handed_past_a_stage_are_not_redone_by_it(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    job = harness(client_of(redis_server), items(tmp_path, 2), tmp_path / "out", recipe=resize_recipe(2))
    store, (chunk,) = job.store, job.chunks
    store.start_chunk(job.meta, chunk, 0, b"")
    assert store.hand_over(chunk, "s0-resize", [0]) == 1
    assert store.start_chunk(job.meta, chunk, 0, b"").slots == (1,)  # stage 0 again: only item 1 is left
    next_chunk = chunk.model_copy(
        update={"chunk_id": "job:s0:c0/s1.x", "stage_index": 1, "slots": mask([0], 2)}
    )
    assert store.start_chunk(job.meta, next_chunk, 0, b"\x80").slots == (0,)  # stage 1 takes item 0
    assert store.status("job").stages[0].done == 1


def test_a_chunk_of_another_run_or_of_a_pruned_job_changes_nothing(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    client = client_of(redis_server)
    job = harness(client, items(tmp_path, 2), tmp_path / "out")
    (chunk,) = job.chunks
    stranger = chunk.model_copy(update={"run_id": "another-run"})
    assert job.store.start_chunk(job.meta, stranger, 0, b"").verdict == "unknown"
    assert job.store.finish_items(stranger, "s0-resize", [(0, False)]) == ("unknown", [False])
    assert job.store.status("job").done == 0

    job.store.start_chunk(job.meta, chunk, 0, b"")
    job.store.finish_items(chunk, "s0-resize", [(0, False), (1, False)])
    job.store.end_chunk(chunk, 0)
    assert job.store.claim_end(job.meta, 0, "t") == "run"
    job.store.finish_job(job.meta, 0, "t", "r", "p")
    assert [pruned.job_id for pruned in job.store.prune(time.time() + 1)] == ["job"]
    assert job.store.start_chunk(job.meta, chunk, 0, b"").verdict == "unknown"
    job.store.finish_items(chunk, "s0-resize", [(0, False)])
    job.store.hand_over(chunk, "s0-resize", [1])
    job.store.end_chunk(chunk, 0)
    assert list(client.scan_iter(match=f"{keys.PREFIX}:job:job:*")) == []  # no key came back
    with pytest.raises(UnknownJobError):
        job.store.status("job")


def test_cancel_accounts_for_every_item_at_once(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    job = harness(client_of(redis_server), items(tmp_path, 10), tmp_path / "out", chunk_size=3)
    store, (first, second, third, fourth) = job.store, job.chunks
    store.start_chunk(job.meta, first, 0, b"")
    store.finish_items(first, "s0-resize", [(0, False)])

    assert store.cancel("job") == ("cancelled", None)  # a chunk runs: the end waits for it
    status = store.status("job")
    assert (status.state, status.pending, status.running, status.cancelled) == (JobState.CANCELLED, 0, 2, 7)
    assert (status.succeeded, status.failed) == (1, 7)
    # The running chunk learns at its next call; chunks sent before the cancel are dropped at start.
    assert store.standing(first) == "stopped"
    assert store.finish_items(first, "s0-resize", [(1, False)])[0] == "stopped"
    assert store.start_chunk(job.meta, second, 0, b"").verdict == "dropped"
    assert store.end_chunk(first, 0) == 0  # the last running chunk stopped: the end is due now
    assert store.start_chunk(job.meta, third, 0, b"").end_round == 0
    assert store.start_chunk(job.meta, fourth, 0, b"").end_round is None  # one end sent per round
    status = store.status("job")
    assert (status.running, status.cancelled, status.succeeded) == (0, 8, 2)
    assert store.cancel("job")[0] == "already"

    assert store.claim_end(job.meta, 0, "t") == "run"
    store.finish_job(job.meta, 0, "t", "r", "p")
    assert store.cancel("job") == ("finished", None)


def test_a_retry_reopens_items_and_its_undo_puts_them_back(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    job = harness(client_of(redis_server), items(tmp_path, 3), tmp_path / "out", recipe=resize_recipe(2))
    store, (chunk,) = job.store, job.chunks
    meta = job.meta
    store.start_chunk(meta, chunk, 0, b"")
    store.hand_over(chunk, "s0-resize", [0, 1])
    store.finish_items(chunk, "s0-resize", [(2, True)])  # failed at stage 0
    store.finish_items(chunk, "s1-resize", [(0, True), (1, False)])  # 0 failed at stage 1
    store.end_chunk(chunk, 0)
    store.claim_end(meta, 0, "t")
    store.finish_job(meta, 0, "t", "r", "p")
    before = store.status("job")
    assert (before.succeeded, before.failed, [s.done for s in before.stages]) == (1, 2, [2, 1])

    round_, passed = store.reopen_items(meta, [0, 1, 2], reopen=True, cancelled=False)
    assert (round_, passed) == (1, [0b1, -1, 0])  # 1 succeeded: left as it is
    status = store.status("job")
    assert (status.state, status.pending, status.succeeded, [s.done for s in status.stages]) == (
        JobState.RUNNING,
        2,
        1,
        [1, 1],
    )
    assert store.claim_end(meta, 0, "t") == "stale"

    due = store.put_back(meta, [(0, 0b1, "f"), (2, 0, "f")], recancel=False)
    assert due == 1  # every item finished again: the end of round 1 is to be written
    status = store.status("job")
    assert (status.succeeded, status.failed, [s.done for s in status.stages]) == (1, 2, [2, 1])


def test_redis_keeps_a_few_bits_per_item_over_a_jobs_life(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    """Sized by storage, not Redis: 20,000 items, every one finished, take under 16 bytes each."""
    client = client_of(redis_server)
    count = 20_000
    job = harness(client, items(tmp_path, count), tmp_path / "out", recipe=resize_recipe(2), chunk_size=1024)
    store = JobStore(client)
    for chunk in job.chunks:
        start = store.start_chunk(job.meta, chunk, 0, b"")
        first = job.meta.positions(chunk.part).start
        store.hand_over(chunk, "s0-resize", [first + slot for slot in start.slots])
        store.finish_items(chunk, "s1-resize", [(first + slot, slot % 7 == 0) for slot in start.slots])
        store.end_chunk(chunk, 0)
    assert store.status("job").done == count
    used = sum(int(client.memory_usage(key) or 0) for key in client.scan_iter(match=f"{keys.PREFIX}:*"))
    assert used / count < 16, used / count


def test_an_item_counts_only_the_rows_of_its_recorded_status(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    """A row written by an attempt that never counted (a dead worker's) is passed over: with no row of
    the recorded status, the item's line says its result is missing, as a failure."""
    job = harness(client_of(redis_server), items(tmp_path, 2), tmp_path / "out")
    (chunk,) = job.chunks
    store = job.store
    store.start_chunk(job.meta, chunk, 0, b"")
    parts = JobParts(LocalStorage(tmp_path / "out" / "job"), job.meta.run_id)
    row = ItemResult(id="i0", status="succeeded", seed=0, model="cpu", prompt="", params=PARAMS)
    parts.put_results(0, Attempt(0, 0, 0, 1), "dead", [(0, row)])  # written, never marked done
    parts.put_results(0, Attempt(0, 0, 0, 2), "alive", [(1, row.model_copy(update={"id": "i1"}))])
    store.finish_items(chunk, "s0-resize", [(0, True), (1, False)])  # i0 failed with no row of its own
    lines = list(part_results(job.meta, parts, store.bits(job.meta), 0))
    results = [ItemResult.model_validate_json(line.line) for line in lines]
    assert [(r.id, r.status) for r in results] == [("i0", "failed"), ("i1", "succeeded")]
    assert results[0].error is not None and "missing" in results[0].error.message
