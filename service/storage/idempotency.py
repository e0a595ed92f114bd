"""Idempotency-Key -> task id, so that a retried submit returns the task
its first try created. Keys live IDEMPOTENCY_TTL (a TTL index deletes them;
an expired key that the index has not yet removed is taken over here)."""

from __future__ import annotations

import datetime as dt

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from service.storage.database import utcnow


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before for a different request."""


class IdempotencyKeys:
    def __init__(self, collection: AsyncCollection, ttl: float):
        self.collection = collection
        self.ttl = ttl

    async def reserve(self, key: str, task_id: str, url: str, email: str | None,
                      options: dict | None = None) -> str:
        """The task id the key stands for: ``task_id`` if the key is new (or
        expired), else the id stored with it. IdempotencyConflict if it was
        used for another url, email or ``options`` (what else the request
        asked for)."""
        now = utcnow()
        options = options or {}
        try:
            await self.collection.insert_one(
                {"_id": key, "task_id": task_id, "url": url, "email": email,
                 "options": options, "created_at": now})
            return task_id
        except DuplicateKeyError:
            pass
        existing = await self.collection.find_one({"_id": key})
        if existing is None:  # expired between the two calls
            return await self.reserve(key, task_id, url, email, options)
        if existing["created_at"] < now - dt.timedelta(seconds=self.ttl):
            result = await self.collection.update_one(
                {"_id": key, "created_at": existing["created_at"]},
                {"$set": {"task_id": task_id, "url": url, "email": email, "options": options,
                          "created_at": now}})
            return task_id if result.modified_count else await self.reserve(
                key, task_id, url, email, options)
        if (existing["url"] != url or existing.get("email") != email
                or existing.get("options", {}) != options):
            raise IdempotencyConflict()
        return existing["task_id"]

    async def release(self, key: str, task_id: str) -> None:
        """Forget a key whose task was refused, so it never points at a task
        that was not stored."""
        await self.collection.delete_one({"_id": key, "task_id": task_id})
