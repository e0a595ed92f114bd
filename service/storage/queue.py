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
candidate. Every write of a running task is conditioned on the worker that
holds it, so a worker whose lease was taken over writes nothing.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from pymongo import ASCENDING

from service.model.task import NoteStatus, Status, Task, TaskError
from service.storage.counters import TaskCounters
from service.storage.database import Collections, after, utcnow
from service.storage.queue_scan import WindowedQueueScan

# Claim rounds per call, and expired leases looked at per round: bounds on
# the work of one claim when other workers keep winning the races.
_CLAIM_ROUNDS = 20
_EXPIRED_TRIES = 10


class Lease(enum.Enum):
    """What a renewal found."""
    HELD = "held"
    LOST = "lost"            # another worker took the task over
    CANCELLED = "cancelled"  # DELETE /tasks/<id>: stop the download


class TaskQueue:
    def __init__(self, cols: Collections, counters: TaskCounters, max_attempts: int,
                 lease_seconds: float):
        self.cols = cols
        self.tasks = cols.tasks
        self.counters = counters
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self.scan = WindowedQueueScan(cols.tasks)

    # -- claiming ---------------------------------------------------------

    async def claim(self, worker: str, limit: int = 1) -> list[Task]:
        """Take up to ``limit`` runnable tasks for ``worker``.

        Queued tasks come first, the lowest lane first and in it the oldest
        window; then running tasks whose worker stopped renewing its lease.
        A task whose workers died ``max_attempts`` times is failed rather
        than tried forever. New tasks are taken in one conditional
        ``update_many``: per task it costs a third of an ``update_one``, and
        it is one round trip instead of many.
        """
        taken: list[dict] = []
        for _ in range(_CLAIM_ROUNDS):
            if len(taken) >= limit:
                break
            now = utcnow()
            cands = await self.scan.candidates(now, limit - len(taken))
            if not cands:
                expired = await self._claim_expired(worker, now)
                if expired is None:
                    break
                taken.append(expired)
                continue
            fresh = [c for c in cands if c.get("attempts", 0) == 0]
            retried = [c for c in cands if c.get("attempts", 0) != 0]
            if fresh:
                taken += await self._take_fresh(fresh, worker, now)
            for cand in retried:
                got = await self._take(cand, worker, now)
                if got is not None:
                    taken.append(got)
        return [Task.from_doc(doc) for doc in taken]

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
                   "claim": token, "lease_until": self._lease(now)}
        ids = [c["_id"] for c in cands]
        result = await self.tasks.update_many(
            {"_id": {"$in": ids}, "status": Status.QUEUED, "attempts": 0,
             "lease_until": {"$lte": now}},
            {"$set": changes, "$inc": {"attempts": 1}},
            # By _id: left to itself the planner may walk the claim index,
            # that is, the whole queue.
            hint=[("_id", ASCENDING)])
        if result.modified_count == 0:
            return []
        self.counters.count(queued=-result.modified_count)
        if result.modified_count < len(ids):
            # Some went to another worker: ask which are ours.
            mine = {d["_id"] for d in await self.tasks.find(
                {"_id": {"$in": ids}, "claim": token}, {"_id": 1}).to_list(None)}
            cands = [c for c in cands if c["_id"] in mine]
        for cand in cands:
            cand.update(changes)
            cand["attempts"] = 1
        return cands

    async def _take(self, cand: dict, worker: str, now: dt.datetime) -> dict | None:
        changes: dict[str, Any] = {"status": str(Status.RUNNING), "worker": worker,
                                   "lease_until": self._lease(now)}
        if cand.get("started_at") is None:
            changes["started_at"] = now
        result = await self.tasks.update_one(
            {"_id": cand["_id"], "status": cand["status"], "lease_until": cand["lease_until"]},
            {"$set": changes, "$inc": {"attempts": 1}})
        if not result.modified_count:
            return None
        if cand["status"] == Status.QUEUED:
            self.counters.count(queued=-1)
        cand.update(changes)
        cand["attempts"] = cand.get("attempts", 0) + 1
        return cand

    async def _fail_abandoned(self, cand: dict, now: dt.datetime) -> None:
        task = Task.from_doc(cand)
        error = TaskError("worker_lost", f"processing stopped unexpectedly {task.attempts} "
                          "times; giving up")
        await self.tasks.update_one(
            {"_id": task.id, "status": Status.RUNNING, "lease_until": task.lease_until},
            {"$set": _finish_fields(task, now, Status.FAILED, error=error)})

    # -- while it runs ----------------------------------------------------

    async def renew(self, task_id: str, worker: str, bytes_done: int,
                    bytes_total: int | None) -> Lease:
        """Extend the lease and record progress, unless the task is no
        longer this worker's: then say whether it was cancelled. Renewals
        run every second, so a cancel reaches its download within one."""
        result = await self.tasks.update_one(
            {"_id": task_id, "status": Status.RUNNING, "worker": worker},
            {"$set": {"lease_until": after(self.lease_seconds),
                      "bytes_done": bytes_done, "bytes_total": bytes_total}})
        if result.matched_count:
            return Lease.HELD
        doc = await self.tasks.find_one({"_id": task_id}, {"status": 1})
        cancelled = doc is not None and doc.get("status") == Status.CANCELLED
        return Lease.CANCELLED if cancelled else Lease.LOST

    # -- ending it --------------------------------------------------------

    async def finish(self, task: Task, worker: str, md5: str | None = None,
                     error: TaskError | None = None, bytes_done: int | None = None,
                     bytes_total: int | None = None) -> bool:
        """Done with ``md5``, or failed with ``error``; False when the task
        is no longer this worker's."""
        status = Status.DONE if md5 else Status.FAILED
        fields = _finish_fields(task, utcnow(), status, md5=md5, error=error)
        if bytes_done is not None:
            fields["bytes_done"] = bytes_done
            fields["bytes_total"] = bytes_total
        result = await self.tasks.update_one(
            {"_id": task.id, "status": Status.RUNNING, "worker": worker}, {"$set": fields})
        return bool(result.modified_count)

    async def retry_later(self, task: Task, worker: str, delay: float, error: TaskError,
                          count_attempt: bool = True) -> bool:
        """Put a running task back in the queue, runnable after ``delay``."""
        update: dict[str, Any] = {"$set": {"status": str(Status.QUEUED), "worker": None,
                                           "lease_until": after(delay),
                                           "error": error.to_doc(), "bytes_done": 0}}
        if not count_attempt:
            update["$inc"] = {"attempts": -1}
        result = await self.tasks.update_one(
            {"_id": task.id, "status": Status.RUNNING, "worker": worker}, update)
        if result.modified_count:
            self.counters.count(queued=1)
        return bool(result.modified_count)


def _finish_fields(task: Task, now: dt.datetime, status: Status, md5: str | None = None,
                   error: TaskError | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {"status": str(status), "md5": md5,
                              "error": error.to_doc() if error else None,
                              "finished_at": now, "lease_until": None}
    if task.notification.status == NoteStatus.PENDING:
        fields["notification.next_at"] = now  # the mail is due now
    return fields
