"""Worker heartbeats, for /health: who is alive, and who is stuck."""

from __future__ import annotations

import datetime as dt

from pymongo.asynchronous.collection import AsyncCollection

from service.storage.database import utcnow


class WorkerLiveness:
    def __init__(self, workers: AsyncCollection):
        self.workers = workers

    async def heartbeat(self, worker: str, active: int, stuck: int = 0) -> None:
        await self.workers.update_one(
            {"_id": worker},
            {"$set": {"heartbeat_at": utcnow(), "active": active, "stuck": stuck}},
            upsert=True)

    async def live_workers(self, within: float) -> tuple[int, list[str]]:
        """How many workers sent a heartbeat lately, and the names of those
        among them that report downloads making no progress."""
        since = utcnow() - dt.timedelta(seconds=within)
        live = await self.workers.find(
            {"heartbeat_at": {"$gte": since}}, {"stuck": 1}).to_list(None)
        return len(live), sorted(w["_id"] for w in live if w.get("stuck"))
