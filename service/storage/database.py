"""The MongoDB connection and the collections md5-light keeps in it.

Collections: ``tasks`` (the record and the queue), ``idempotency``
(Idempotency-Key -> task id, TTL-indexed), ``workers`` (heartbeats for
/health), ``stats`` (queue counters for /metrics), ``manifests`` and
``inflight`` (downloads that have run a second, for other API processes'
submits of the same file to follow) and ``files`` (each file's last
download, for max_age), both with ``_id`` alone. ``ensure_indexes``
creates every index, each named after the query it serves, and those two
collections.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import CollectionInvalid

from service.model.task import Status, utcnow

CLAIM_KEY = [("status", ASCENDING), ("lane", ASCENDING), ("lease_until", ASCENDING)]


def after(seconds: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=seconds)


def connect(uri: str, **kwargs: Any) -> AsyncMongoClient:
    # tz_aware: datetimes come back as aware UTC, so comparisons and
    # compare-and-set guards round-trip exactly.
    options: dict[str, Any] = dict(serverSelectionTimeoutMS=5000, connectTimeoutMS=5000,
                                   tz_aware=True, appname="md5-light")
    options.update(kwargs)
    return AsyncMongoClient(uri, **options)


@dataclasses.dataclass
class Collections:
    client: AsyncMongoClient
    db: AsyncDatabase
    tasks: AsyncCollection
    idempotency: AsyncCollection
    workers: AsyncCollection
    stats: AsyncCollection
    manifests: AsyncCollection
    inflight: AsyncCollection
    files: AsyncCollection

    @classmethod
    def of(cls, client: AsyncMongoClient) -> Collections:
        db = client.get_default_database("md5light")
        return cls(client, db, db["tasks"], db["idempotency"], db["workers"], db["stats"],
                   db["manifests"], db["inflight"], db["files"])

    async def ping(self) -> None:
        await self.db.command("ping")

    async def ensure_indexes(self, idempotency_ttl: float, task_ttl_days: float | None) -> None:
        await self._ensure_claim_index()
        await self.tasks.create_index([("client", ASCENDING), ("status", ASCENDING)],
                                      name="client")
        await self.tasks.create_index([("notification.status", ASCENDING),
                                       ("notification.next_at", ASCENDING)],
                                      name="notification_claim")
        # Sparse: only tasks submitted with a callback_url have one.
        await self.tasks.create_index([("callback.status", ASCENDING),
                                       ("callback.next_at", ASCENDING)],
                                      name="callback_claim", sparse=True)
        await self.tasks.create_index([("created_at", DESCENDING)], name="history")
        # Sparse: single submits (most tasks) carry no manifest to index.
        await self.tasks.create_index([("manifest", ASCENDING), ("line", ASCENDING)],
                                      name="manifest_lines", sparse=True)
        await self.tasks.create_index([("manifest", ASCENDING), ("status", ASCENDING)],
                                      name="manifest_status", sparse=True)
        await self.manifests.create_index("finished_at", name="open_manifests")
        await self.manifests.create_index([("notification.status", ASCENDING),
                                           ("notification.next_at", ASCENDING)],
                                          name="notification_claim")
        # GET /tasks filtered by status or url: the window of a page holds
        # only matching entries, however rare the status or the url.
        await self.tasks.create_index([("status", ASCENDING), ("created_at", DESCENDING)],
                                      name="list_status")
        await self.tasks.create_index([("url", ASCENDING), ("created_at", DESCENDING)],
                                      name="list_url")
        # GET /tasks of one API key. Sparse: anonymous tasks have no owner.
        await self.tasks.create_index([("owner", ASCENDING), ("created_at", DESCENDING)],
                                      name="list_owner", sparse=True)
        await self.idempotency.create_index("created_at", name="expiry",
                                            expireAfterSeconds=int(idempotency_ttl))
        await self._ensure_retention(task_ttl_days)
        await self._ensure_collections()

    async def _ensure_collections(self) -> None:
        """Create now the collections written only later (``inflight`` once a
        download has run a second, ``files`` at a first end): SecantusDB
        killed while creating one leaves a table it cannot open at its
        restart (test_hardening_db's kills under load caught it once
        ``inflight`` stopped being written at every submit)."""
        existing = set(await self.db.list_collection_names())
        for coll in (self.inflight, self.files):
            if coll.name not in existing:
                try:
                    await self.db.create_collection(coll.name)
                except CollectionInvalid:
                    pass  # another process made it meanwhile

    async def _ensure_claim_index(self) -> None:
        """The claim index gained ``lane``. A database from before that has
        the old one, and unfinished tasks without a lane, which the claim
        would never see: put them in lane 0 (once, at the upgrade)."""
        existing = (await self.tasks.index_information()).get("claim")
        if existing is not None and [(k, int(v)) for k, v in existing["key"]] != CLAIM_KEY:
            await self.tasks.drop_index("claim")
            await self.tasks.update_many(
                {"status": {"$in": [Status.QUEUED, Status.RUNNING]},
                 "lane": {"$exists": False}},
                {"$set": {"lane": 0}})
        await self.tasks.create_index(CLAIM_KEY, name="claim")

    async def _ensure_retention(self, task_ttl_days: float | None) -> None:
        """TASK_TTL_DAYS as TTL indexes: the database deletes finished tasks
        by itself (unfinished ones, without finished_at, stay), and the
        files' records (max_age) as old: a record names a file's URL and the
        task it came from, and must not outlive the task's retention."""
        wanted = None if task_ttl_days is None else int(task_ttl_days * 86400)
        await _ensure_ttl(self.tasks, "retention", "finished_at", wanted)
        await _ensure_ttl(self.files, "retention", "at", wanted)


async def _ensure_ttl(coll: AsyncCollection, name: str, field: str, seconds: int | None) -> None:
    existing = (await coll.index_information()).get(name)
    if existing is not None and existing.get("expireAfterSeconds") != seconds:
        await coll.drop_index(name)
        existing = None
    if seconds is not None and existing is None:
        await coll.create_index(field, name=name, expireAfterSeconds=seconds)
