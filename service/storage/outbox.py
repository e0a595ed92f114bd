"""The mail outbox: finished tasks (or manifests) whose notification is due.

A notification is claimed like a task: the claim moves
``notification.next_at`` forward by a lease, so a sender that dies leaves
the mail due again once the lease runs out (delivery is at least once).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection

from service.model.task import NoteStatus, Notifiable
from service.storage.database import after, utcnow

_CLAIM_TRIES = 20


N = TypeVar("N", bound=Notifiable)


class MailOutbox(Generic[N]):
    """The notifications kept in one collection, each document read back
    with ``load``."""

    def __init__(self, collection: AsyncCollection, load: Callable[[dict], N]):
        self.tasks = collection
        self.load = load

    async def claim(self, worker: str, lease: float) -> N | None:
        """An item whose mail is due, now this sender's for ``lease``."""
        for _ in range(_CLAIM_TRIES):
            now = utcnow()
            cand = await self.tasks.find_one(
                {"notification.status": NoteStatus.PENDING,
                 "notification.next_at": {"$lte": now}},
                sort=[("notification.next_at", ASCENDING)])
            if cand is None:
                return None
            result = await self.tasks.update_one(
                {"_id": cand["_id"], "notification.status": NoteStatus.PENDING,
                 "notification.next_at": cand["notification"]["next_at"]},
                {"$set": {"notification.next_at": now + dt.timedelta(seconds=lease),
                          "notification.worker": worker},
                 "$inc": {"notification.attempts": 1}})
            if result.modified_count:
                item = self.load(cand)
                item.notification.attempts += 1
                return item
        return None

    async def sent(self, task_id: str) -> None:
        await self.tasks.update_one(
            {"_id": task_id},
            {"$set": {"notification.status": str(NoteStatus.SENT),
                      "notification.sent_at": utcnow(),
                      "notification.next_at": None, "notification.error": None}})

    async def failed(self, task_id: str, error: str, retry_in: float | None) -> None:
        """A failed attempt: retried after ``retry_in`` seconds, or, with
        None, failed for good."""
        changes: dict[str, Any]
        if retry_in is None:
            changes = {"notification.status": str(NoteStatus.FAILED),
                       "notification.next_at": None}
        else:
            changes = {"notification.next_at": after(retry_in)}
        changes["notification.error"] = error
        await self.tasks.update_one({"_id": task_id}, {"$set": changes})
