"""The queue: claim a task, keep it (lease), and end it (finish or retry).

A task moves queued -> running -> done | failed, and back to queued when a
try fails transiently or its worker shuts down. ``lease_until`` does double
duty: for a queued task it is the earliest time it may run (now, or later
after a retry back-off); for a running task it is when its worker's lease
expires. One index on (status, lane, lease_until) serves every claim.

Claims find candidates (``WindowedQueueScan``) and then take them with a
conditional update on ``_id`` plus the values just read, because
``find_one_and_update`` with a non-``_id`` filter gets slower as the
collection grows on SecantusDB. A lost race just means trying the next
candidate.

Fencing: every claim, a lease takeover included, sets a fresh ``claim``
token, and every later write of the running task (renew, finish,
retry_later) is conditioned on {_id, status running, worker, claim}: in
the filter, or for the finish in the update itself (``queue_docs.held_test``).
A worker whose lease was taken over, even one cut off from the database while
it happened, writes nothing when it comes back. Lease ends are set with the
database's ``$$NOW`` and compared with its clock (storage.dbclock), never
a worker's own.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import uuid
from collections.abc import Sequence
from typing import Any

from service.model.digests import ServerDigest
from service.model.task import Status, Task, TaskError
from service.storage.batching import END_LINGER, NOT_THE_DOCUMENTS, Batcher, one_by_one
from service.storage.conditional import each_only_if, merged, only_if
from service.storage.counters import TaskCounters
from service.storage.database import Collections
from service.storage.dbclock import DatabaseClock
from service.storage.queue_docs import (
    appended,
    ended,
    finish_fields,
    held,
    held_test,
    history_entry,
    literal,
    pushed,
)
from service.storage.queue_scan import WindowedQueueScan

# Claim rounds per call, and expired leases looked at per round: bounds on
# the work of one claim when other workers keep winning the races.
_CLAIM_ROUNDS = 20
_EXPIRED_TRIES = 10
# A task whose try failed transiently on a worker is left to other workers
# for this long once it is runnable again: the fault may be this worker's
# (its host cannot reach the file's server), and idle workers poll every
# POLL_INTERVAL. Past it, the same worker takes it, so one worker alone
# still retries.
_LEAVE_TO_OTHERS = dt.timedelta(seconds=2)
# An end retried this many times because submits kept joining its download
# gives up as if no longer held (the lease runs out; the task is redone).
_JOIN_ROUNDS = 50


class Lease(enum.Enum):
    """What a renewal found."""
    HELD = "held"
    LOST = "lost"            # another worker took the task over
    CANCELLED = "cancelled"  # DELETE /tasks/<id>: stop the download


class TaskQueue:
    def __init__(self, cols: Collections, counters: TaskCounters, max_attempts: int,
                 lease_seconds: float, clock: DatabaseClock | None = None):
        self.cols = cols
        self.clock = clock or DatabaseClock(cols.db)
        self.tasks = cols.tasks
        self.counters = counters
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self.scan = WindowedQueueScan(cols.tasks)
        self._finishes: Batcher[_End, Ended] = Batcher(self._write_finishes, END_LINGER)

    # -- claiming ---------------------------------------------------------

    async def claim(self, worker: str, limit: int = 1) -> list[Task]:
        """Take up to ``limit`` runnable tasks for ``worker``.

        Queued tasks come first, the lowest lane first and in it the oldest
        window; then running tasks whose worker stopped renewing its lease.
        A task whose workers died ``max_attempts`` times is failed rather
        than tried forever. New tasks are taken in one ``update_many`` on
        their ids, conditional in its pipeline: per task it costs a third
        of an ``update_one``, and it is one round trip instead of many.
        """
        taken: list[dict] = []
        for _ in range(_CLAIM_ROUNDS):
            if len(taken) >= limit:
                break
            now = self.clock.now()
            cands = await self.scan.candidates(now, limit - len(taken))
            if not cands:
                expired = await self._claim_expired(worker, now)
                if expired is None:
                    break
                taken.append(expired)
                continue
            fresh = [c for c in cands if c.get("attempts", 0) == 0]
            retried = [c for c in cands if c.get("attempts", 0) != 0
                       and not _failed_here_lately(c, worker, now)]
            if not fresh and not retried:
                break  # only tasks left to other workers for now
            if fresh:
                taken += await self._take_fresh(fresh, worker, now)
            for cand in retried:
                got = await self._take(cand, worker, now)
                if got is not None:
                    taken.append(got)
        return [Task.from_doc(doc) for doc in taken]

    async def take_handed(self, worker: str, docs: list[dict]) -> list[Task]:
        """Claim tasks the API process handed this worker (runtime.handoff)
        by their ids, without a scan: those still queued and untried, as a
        scan's fresh candidates are. Another worker's scan may have taken
        some meanwhile; they are left out."""
        if not docs:
            return []
        taken = await self._take_fresh(docs, worker, self.clock.now())
        return [Task.from_doc(doc) for doc in taken]

    async def give_back(self, task: Task, worker: str) -> bool:
        """A task assigned to ``worker`` at insert that it will not start
        (it was full, or never got it): queued again as if never claimed,
        for any worker. Fenced like every write of a running task."""
        result = await self.tasks.update_one(
            held(task, worker),
            [{"$set": {**literal({"status": str(Status.QUEUED), "worker": None, "claim": None,
                                  "attempts": 0, "started_at": None, "claimed_at": None}),
                       "lease_until": "$$NOW"}}])
        if result.modified_count:
            self.counters.count(queued=1)
        return bool(result.modified_count)

    async def _claim_expired(self, worker: str, now: dt.datetime) -> dict | None:
        for _ in range(_EXPIRED_TRIES):
            cand = await self.tasks.find_one(
                {"status": Status.RUNNING, "lease_until": {"$lt": now}})
            if cand is None:
                return None
            if cand.get("attempts", 0) >= self.max_attempts:
                await self._fail_abandoned(cand, now)
                continue
            got = await self._take(cand, worker, now)
            if got is not None:
                return got
        return None

    def _lease(self, now: dt.datetime) -> dt.datetime:
        return now + dt.timedelta(seconds=self.lease_seconds)

    async def _take_fresh(self, cands: list[dict], worker: str,
                          now: dt.datetime) -> list[dict]:
        token = uuid.uuid4().hex
        changes = {"status": str(Status.RUNNING), "worker": worker, "started_at": now,
                   "claim": token, "attempts": 1}
        ids = [c["_id"] for c in cands]
        runnable = {"$and": [{"$eq": ["$status", Status.QUEUED]}, {"$eq": ["$attempts", 0]},
                             # A follower's lease_until is null, which an
                             # expression ranks below any date.
                             {"$eq": [{"$type": "$lease_until"}, "date"]},
                             {"$lte": ["$lease_until", now]}]}
        result = await self.tasks.update_many(
            {"_id": {"$in": ids}}, only_if(runnable, {**literal(changes), **self._leased()}))
        if result.modified_count == 0:
            return []
        self.counters.count(queued=-result.modified_count)
        if result.modified_count < len(ids):
            # Some went to another worker: ask which are ours.
            mine = {d["_id"] for d in await self.tasks.find(
                {"_id": {"$in": ids}, "claim": token}, {"_id": 1}).to_list(None)}
            cands = [c for c in cands if c["_id"] in mine]
        for cand in cands:
            cand.update(changes, claimed_at=now, lease_until=self._lease(now))
        return cands

    def _leased(self) -> dict[str, Any]:
        """A fresh lease, on the database's clock."""
        return {"claimed_at": "$$NOW",
                "lease_until": {"$add": ["$$NOW", round(self.lease_seconds * 1000)]}}

    async def _take(self, cand: dict, worker: str, now: dt.datetime) -> dict | None:
        """Take a retried task, or a running one whose lease expired (its
        holder's attempt goes into the history as lease_lost)."""
        changes: dict[str, Any] = {"status": str(Status.RUNNING), "worker": worker,
                                   "claim": uuid.uuid4().hex}
        if cand.get("started_at") is None:
            changes["started_at"] = now
        update = {**literal(changes), **self._leased(),
                  "attempts": {"$add": [{"$ifNull": ["$attempts", 0]}, 1]}}
        if cand["status"] == Status.RUNNING:
            update.update(ended("lease_lost"))
        result = await self.tasks.update_one(
            {"_id": cand["_id"], "status": cand["status"], "lease_until": cand["lease_until"],
             "claim": cand.get("claim")},
            [{"$set": update}])
        if not result.modified_count:
            return None
        if cand["status"] == Status.QUEUED:
            self.counters.count(queued=-1)
        cand.update(changes, claimed_at=now, lease_until=self._lease(now))
        cand["attempts"] = cand.get("attempts", 0) + 1
        return cand

    async def _fail_abandoned(self, cand: dict, now: dt.datetime) -> None:
        task = Task.from_doc(cand)
        error = TaskError("worker_lost", f"processing stopped unexpectedly {task.attempts} "
                          "times; giving up")
        await self.tasks.update_one(
            {"_id": task.id, "status": Status.RUNNING, "lease_until": task.lease_until,
             "claim": task.claim},
            {"$set": finish_fields(task, now, Status.FAILED, error=error),
             "$push": pushed(history_entry(task, now, "lease_lost"))})

    # -- while it runs ----------------------------------------------------

    async def renew(self, task: Task, worker: str, bytes_done: int,
                    bytes_total: int | None, checkpoint: dict[str, Any] | None = None,
                    attempt: dict[str, Any] | None = None) -> Lease:
        """Extend the lease and record progress, unless the task is no
        longer this worker's claim: then say whether it was cancelled.
        Renewals run every second, so a cancel reaches its download within
        one. A new ``checkpoint`` and the ``attempt``'s progress ride on
        the same write: resuming costs no extra round trip."""
        lease_ms = round(self.lease_seconds * 1000)
        progress: dict[str, Any] = {"bytes_done": bytes_done, "bytes_total": bytes_total}
        if checkpoint is not None:
            progress["checkpoint"] = checkpoint
        if attempt is not None:
            progress["attempt"] = attempt
        result = await self.tasks.update_one(
            held(task, worker),
            [{"$set": {"lease_until": {"$add": ["$$NOW", lease_ms]}, **literal(progress)}}])
        if result.matched_count:
            return Lease.HELD
        doc = await self.tasks.find_one({"_id": task.id}, {"status": 1})
        cancelled = doc is not None and doc.get("status") == Status.CANCELLED
        return Lease.CANCELLED if cancelled else Lease.LOST

    # -- ending it --------------------------------------------------------

    async def finish(self, task: Task, worker: str, digests: dict[str, str] | None = None,
                     error: TaskError | None = None, bytes_done: int | None = None,
                     bytes_total: int | None = None, verified: bool | None = None,
                     server_digest: ServerDigest | None = None,
                     attempt: dict[str, Any] | None = None,
                     revalidated_from: str | None = None) -> list[str] | None:
        """Done with ``digests``, or failed with ``error`` (a file that is not
        the expected one has both): the submits that followed its download
        (storage.coalescing), to settle now; None when the task is no longer
        this worker's. The end is conditioned on the followers it names, so
        a submit joins before it (and is settled) or is refused.
        ``attempt``: this attempt's final progress; ``revalidated_from``: the
        task whose digests a 304 confirmed."""
        status = Status.FAILED if error is not None or not digests else Status.DONE
        now = self.clock.now()
        fields = finish_fields(task, now, status, error=error)
        if digests:
            fields["digests"] = digests
            fields["md5"] = digests.get("md5") if status == Status.DONE else None
        if verified is not None:
            fields["verified"] = verified
        if server_digest is not None:
            fields["server_digest"] = server_digest.to_doc()
        if bytes_done is not None:
            fields["bytes_done"] = bytes_done
            fields["bytes_total"] = bytes_total
        if attempt is not None:
            fields["attempt"] = attempt
        if revalidated_from is not None:
            fields.update(revalidated=True, cached_from=revalidated_from)
        changes = {**merged(fields),
                   **appended(history_entry(task, now, str(status), worker, attempt))}
        followers: list[str] = []
        for _ in range(_JOIN_ROUNDS):
            answer = await self._finishes.submit((task, {"$and": [
                held_test(task, worker), _followers_are(followers)]}, changes, followers))
            if not isinstance(answer, Joined):
                return answer
            if answer.followers == followers:
                return None  # refused for another reason after all
            followers = answer.followers  # submits joined meanwhile: end with them
        return None

    async def _write_finishes(self, ends: list[_End]) -> Sequence[Ended | BaseException]:
        """Several tasks' ends in one write; for each, its followers if it
        was still held, None if not, or the followers it missed."""
        try:
            result = await self.tasks.update_many(
                {"_id": {"$in": [task.id for task, _, _, _ in ends]}},
                each_only_if([(task.id, test, changes) for task, test, changes, _ in ends]))
        except NOT_THE_DOCUMENTS:
            raise
        except Exception:
            if len(ends) == 1:
                raise
            return await one_by_one(ends, self._write_one_finish)
        if result.modified_count == len(ends):
            return [followers for _, _, _, followers in ends]
        # Some were no longer held (cancelled, taken over), some had
        # followers joining, or this is the retry of a write whose answer
        # was lost: an end applied carries its claim and a final status.
        docs = {d["_id"]: d for d in await self.tasks.find(
            {"_id": {"$in": [task.id for task, _, _, _ in ends]}},
            {"status": 1, "claim": 1, "followers": 1}).to_list(None)}
        return [_what_ended(task, docs.get(task.id)) for task, _, _, _ in ends]

    async def _write_one_finish(self, end: _End) -> Ended:
        (answer,) = await self._write_finishes([end])  # one alone raises, never returns one
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def retry_later(self, task: Task, worker: str, delay: float, error: TaskError,
                          count_attempt: bool = True, checkpoint: dict[str, Any] | None = None,
                          attempt: dict[str, Any] | None = None) -> bool:
        """Put a running task back in the queue, runnable after ``delay``
        (on the database's clock), to resume from ``checkpoint`` (None:
        from byte 0). ``attempt``: this attempt's final progress."""
        update: dict[str, Any] = {
            **ended("retry" if count_attempt else "shutdown"),
            **literal({"status": str(Status.QUEUED), "worker": None,
                        "error": error.to_doc(), "checkpoint": checkpoint,
                        "bytes_done": checkpoint["offset"] if checkpoint else 0}),
            "lease_until": {"$add": ["$$NOW", round(delay * 1000)]}}
        if not count_attempt:
            update["attempts"] = {"$add": ["$attempts", -1]}
        # The attempt's last progress first: the history entry reads it.
        stages = ([{"$set": literal({"attempt": attempt})}] if attempt is not None else []) \
            + [{"$set": update}]
        result = await self.tasks.update_one(held(task, worker), stages)
        if result.modified_count:
            self.counters.count(queued=1)
        return bool(result.modified_count)


@dataclasses.dataclass(frozen=True)
class Joined:
    """An end refused because submits joined the download since the
    followers it named: these are its followers now."""
    followers: list[str]


# What an end write answers: the followers it settles, None (no longer
# held), or Joined (try again naming them).
Ended = list[str] | None | Joined
# A task, the end's test, its changes, and the followers the test names.
_End = tuple[Task, dict, dict, list[str]]


def _followers_are(followers: list[str]) -> dict[str, Any]:
    """Test: the task's followers (storage.coalescing) are ``followers``."""
    return {"$eq": [{"$ifNull": ["$followers", []]}, {"$literal": followers}]}


def _what_ended(task: Task, doc: dict | None) -> Ended:
    if doc is None or doc.get("claim") != task.claim:
        return None
    followers = list(doc.get("followers") or [])
    if doc.get("status") in (Status.DONE, Status.FAILED):
        return followers  # applied (this write, or an earlier try of it)
    if doc.get("status") == Status.RUNNING:
        return Joined(followers)
    return None


def _failed_here_lately(cand: dict, worker: str, now: dt.datetime) -> bool:
    """Whether this worker's own try of the task just failed (see
    _LEAVE_TO_OTHERS)."""
    history = cand.get("history") or []
    if not history or history[-1].get("outcome") != "retry":
        return False
    return (history[-1].get("worker") == worker
            and now < cand["lease_until"] + _LEAVE_TO_OTHERS)
