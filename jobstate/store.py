"""The one owner of a job's state in Redis: every read and write of a job's keys (jobstate/keys.py)
goes through JobStore, and every script it runs lives beside it in jobstate/lua/.

What Redis holds per job is what is in flight: the typed meta (JobMeta), counts, one bit per item in
a few bitmaps, and a field per chunk that is running. Items, results and handovers live in the job's
storage prefix (jobstate/parts.py).

A job's life, and who calls what (jobstate/STATES.md has its states, the call and script that moves
it from one to the next, and the meta fields each writes, `end_claim` and `end_sent` among them):

    producer   create -> record_sent ... -> record_sent(enqueued=True)
    workers    start_chunk -> (standing, finish_items, hand_over)* -> end_chunk; around writing an
               output shard: take_shard -> keep_shard* -> drop_shard
    job's end  claim_end -> (note_end_retry)* -> finish_job
    commands   status, cancel, reopen_items / put_back (retry), prune, job_ids
    embedded   stop (its run stopped) -> resume (its workers run it again)
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import redis

from jobstate import keys
from jobstate.meta import END_CLAIM, JobMeta
from jobstate.results import JobBits
from schemas.errors import UnknownJobError
from schemas.messages import Chunk, JobEnd
from schemas.progress import JobState, JobStatus, StageProgress

SCAN_BATCH = 1000
# Items moved per script call by a retry or its undo: a call blocks Redis while it runs.
MOVE_BATCH = 10_000
MAX_REASON = 2000  # characters of an error kept in the job's meta


def _script(name: str) -> str:
    folder = resources.files("jobstate") / "lua"
    common = (folder / "common.lua").read_text(encoding="utf-8")
    return common + "\n" + (folder / f"{name}.lua").read_text(encoding="utf-8")


def stage_field(stage_name: str) -> str:
    """The counts field of items that came through a stage (handed over, or succeeded in it)."""
    return f"stage:{stage_name}"


def delivery_field(chunk: Chunk, retries: int) -> str:
    # Counted per task retry, so that only redeliveries count: a chunk whose worker dies comes back.
    return f"{chunk.chunk_id}#{retries}"


@dataclass(frozen=True)
class ChunkStart:
    """What start_chunk decided: run `slots` (of the chunk's part), or drop the chunk."""

    verdict: Literal["run", "dropped", "unknown"]
    delivery: int = 0
    slots: tuple[int, ...] = ()
    end_round: int | None = None  # dropped: the round whose end is now due, if any


@dataclass(frozen=True)
class PrunedJob:
    job_id: str
    name: str
    finished_at: float


Standing = Literal["open", "stopped", "unknown"]
CancelVerdict = Literal["cancelled", "already", "finished"]


class JobStore:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._binary: redis.Redis | None = None
        self._scripts = {
            name: client.register_script(_script(name))
            for name in (
                "create",
                "start_chunk",
                "finish_items",
                "hand_over",
                "end_chunk",
                "standing",
                "cancel",
                "claim_end",
                "finish_job",
                "reopen_items",
                "put_back",
                "prune_job",
                "mark_sent",
                "shard_lease",
                "note_unrecorded",
                "stop",
                "resume",
                "note_end_retry",
            )
        }

    def _run(self, name: str, keys_: Sequence[str], args: Sequence[Any]) -> Any:
        return self._scripts[name](keys=list(keys_), args=list(args))

    # -- a job's definition ------------------------------------------------------------------------

    def create(self, meta: JobMeta) -> tuple[bool, JobMeta]:
        """Create the job unless one of that id exists; returns (created, the job as stored)."""
        fields = [part for pair in meta.to_hash().items() for part in pair]
        created = bool(self._run("create", [keys.job_meta(meta.job_id), keys.JOBS], [meta.job_id, *fields]))
        return created, (meta if created else self.meta(meta.job_id))

    def meta(self, job_id: str) -> JobMeta:
        found = self.find(job_id)
        if found is None:
            raise UnknownJobError(f"no job {job_id!r} on this broker")
        return found

    def find(self, job_id: str) -> JobMeta | None:
        raw = self.client.hgetall(keys.job_meta(job_id))
        return (
            JobMeta.from_hash(job_id, {_text(key): _text(value) for key, value in raw.items()})
            if raw
            else None
        )

    def record_sent(self, meta: JobMeta, parts_sent: int, *, enqueued: bool = False) -> None:
        """First-stage chunks up to `parts_sent` are queued (with `enqueued`, all of them): a submit
        that resumes starts there. Raises UnknownJobError once the job is no longer this run."""
        done = self._run(
            "mark_sent", [keys.job_meta(meta.job_id)], [meta.run_id, parts_sent, int(enqueued), time.time()]
        )
        if not done:
            raise UnknownJobError(f"job {meta.job_id!r} is no longer on this broker (pruned meanwhile)")

    def job_ids(self) -> Iterator[str]:
        # SSCAN returns every member present from start to end, whatever is removed meanwhile.
        for job_id in self.client.sscan_iter(keys.JOBS, count=SCAN_BATCH):
            yield _text(job_id)

    # -- what a chunk does -------------------------------------------------------------------------

    def start_chunk(self, meta: JobMeta, chunk: Chunk, retries: int, slots_mask: bytes) -> ChunkStart:
        positions = meta.positions(chunk.part)
        reply = self._run(
            "start_chunk",
            [
                keys.job_meta(meta.job_id),
                keys.job_counts(meta.job_id),
                keys.job_inflight(meta.job_id),
                keys.job_deliveries(meta.job_id),
                keys.job_done(meta.job_id),
                keys.job_handed(meta.job_id, chunk.stage_index),
            ],
            [
                chunk.chunk_id,
                delivery_field(chunk, retries),
                chunk.run_id,
                chunk.epoch,
                time.time(),
                positions.start,
                len(positions),
                slots_mask,
            ],
        )
        verdict = _text(reply[0])
        if verdict == "unknown":
            return ChunkStart("unknown")
        if verdict == "dropped":
            due = int(reply[1])
            return ChunkStart("dropped", end_round=due - 1 if due else None)
        return ChunkStart("run", delivery=int(reply[1]), slots=tuple(int(slot) for slot in reply[2:]))

    def standing(self, chunk: Chunk) -> Standing:
        """Whether a running chunk should go on: 'stopped' once its job is cancelled."""
        reply = self._run("standing", [keys.job_meta(chunk.job_id)], [chunk.run_id, chunk.epoch])
        return _text(reply)  # type: ignore[return-value]

    def finish_items(
        self, chunk: Chunk, stage_name: str, outcomes: Sequence[tuple[int, bool]]
    ) -> tuple[Standing, list[bool]]:
        """Mark items (position, failed) done, after their results are in a results part; returns the
        job's standing and, per item, whether this call finished it (False: it was finished before)."""
        if not outcomes:
            return self.standing(chunk), []
        job_id = chunk.job_id
        reply = self._run(
            "finish_items",
            [
                keys.job_meta(job_id),
                keys.job_counts(job_id),
                keys.job_inflight(job_id),
                keys.job_done(job_id),
                keys.job_failed(job_id),
            ],
            [
                chunk.run_id,
                chunk.epoch,
                chunk.chunk_id,
                stage_field(stage_name),
                time.time(),
                *(part for position, failed in outcomes for part in (position, "f" if failed else "s")),
            ],
        )
        standing = _text(reply[0])
        if standing == "unknown":
            return "unknown", [False] * len(outcomes)
        return standing, [bool(moved) for moved in reply[1:]]  # type: ignore[return-value]

    def note_unrecorded(self, chunk: Chunk, reason: str) -> None:
        """Items of the chunk are about to be marked failed with no results rows, which could not be
        written: `reason` says why, for the job's end to tell in their place (JobMeta.unrecorded)."""
        self._run("note_unrecorded", [keys.job_meta(chunk.job_id)], [chunk.run_id, reason[:MAX_REASON]])

    def hand_over(self, chunk: Chunk, stage_name: str, positions: Sequence[int]) -> int:
        """Mark items handed past the chunk's stage, after the next stage's chunk is queued."""
        if not positions:
            return 0
        job_id = chunk.job_id
        return int(
            self._run(
                "hand_over",
                [
                    keys.job_meta(job_id),
                    keys.job_counts(job_id),
                    keys.job_inflight(job_id),
                    keys.job_handed(job_id, chunk.stage_index),
                ],
                [chunk.run_id, chunk.chunk_id, stage_field(stage_name), *positions],
            )
        )

    def end_chunk(self, chunk: Chunk, retries: int) -> int | None:
        """The chunk's run ended; returns the round whose end is now due, if this was the last work."""
        job_id = chunk.job_id
        due = int(
            self._run(
                "end_chunk",
                [
                    keys.job_meta(job_id),
                    keys.job_counts(job_id),
                    keys.job_inflight(job_id),
                    keys.job_deliveries(job_id),
                ],
                [chunk.chunk_id, delivery_field(chunk, retries), chunk.run_id],
            )
        )
        return due - 1 if due else None

    def stop(self, job_id: str) -> None:
        """The job's run stopped: no chunk of it runs, deliveries counted so far do not count, and a job
        not finished is `stopped` until `resume`. For an embedded run's broker, which starts with no
        worker of it alive: its run's stop (not a worker's death) left chunks unacknowledged."""
        keys_ = [keys.job_meta(job_id), keys.job_inflight(job_id), keys.job_deliveries(job_id)]
        self._run("stop", keys_, [time.time()])

    def resume(self, job_id: str) -> None:
        """Workers run the stopped job again; the time it was stopped is left out of its running time."""
        self._run("resume", [keys.job_meta(job_id)], [time.time()])

    # -- output shards -----------------------------------------------------------------------------

    def take_shard(self, job_id: str, part: int, token: str, ttl_s: float) -> bool:
        """Take the lease on writing output shard `part`: True when it was free (or expired). Writers
        of one shard read the shard before and publish it after, so they take turns."""
        return bool(self.client.set(keys.job_shard_lease(job_id, part), token, nx=True, px=int(ttl_s * 1000)))

    def keep_shard(self, job_id: str, part: int, token: str, ttl_s: float) -> bool:
        """Renew the lease for another ttl; False when it is no longer `token`'s (it expired)."""
        lease = keys.job_shard_lease(job_id, part)
        return bool(self._run("shard_lease", [lease], [token, "keep", int(ttl_s * 1000)]))

    def drop_shard(self, job_id: str, part: int, token: str) -> bool:
        """Give the lease back; False when it was no longer `token`'s."""
        return bool(self._run("shard_lease", [keys.job_shard_lease(job_id, part)], [token, "drop", 0]))

    # -- the job's end -----------------------------------------------------------------------------

    def claim_end(self, meta: JobMeta, round_: int, token: str) -> str:
        """'run' for the one end task that is to write this round's end; else why not."""
        job_id = meta.job_id
        return _text(
            self._run(
                "claim_end",
                [keys.job_meta(job_id), keys.job_counts(job_id), keys.job_inflight(job_id)],
                [meta.run_id, round_, token],
            )
        )

    def note_end_retry(self, end: JobEnd, token: str, what: str) -> None:
        """The end task holding the job's end retries it: `what` (and why) shows in its status until
        the end is written."""
        self._run("note_end_retry", [keys.job_meta(end.job_id)], [end.run_id, end.round, token, what])

    def end_claimed(self, meta: JobMeta) -> bool:
        """Whether an end task holds the job's end now (it is being written)."""
        return bool(self.client.hexists(keys.job_meta(meta.job_id), END_CLAIM))

    def finish_job(
        self,
        meta: JobMeta,
        round_: int,
        token: str,
        results: str | None = None,
        report: str | None = None,
        error: str | None = None,
    ) -> bool:
        """Mark the job finished: its end written, or failed for good with `error`."""
        return bool(
            self._run(
                "finish_job",
                [keys.job_meta(meta.job_id)],
                [meta.run_id, round_, token, time.time(), results or "", report or "", error or ""],
            )
        )

    def bits(self, meta: JobMeta) -> JobBits:
        """The job's bitmaps, read together."""
        job_id = meta.job_id
        pipe = self._bytes_client().pipeline(transaction=True)
        pipe.get(keys.job_done(job_id))
        pipe.get(keys.job_failed(job_id))
        for stage in range(meta.last_stage):
            pipe.get(keys.job_handed(job_id, stage))
        done, failed, *handed = (value or b"" for value in pipe.execute())
        return JobBits(done=done, failed=failed, handed=tuple(handed))

    def _bytes_client(self) -> redis.Redis:
        """A client on the same server that hands bitmaps over as bytes (the shared client may decode
        every reply as text)."""
        if self._binary is None:
            pool = self.client.connection_pool
            kwargs = {**pool.connection_kwargs, "decode_responses": False}
            self._binary = redis.Redis(
                connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
            )
        return self._binary

    # -- commands ----------------------------------------------------------------------------------

    def status(self, job_id: str) -> JobStatus:
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(keys.job_meta(job_id))
        pipe.hgetall(keys.job_counts(job_id))
        pipe.hvals(keys.job_inflight(job_id))
        raw, raw_counts, inflight = pipe.execute()
        if not raw:
            raise UnknownJobError(f"no job {job_id!r} on this broker")
        meta = JobMeta.from_hash(job_id, {_text(key): _text(value) for key, value in raw.items()})
        counts = _counts(raw_counts)
        done, failed = counts.get("done", 0), counts.get("failed", 0)
        running = min(sum(max(int(value), 0) for value in inflight), meta.total - done)
        unfinished = meta.total - done - running
        cancelled = unfinished if meta.cancelled_at is not None else 0
        stopped_s = meta.stopped_s
        if meta.stopped_at is not None and meta.started_at is not None:
            stopped_s += max(time.time() - max(meta.stopped_at, meta.started_at), 0.0)
        if meta.end_error is not None:
            state = JobState.FAILED
        elif meta.cancelled_at is not None:
            state = JobState.CANCELLED
        elif meta.finished_at is not None:
            state = JobState.FAILED if failed else JobState.SUCCEEDED
        elif meta.stopped_at is not None:
            state = JobState.STOPPED
        elif meta.started_at is not None:
            state = JobState.RUNNING
        else:
            state = JobState.PENDING
        return JobStatus(
            job_id=job_id,
            name=meta.name,
            state=state,
            total=meta.total,
            pending=unfinished - cancelled,
            running=running,
            succeeded=done - failed,
            failed=failed + cancelled,
            cancelled=cancelled,
            output=meta.output,
            submitted_at=meta.submitted_at,
            started_at=meta.started_at,
            finished_at=meta.finished_at,
            stopped_s=round(stopped_s, 3),
            error=meta.end_error,
            retrying=meta.end_retrying if meta.finished_at is None else None,
            schedule=meta.schedule,
            stages=[
                StageProgress(name=plan.name, done=counts.get(stage_field(plan.name), 0))
                for plan in meta.recipe
            ],
        )

    def statuses(self) -> Iterator[JobStatus]:
        """Every job on this broker, in no particular order; one pruned meanwhile is left out."""
        for job_id in self.job_ids():
            try:
                yield self.status(job_id)
            except UnknownJobError:
                continue

    def in_flight(self, job_id: str) -> dict[str, int]:
        """The chunks of the job running now (by chunk id), with the items each still runs."""
        return _counts(self.client.hgetall(keys.job_inflight(job_id)))

    def deliveries(self, job_id: str) -> dict[str, int]:
        """How often each chunk still running, or left by a worker that died, was delivered: by
        "<chunk id>#<task retry>"."""
        return _counts(self.client.hgetall(keys.job_deliveries(job_id)))

    def cancel(self, job_id: str) -> tuple[CancelVerdict, int | None]:
        """Cancel the job at once; returns the verdict and the round whose end is now due, if any."""
        reply = self._run(
            "cancel",
            [keys.job_meta(job_id), keys.job_counts(job_id), keys.job_inflight(job_id)],
            [time.time()],
        )
        verdict = _text(reply[0])
        if verdict == "unknown":
            raise UnknownJobError(f"no job {job_id!r} on this broker")
        due = int(reply[1]) if len(reply) > 1 else 0
        return verdict, (due - 1 if due else None)  # type: ignore[return-value]

    def _item_keys(self, meta: JobMeta) -> list[str]:
        job_id = meta.job_id
        return [
            keys.job_meta(job_id),
            keys.job_counts(job_id),
            keys.job_done(job_id),
            keys.job_failed(job_id),
            *(keys.job_handed(job_id, stage) for stage in range(meta.last_stage)),
        ]

    def reopen_items(
        self, meta: JobMeta, positions: Sequence[int], *, reopen: bool, cancelled: bool
    ) -> tuple[int, list[int]]:
        """`imgjobs retry`'s move: items failed (or, with `cancelled`, never finished in a cancelled
        job that has ended) go back to open. With `reopen`, the job opens a new round in the same step
        as the first item moves. Returns (the round, per item the stages it had been handed past as
        bits, or -1 where it was left as it is); round -1 when the job is gone, -2 when it was
        cancelled since `meta` was read (nothing moved then)."""
        stages = [stage_field(plan.name) for plan in meta.recipe[: meta.last_stage]]
        reply = self._run(
            "reopen_items",
            self._item_keys(meta),
            [
                meta.run_id,
                meta.epoch,
                len(stages),
                int(reopen),
                int(cancelled),
                time.time(),
                *stages,
                *positions,
            ],
        )
        return int(reply[0]), [int(value) for value in reply[1:]]

    def put_back(
        self, meta: JobMeta, moves: Sequence[tuple[int, int, Literal["f", "c"]]], *, recancel: bool
    ) -> int | None:
        """Undo a stopped retry: each (position, stages, kind) as reopen_items left it is failed (kind
        'f') or cancelled (kind 'c') again, unless a worker finished it since. Returns the round whose
        end is due again."""
        stages = [stage_field(plan.name) for plan in meta.recipe[: meta.last_stage]]
        job_keys = self._item_keys(meta)
        due = 0
        # In batches, as the moves were made: one script call blocks Redis while it runs.
        for start in range(0, max(len(moves), 1), MOVE_BATCH):
            batch = moves[start : start + MOVE_BATCH]
            due = int(
                self._run(
                    "put_back",
                    [*job_keys[:2], keys.job_inflight(meta.job_id), *job_keys[2:]],
                    [
                        meta.run_id,
                        len(stages),
                        int(recancel and start == 0),
                        time.time(),
                        *stages,
                        *(part for move in batch for part in move),
                    ],
                )
            )
        return due - 1 if due else None

    def prune(self, cutoff: float, dry_run: bool = False) -> list[PrunedJob]:
        """Delete every job that finished before `cutoff` (a Unix time); returns them. With dry_run,
        only returns them. Jobs not finished are kept whatever their age."""
        pruned: list[PrunedJob] = []
        batch: list[str] = []

        def prune_batch() -> None:
            pipe = self.client.pipeline(transaction=False)
            for job_id in batch:
                pipe.hmget(keys.job_meta(job_id), ["finished_at", "name"])
            for job_id, (finished_at, name) in zip(batch, pipe.execute(), strict=True):
                if finished_at is None or float(finished_at) >= cutoff:
                    continue
                if dry_run or self._run("prune_job", [*keys.job_keys(job_id), keys.JOBS], [job_id, cutoff]):
                    pruned.append(PrunedJob(job_id, _text(name or ""), float(finished_at)))
            batch.clear()

        for job_id in self.job_ids():
            batch.append(job_id)
            if len(batch) >= SCAN_BATCH:
                prune_batch()
        if batch:
            prune_batch()
        return pruned


def _counts(raw: dict[Any, Any]) -> dict[str, int]:
    return {_text(key): int(value) for key, value in raw.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
