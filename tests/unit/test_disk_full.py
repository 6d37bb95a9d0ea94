"""A full disk under a local output, with the CPU `resize` stage and a real Redis: the kernel's own
ENOSPC, from /dev/full, at the one place where storage writes a file. Items that fail on it are
recorded with "No space left on device" and the path that could not be written, even though their
failure could not be written either; once space is free, the job's end tells them so."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from jobs.embedded import EmbeddedRedis
from jobs.redrive import failures
from jobstate import layout, storage
from kits.helpers import write_image
from schemas.job import Item
from tests.chunkkit import harness
from workers.job_end import end_job


def test_items_that_fail_on_a_full_disk_are_recorded_with_the_reason_and_the_path(
    redis_server: EmbeddedRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    items = [
        Item(id=f"i{n}", image=str(write_image(tmp_path / "in" / f"{n}.png", (16, 16)))) for n in range(3)
    ]
    job = harness(client, items, tmp_path / "out")
    job.write_ends = False
    with monkeypatch.context() as patched:
        # Every file storage writes goes to /dev/full, whose writes fail as a full file system's do.
        patched.setattr(storage._Replacing, "__enter__", lambda self: Path("/dev/full"))
        with pytest.raises(OSError, match="No space left on device"):
            Path("/dev/full").write_bytes(b"x")  # what the kernel says, as the storage will see it
        for chunk in job.chunks:
            job.run(chunk, may_retry=False)  # its last delivery: the task's retries are spent
    assert not list((job.job_dir / layout.PARTS).rglob("results/*")), "no failure could be written"
    [end] = job.ends
    assert end_job(end, job.end_ctx, token="after-freeing-space") == "finished"

    results = job.results()
    assert [result.status for result in results.values()] == ["failed"] * 3
    for result in results.values():
        assert result.error is not None and result.error.type == "StorageError"
        message = result.error.message
        # The chunk's first write that failed: the rest of the chunk fails with it.
        assert message.startswith(f"cannot write {job.job_dir / 'i0' / 's0-resize.png'}: ")
        assert "No space left on device" in message
        assert f"writing the failure failed too: cannot write {job.job_dir / layout.PARTS}" in message
        assert "recorded result is missing" not in message
    assert {failure.error.message for failure in failures(job.store, job.meta.job_id) if failure.error} == {
        results[item_id].error.message  # type: ignore[union-attr]
        for item_id in results
    }
