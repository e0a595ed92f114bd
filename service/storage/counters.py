"""Queue depth and tasks stored, for /metrics, at a cost that does not grow
with the queue.

SecantusDB counts by reading every match, and even the collection's size
by reading every document (20,000 queued: 450 ms to count them, 140 ms for
estimated_document_count). So the queue depth and the number of tasks
stored are counters in one ``stats`` document: each process adds up its
own changes (submits, claims, requeues) in memory and writes them with one
$inc a second later, together with whatever else changed meanwhile (at
most one write a second per process, whatever the load: at ten a second
they were a tenth of a small task's database work; a failed write is
retried). Changes a crash loses, and tasks the TTL index
deletes, are corrected by a recount every RECONCILE_EVERY, done by one
process at a time. Running tasks are few (at most the workers'
concurrency), so they are counted.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from service.model.task import Status
from service.storage.database import Collections, utcnow

STATS_ID = "tasks"
RECONCILE_EVERY = dt.timedelta(minutes=10)
RECONCILE_LEASE = dt.timedelta(minutes=2)
FLUSH_DELAY = 1.0


class TaskCounters:
    def __init__(self, cols: Collections):
        self.cols = cols
        self._tally: dict[str, int] = {}
        self._flusher: asyncio.Task | None = None

    def count(self, **deltas: int) -> None:
        for name, delta in deltas.items():
            self._tally[name] = self._tally.get(name, 0) + delta
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_soon(), context=contextvars.Context())

    async def _flush_soon(self) -> None:
        # A short wait, so that the changes of a burst go in one write.
        try:
            await asyncio.sleep(FLUSH_DELAY)
            await self.flush()
        except PyMongoError:
            pass  # kept; the next change or the periodic flush writes them
        finally:
            self._flusher = None

    async def flush(self) -> None:
        """Write this process's count changes; kept for the next flush if
        the database cannot take them now."""
        deltas, self._tally = self._tally, {}
        deltas = {k: v for k, v in deltas.items() if v}
        if not deltas:
            return
        try:
            await self.cols.stats.update_one({"_id": STATS_ID}, {"$inc": deltas}, upsert=True)
        except BaseException:
            for name, delta in deltas.items():
                self._tally[name] = self._tally.get(name, 0) + delta
            raise

    async def read(self) -> tuple[dict[str, int], bool]:
        """Running tasks and, once a recount has set the counters, queued
        and stored tasks; and whether a recount is due. Costs the same at
        any queue depth."""
        await self.flush()  # this API's own submits show at once
        doc = await self.cols.stats.find_one({"_id": STATS_ID}) or {}
        counts = {str(Status.RUNNING):
                  await self.cols.tasks.count_documents({"status": Status.RUNNING})}
        if doc.get("reconciled_at") is None:
            return counts, True
        counts.update(queued=max(0, doc.get("queued", 0)), total=max(0, doc.get("total", 0)))
        return counts, doc["reconciled_at"] < utcnow() - RECONCILE_EVERY

    async def queued(self) -> int:
        """Queued tasks in all: the counter, or, before the first recount
        has set it, a count that reads the whole queue."""
        await self.flush()
        doc = await self.cols.stats.find_one({"_id": STATS_ID}) or {}
        if doc.get("reconciled_at") is not None:
            return max(0, doc.get("queued", 0))
        return await self.cols.tasks.count_documents({"status": Status.QUEUED})

    async def reconcile(self) -> bool:
        """Recount queued and stored tasks (reads them all) and correct the
        counters by the difference, so that changes other processes write
        meanwhile are kept. False if another process is already at it."""
        await self.flush()
        now = utcnow()
        try:
            before = await self.cols.stats.find_one_and_update(
                {"_id": STATS_ID, "$or": [{"reconciling_until": None},
                                          {"reconciling_until": {"$lt": now}}]},
                {"$set": {"reconciling_until": now + RECONCILE_LEASE}},
                upsert=True, return_document=ReturnDocument.AFTER) or {}
        except DuplicateKeyError:
            return False
        queued = await self.cols.tasks.count_documents({"status": Status.QUEUED})
        total = await self.cols.tasks.estimated_document_count()
        await self.cols.stats.update_one(
            {"_id": STATS_ID},
            {"$inc": {"queued": queued - before.get("queued", 0),
                      "total": total - before.get("total", 0)},
             "$set": {"reconciled_at": utcnow(), "reconciling_until": None}})
        return True
