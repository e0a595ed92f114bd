"""Manifests and their lines' tasks: store them, count them, find the
moment the last line ends.

A manifest's lines are ordinary tasks (``manifest``, ``line``), queued and
run like any other. The worker that ends a line adds it to the manifest's
``counts`` (``line_ended``), which is what a running manifest's totals are
read from: counting 10,000 tasks on every poll would cost the database
more than the work. When the counts reach the number of lines, the tasks
themselves are checked and counted once more (``try_finish``), exactly; a
periodic sweep does the same for manifests whose last line ended in a
worker that died before it could add it.
"""

from __future__ import annotations

from typing import Any

from pymongo import ASCENDING, ReturnDocument

from service.model.manifest import ENDED, OUTCOMES, Manifest, outcome
from service.model.task import Status, Task
from service.storage.counters import TaskCounters
from service.storage.database import Collections, utcnow

INSERT_CHUNK = 1000
# Lines that did not end well, kept on a finished manifest for its mail.
PROBLEMS_KEPT = 50
_UNFINISHED = [str(Status.QUEUED), str(Status.RUNNING)]


class ManifestRecords:
    def __init__(self, cols: Collections, counters: TaskCounters):
        self.cols = cols
        self.manifests = cols.manifests
        self.tasks = cols.tasks
        self.counters = counters

    async def create(self, manifest: Manifest, tasks: list[Task]) -> None:
        """Store the manifest and its tasks, all or nothing: a failure part
        way removes what was stored, then raises."""
        await self.manifests.insert_one(manifest.to_doc())
        stored = 0
        try:
            for start in range(0, len(tasks), INSERT_CHUNK):
                chunk = tasks[start:start + INSERT_CHUNK]
                await self.tasks.insert_many([t.to_doc() for t in chunk], ordered=False)
                stored += len(chunk)
        except BaseException:
            if stored:
                await self.tasks.delete_many({"manifest": manifest.id})
            await self.manifests.delete_one({"_id": manifest.id})
            raise
        # Lines that end failed at birth (intake.ena) are never queued.
        queued = sum(1 for t in tasks if t.status == Status.QUEUED)
        self.counters.count(queued=queued, total=len(tasks))

    async def get(self, manifest_id: str) -> Manifest | None:
        doc = await self.manifests.find_one({"_id": manifest_id})
        return Manifest.from_doc(doc) if doc else None

    async def totals(self, manifest: Manifest) -> dict[str, int]:
        """Lines by outcome, and ``bytes_done`` / ``bytes_total`` summed
        over the lines (the total of those whose size is known)."""
        if manifest.totals is not None:
            return manifest.totals
        running = await self.tasks.find(
            {"manifest": manifest.id, "status": str(Status.RUNNING)},
            {"bytes_done": 1, "bytes_total": 1}).to_list(None)
        return running_totals(manifest, running)

    async def line_ended(self, manifest_id: str, ended_as: str, bytes_done: int,
                         bytes_total: int | None) -> Manifest | None:
        """Count a line that ended; the manifest if that finished it."""
        doc = await self.manifests.find_one_and_update(
            {"_id": manifest_id},
            {"$inc": {f"counts.{ended_as}": 1, "counts.bytes_done": bytes_done,
                      "counts.bytes_total": bytes_total or 0}},
            return_document=ReturnDocument.AFTER)
        if doc is None or doc.get("finished_at") is not None:
            return None
        counts = doc.get("counts") or {}
        if sum(counts.get(name, 0) for name in ENDED) < doc["lines"]:
            return None
        return await self.try_finish(manifest_id)

    async def _count(self, manifest_id: str) -> dict[str, int]:
        totals = dict.fromkeys(OUTCOMES, 0)
        totals.update(bytes_done=0, bytes_total=0)
        async for group in await self.tasks.aggregate([
                {"$match": {"manifest": manifest_id}},
                {"$group": {"_id": {"status": "$status", "verified": "$verified"},
                            "n": {"$sum": 1}, "done": {"$sum": "$bytes_done"},
                            "total": {"$sum": "$bytes_total"}}}]):
            key = outcome(group["_id"]["status"], group["_id"].get("verified"))
            totals[key] = totals.get(key, 0) + group["n"]
            totals["bytes_done"] += group["done"] or 0
            totals["bytes_total"] += group["total"] or 0
        return totals

    async def lines(self, manifest_id: str, after: int, limit: int) -> list[Task]:
        """Lines ``after + 1`` to ``after + limit``. Line numbers of a JSON
        manifest are dense; a text one skips blank lines, so a page may
        hold fewer than ``limit`` and the next starts after it anyway."""
        cursor = self.tasks.find({"manifest": manifest_id,
                                  "line": {"$gt": after, "$lte": after + limit}},
                                 sort=[("line", ASCENDING)])
        return [Task.from_doc(doc) for doc in await cursor.to_list(None)]

    async def try_finish(self, manifest_id: str) -> Manifest | None:
        """If every line has ended, record the totals and make the mail due;
        the manifest when this call was the one that finished it."""
        unfinished = await self.tasks.find_one(
            {"manifest": manifest_id, "status": {"$in": _UNFINISHED}}, {"_id": 1})
        if unfinished is not None:
            return None
        now = utcnow()
        # The mail is due now (the outbox reads next_at only while pending).
        changes: dict[str, Any] = {"finished_at": now, "notification.next_at": now,
                                   "totals": await self._count(manifest_id),
                                   "problems": await self._problems(manifest_id)}
        result = await self.manifests.find_one_and_update(
            {"_id": manifest_id, "finished_at": None},
            {"$set": changes}, return_document=True)
        return Manifest.from_doc(result) if result is not None else None

    async def _problems(self, manifest_id: str) -> list[dict[str, Any]]:
        cursor = self.tasks.find({"manifest": manifest_id, "status": {"$nin": _UNFINISHED
                                                                      + [str(Status.DONE)]}},
                                 sort=[("line", ASCENDING)], limit=PROBLEMS_KEPT)
        return [{"line": t.line, "url": t.url, "error": t.error.message if t.error else None,
                 "outcome": outcome(str(t.status), t.verified)}
                for t in map(Task.from_doc, await cursor.to_list(None))]

    async def sweep(self) -> int:
        """Finish the manifests whose last line ended unseen; how many."""
        finished = 0
        cursor = self.manifests.find({"finished_at": None}, {"_id": 1}, limit=100)
        for doc in await cursor.to_list(None):
            if await self.try_finish(doc["_id"]) is not None:
                finished += 1
        return finished


def running_totals(manifest: Manifest, running: list[dict[str, Any]]) -> dict[str, int]:
    """The totals of an unfinished manifest: its ended lines' counts, plus
    its ``running`` lines (their ``bytes_done`` and ``bytes_total``)."""
    counts = manifest.counts
    totals = {name: counts.get(name, 0) for name in ENDED}
    ended = sum(totals.values())
    totals.update(
        running=len(running), queued=max(0, manifest.lines - ended - len(running)),
        bytes_done=counts.get("bytes_done", 0) + sum(t.get("bytes_done") or 0
                                                     for t in running),
        bytes_total=counts.get("bytes_total", 0) + sum(t.get("bytes_total") or 0
                                                       for t in running))
    return {name: totals[name] for name in (*OUTCOMES, "bytes_done", "bytes_total")}
