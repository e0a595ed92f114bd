"""The webhook outbox: finished tasks whose ``callback`` is due.

The same scheme as the mail's (``storage/outbox.py``), on the task's
``callback`` field: a claim moves ``callback.next_at`` forward by a lease,
so a sender that dies leaves the post due again once the lease runs out.
Delivery is therefore at least once; the receiver tells copies apart by
their ``webhook-id``, which is the task's id and the same on every try.
"""

from __future__ import annotations

import datetime as dt

from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection

from service.model.task import CallbackStatus, Task
from service.storage.database import after, utcnow

_CLAIM_TRIES = 20


class CallbackOutbox:
    def __init__(self, tasks: AsyncCollection):
        self.tasks = tasks

    async def claim(self, worker: str, lease: float) -> Task | None:
        """A task whose webhook is due, now this sender's for ``lease``."""
        for _ in range(_CLAIM_TRIES):
            now = utcnow()
            cand = await self.tasks.find_one(
                {"callback.status": str(CallbackStatus.PENDING),
                 "callback.next_at": {"$lte": now}},
                sort=[("callback.next_at", ASCENDING)])
            if cand is None:
                return None
            result = await self.tasks.update_one(
                {"_id": cand["_id"], "callback.status": str(CallbackStatus.PENDING),
                 "callback.next_at": cand["callback"]["next_at"]},
                {"$set": {"callback.next_at": now + dt.timedelta(seconds=lease),
                          "callback.worker": worker},
                 "$inc": {"callback.attempts": 1}})
            if result.modified_count:
                task = Task.from_doc(cand)
                assert task.callback is not None
                task.callback.attempts += 1
                return task
        return None

    async def delivered(self, task_id: str) -> None:
        await self.tasks.update_one(
            {"_id": task_id},
            {"$set": {"callback.status": str(CallbackStatus.DELIVERED),
                      "callback.delivered_at": utcnow(), "callback.next_at": None,
                      "callback.last_error": None}})

    async def failed(self, task_id: str, error: str, retry_in: float | None) -> None:
        """A failed attempt: retried after ``retry_in`` seconds, or, with
        None, failed for good."""
        changes: dict[str, object] = {"callback.last_error": error}
        if retry_in is None:
            changes.update({"callback.status": str(CallbackStatus.FAILED),
                            "callback.next_at": None})
        else:
            changes["callback.next_at"] = after(retry_in)
        await self.tasks.update_one({"_id": task_id}, {"$set": changes})
