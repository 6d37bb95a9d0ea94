"""Item transitions against a real Redis server: counts always add up, finished items stay finished."""

from __future__ import annotations

import json

import redis

from jobs.embedded import EmbeddedRedis
from jobs.status import read_status
from schemas import keys
from schemas.job import ResolvedParams
from schemas.messages import ItemResult
from schemas.progress import JobState
from workers.progress import JobProgress

PARAMS = ResolvedParams(strength=0.5, guidance_scale=7.5, steps=10, size=(64, 64))


def register(client: redis.Redis, job_id: str, ids: list[str]) -> None:
    client.hset(keys.job_meta(job_id), mapping={"name": "j", "output": "/o", "total": len(ids)})
    client.hset(
        keys.job_counts(job_id), mapping={"pending": len(ids), "running": 0, "succeeded": 0, "failed": 0}
    )
    client.hset(keys.job_items(job_id), mapping=dict.fromkeys(ids, "pending"))
    client.rpush(keys.job_order(job_id), *ids)


def result(item_id: str, status: str = "succeeded") -> ItemResult:
    return ItemResult(id=item_id, status=status, seed=0, model="m", prompt="p", params=PARAMS)  # type: ignore[arg-type]


def test_counts_follow_transitions_and_the_last_item_finishes_the_job(redis_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    register(client, "j1", ["c", "a", "b"])
    progress = JobProgress(client, "j1")
    assert read_status(client, "j1").state == JobState.PENDING

    assert progress.start(["a", "b"], 0) == ["a", "b"]
    status = read_status(client, "j1")
    assert (status.state, status.pending, status.running) == (JobState.RUNNING, 1, 2)

    assert progress.finish([result("a")]) == [True]
    assert progress.finish([result("b", "failed")]) == [True]
    assert not progress.unfinalized()  # c is still open
    # A second delivery of a finished item neither restarts nor re-counts it.
    assert progress.start(["a", "c"], 0) == ["c"]
    assert progress.finish([result("a", "failed")]) == [False]
    assert progress.finish([result("c")]) == [True]
    assert progress.unfinalized()

    status = read_status(client, "j1")
    assert (status.succeeded, status.failed, status.pending, status.running) == (2, 1, 0, 0)
    assert status.state == JobState.RUNNING  # finished only once results.jsonl is written

    assert [json.loads(line)["id"] for line in progress.result_lines()] == ["c", "a", "b"]
    assert progress.mark_finished("results-uri", "report-uri")
    status = read_status(client, "j1")
    assert status.state == JobState.FAILED and status.finished_at is not None
    assert not progress.unfinalized()


def test_a_reopened_job_is_not_marked_finished(redis_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    register(client, "j4", ["a"])
    progress = JobProgress(client, "j4")
    assert progress.finish([result("a", "failed")]) == [True]
    client.hset(keys.job_items("j4"), "a", "pending")  # what `imgjobs retry` does, by its own script
    client.hset(keys.job_counts("j4"), mapping={"failed": 0, "pending": 1})
    assert not progress.mark_finished("results-uri", "report-uri")
    assert read_status(client, "j4").finished_at is None


def test_what_a_stage_still_owes(redis_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    register(client, "j5", ["a", "b", "c"])
    progress = JobProgress(client, "j5")
    progress.start(["a", "b", "c"], 0)
    progress.handed_over(["b"], 0)
    assert progress.finish([result("c")]) == [True]
    assert progress.open_at(["a", "b", "c"], 0) == ["a"]
    assert progress.open_at(["a", "b", "c"], 1) == ["a", "b"]


def test_items_handed_to_the_next_stage_are_not_redone(redis_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    register(client, "j3", ["a", "b"])
    progress = JobProgress(client, "j3")
    assert progress.start(["a", "b"], 0) == ["a", "b"]
    progress.handed_over(["a"], 0)
    assert progress.start(["a", "b"], 0) == ["b"]  # stage 0 delivered again: only b is left to do
    assert progress.start(["a"], 1) == ["a"]  # stage 1 picks a up
    assert read_status(client, "j3").running == 2


def test_unknown_items_are_ignored(redis_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    register(client, "j2", ["a"])
    progress = JobProgress(client, "j2")
    assert progress.start(["zzz"], 0) == []
    assert progress.finish([result("zzz")]) == [False]
    assert read_status(client, "j2").pending == 1
