"""Tasks in MongoDB: the record of every task and the queue workers claim from.

A task moves queued -> running -> done | failed. ``lease_until`` does double
duty: for a queued task it is the earliest time it may run (now, or later
after a retry back-off); for a running task it is when its worker's lease
expires. One index on (status, lane, lease_until) therefore serves every
claim.

``lane`` keeps one client's backlog from starving everyone else: a task's
lane comes from how many unfinished tasks its client already had when it was
submitted (``lane_for``), and claims take the lowest lane with runnable work
first. So every client's first few tasks go before anyone's hundredth,
which is round-robin across clients at the granularity of the lanes, with
no per-client state in the database to keep right.

Claims find a candidate with an indexed ``find_one`` and then take it with a
conditional ``update_one`` on ``_id`` plus the values just read, because
``find_one_and_update`` with a non-``_id`` filter gets slower as the
collection grows on SecantusDB (see the design's known traps). A lost race
just means trying the next candidate.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import random
import time
import uuid
from typing import Any, Awaitable, Callable

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from service.config import Config
from service.storage.batching import InsertBatcher

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"

# notification.status values
NOTE_NONE, NOTE_PENDING, NOTE_SENT, NOTE_FAILED, NOTE_SKIPPED = (
    "none", "pending", "sent", "failed", "skipped")


def utcnow() -> dt.datetime:
    # Millisecond precision: BSON dates hold no more, and the claim's
    # compare-and-set must compare equal to what it read back.
    now = dt.datetime.now(dt.timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _after(seconds: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=seconds)


_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
_WINDOW = dt.timedelta(milliseconds=50)
_CURSOR_MARGIN = dt.timedelta(seconds=2)
_RESCAN_EVERY = dt.timedelta(seconds=60)
# How long scanned candidates are used before the lanes are scanned again: a
# cached list of one client's backlog must not keep a newer task in a lower
# lane waiting for longer than this.
_CANDIDATE_TTL = 0.25

# Lane of a task whose client had fewer than LANE_LIMITS[i] unfinished
# tasks at submit: i. Each lane costs idle claims a few cheap queries, so
# there are few of them.
LANE_LIMITS = (4, 64)
LANES = len(LANE_LIMITS) + 1
_CLAIM_KEY = [("status", ASCENDING), ("lane", ASCENDING), ("lease_until", ASCENDING)]


def lane_for(pending: int) -> int:
    """The lane of a new task whose client has ``pending`` unfinished ones."""
    for lane, limit in enumerate(LANE_LIMITS):
        if pending < limit:
            return lane
    return len(LANE_LIMITS)


# The shared counters document (collection ``stats``) and how often its
# counts are checked against the tasks themselves.
STATS_ID = "tasks"
RECONCILE_EVERY = dt.timedelta(minutes=10)
RECONCILE_LEASE = dt.timedelta(minutes=2)
FLUSH_DELAY = 0.1


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before for a different request."""


def connect(uri: str, **kwargs: Any) -> AsyncMongoClient:
    # tz_aware: datetimes come back as aware UTC, so comparisons and
    # compare-and-set guards round-trip exactly.
    options = dict(serverSelectionTimeoutMS=5000, connectTimeoutMS=5000,
                   tz_aware=True, appname="md5-light")
    options.update(kwargs)
    return AsyncMongoClient(uri, **options)


def open_store(config: "Config", uri: str, **client_options: Any) -> "TaskStore":
    """The one way every role builds its store from the configuration."""
    return TaskStore(connect(uri, **client_options), max_attempts=config.max_attempts,
                     lease_seconds=config.lease_seconds,
                     idempotency_ttl=config.idempotency_ttl,
                     task_ttl_days=config.task_ttl_days)


class TaskStore:
    def __init__(self, client: AsyncMongoClient, max_attempts: int = 3,
                 lease_seconds: float = 30.0, idempotency_ttl: float = 86400.0,
                 task_ttl_days: float | None = None):
        self.client = client
        self.db = client.get_default_database("md5light")
        self.tasks = self.db["tasks"]
        self.idempotency = self.db["idempotency"]
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self.idempotency_ttl = idempotency_ttl
        self.task_ttl_days = task_ttl_days
        self._inserts = InsertBatcher(self.tasks)
        self._cursors: dict[int, dt.datetime] = {}
        self._cursor_reset = _EPOCH
        self._candidates: list[dict] = []
        self.stats = self.db["stats"]
        self._tally: dict[str, int] = {}
        self._flusher: asyncio.Task | None = None
        self._scanned_at = 0.0

    async def ensure_indexes(self) -> None:
        await self._ensure_claim_index()
        await self.tasks.create_index([("client", ASCENDING), ("status", ASCENDING)],
                                      name="client")
        await self.tasks.create_index([("notification.status", ASCENDING),
                                       ("notification.next_at", ASCENDING)],
                                      name="notification_claim")
        await self.tasks.create_index([("created_at", DESCENDING)], name="history")
        await self.idempotency.create_index("created_at", name="expiry",
                                            expireAfterSeconds=int(self.idempotency_ttl))
        await self._ensure_retention()

    async def _ensure_claim_index(self) -> None:
        """The claim index gained ``lane``. A database from before that has
        the old one, and unfinished tasks without a lane, which the claim
        would never see: put them in lane 0 (once, at the upgrade)."""
        existing = (await self.tasks.index_information()).get("claim")
        if existing is not None and [(k, int(v)) for k, v in existing["key"]] != _CLAIM_KEY:
            await self.tasks.drop_index("claim")
            await self.tasks.update_many(
                {"status": {"$in": [QUEUED, RUNNING]}, "lane": {"$exists": False}},
                {"$set": {"lane": 0}})
        await self.tasks.create_index(_CLAIM_KEY, name="claim")

    async def _ensure_retention(self) -> None:
        """TASK_TTL_DAYS as a TTL index on finished_at: the database deletes
        finished tasks by itself; unfinished ones (no finished_at) stay."""
        wanted = None if self.task_ttl_days is None else int(self.task_ttl_days * 86400)
        existing = (await self.tasks.index_information()).get("retention")
        if existing is not None and existing.get("expireAfterSeconds") != wanted:
            await self.tasks.drop_index("retention")
            existing = None
        if wanted is not None and existing is None:
            await self.tasks.create_index("finished_at", name="retention",
                                          expireAfterSeconds=wanted)

    async def ping(self) -> None:
        await self.db.command("ping")

    # -- API side -------------------------------------------------------

    async def create(self, url: str, email: str | None, notify: bool,
                     idempotency_key: str | None = None, client: str | None = None,
                     admit: Callable[[], Awaitable[int]] | None = None) -> str:
        """Store a new task. ``admit`` is asked only when the task is new
        (not an idempotent retry): it raises to refuse the task or returns
        its lane."""
        new_id = task_id = str(uuid.uuid4())
        if idempotency_key:
            task_id = await self._reserve_key(idempotency_key, task_id, url, email)
        lane = 0
        if admit is not None and task_id == new_id:
            try:
                lane = await admit()
            except Exception:
                if idempotency_key:
                    # Refused: the key must not point at a task never stored.
                    await self.idempotency.delete_one({"_id": idempotency_key,
                                                       "task_id": task_id})
                raise
        now = utcnow()
        doc = {
            "_id": task_id, "url": url, "email": email, "client": client, "lane": lane,
            "status": QUEUED,
            "md5": None, "error": None, "bytes_done": 0, "bytes_total": None,
            "attempts": 0, "lease_until": now, "worker": None,
            "created_at": now, "started_at": None, "finished_at": None,
            "notification": {
                "status": NOTE_NONE if not email else (NOTE_PENDING if notify else NOTE_SKIPPED),
                "attempts": 0, "error": None, "sent_at": None, "next_at": None},
        }
        try:
            await self._inserts.insert(doc)
        except DuplicateKeyError:
            # Only an idempotent retry reuses an id; its task is already there.
            return task_id
        self._count(queued=1, total=1)
        return task_id

    async def _reserve_key(self, key: str, task_id: str, url: str, email: str | None) -> str:
        now = utcnow()
        try:
            await self.idempotency.insert_one(
                {"_id": key, "task_id": task_id, "url": url, "email": email, "created_at": now})
            return task_id
        except DuplicateKeyError:
            pass
        existing = await self.idempotency.find_one({"_id": key})
        if existing is None:  # expired between the two calls
            return await self._reserve_key(key, task_id, url, email)
        if existing["created_at"] < now - dt.timedelta(seconds=self.idempotency_ttl):
            result = await self.idempotency.update_one(
                {"_id": key, "created_at": existing["created_at"]},
                {"$set": {"task_id": task_id, "url": url, "email": email, "created_at": now}})
            return task_id if result.modified_count else await self._reserve_key(
                key, task_id, url, email)
        if existing["url"] != url or existing.get("email") != email:
            raise IdempotencyConflict()
        return existing["task_id"]

    async def get(self, task_id: str) -> dict | None:
        return await self.tasks.find_one({"_id": task_id})

    # -- counts for /metrics --------------------------------------------
    #
    # SecantusDB counts by reading every match, and even the collection's
    # size by reading every document (20,000 queued: 450 ms to count them,
    # 140 ms for estimated_document_count). So the queue depth and the
    # number of tasks stored are counters in one ``stats`` document: each
    # process adds up its own changes (submits, claims, requeues) in memory
    # and writes them with one $inc a tenth of a second later, together
    # with whatever else changed meanwhile (at most ten writes a second per
    # process, whatever the load; a failed write is retried). Changes a crash
    # loses, and tasks the TTL index deletes, are corrected by a recount
    # every RECONCILE_EVERY, done by one process at a time. Running tasks
    # are few (at most the workers' concurrency), so they are counted.

    def _count(self, **deltas: int) -> None:
        for name, delta in deltas.items():
            self._tally[name] = self._tally.get(name, 0) + delta
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_soon(), context=contextvars.Context())

    async def _flush_soon(self) -> None:
        # A short wait, so that the changes of a burst go in one write.
        try:
            await asyncio.sleep(FLUSH_DELAY)
            await self.flush_counts()
        except PyMongoError:
            pass  # kept; the next change or the periodic flush writes them
        finally:
            self._flusher = None

    async def flush_counts(self) -> None:
        """Write this process's count changes; kept for the next flush if
        the database cannot take them now."""
        deltas, self._tally = self._tally, {}
        deltas = {k: v for k, v in deltas.items() if v}
        if not deltas:
            return
        try:
            await self.stats.update_one({"_id": STATS_ID}, {"$inc": deltas}, upsert=True)
        except BaseException:
            for name, delta in deltas.items():
                self._tally[name] = self._tally.get(name, 0) + delta
            raise

    async def task_counts(self) -> tuple[dict[str, int], bool]:
        """Running tasks and, once a recount has set the counters, queued
        and stored tasks; and whether a recount is due. Costs the same at
        any queue depth."""
        await self.flush_counts()  # this API's own submits show at once
        doc = await self.stats.find_one({"_id": STATS_ID}) or {}
        counts = {RUNNING: await self.tasks.count_documents({"status": RUNNING})}
        if doc.get("reconciled_at") is None:
            return counts, True
        counts.update(queued=max(0, doc.get("queued", 0)), total=max(0, doc.get("total", 0)))
        return counts, doc["reconciled_at"] < utcnow() - RECONCILE_EVERY

    async def reconcile_counts(self) -> bool:
        """Recount queued and stored tasks (reads them all) and correct the
        counters by the difference, so that changes other processes write
        meanwhile are kept. False if another process is already at it."""
        await self.flush_counts()
        now = utcnow()
        try:
            before = await self.stats.find_one_and_update(
                {"_id": STATS_ID, "$or": [{"reconciling_until": None},
                                          {"reconciling_until": {"$lt": now}}]},
                {"$set": {"reconciling_until": now + RECONCILE_LEASE}},
                upsert=True, return_document=ReturnDocument.AFTER)
        except DuplicateKeyError:
            return False
        queued = await self.tasks.count_documents({"status": QUEUED})
        total = await self.tasks.estimated_document_count()
        await self.stats.update_one(
            {"_id": STATS_ID},
            {"$inc": {"queued": queued - before.get("queued", 0),
                      "total": total - before.get("total", 0)},
             "$set": {"reconciled_at": utcnow(), "reconciling_until": None}})
        return True

    async def pending_of(self, client: str) -> int:
        """Unfinished tasks of one client (indexed; costs in proportion to
        their number, about 25 ms at 1,000 on SecantusDB)."""
        return await self.tasks.count_documents(
            {"client": client, "status": {"$in": [QUEUED, RUNNING]}})

    async def queued_count(self) -> int:
        """Queued tasks in all: the counter /metrics reads, or, before the
        first recount has set it, a count that reads the whole queue."""
        counts, _ = await self.task_counts()
        if "queued" in counts:
            return counts["queued"]
        return await self.tasks.count_documents({"status": QUEUED})

    # -- worker side ----------------------------------------------------

    async def claim(self, worker: str, limit: int = 1) -> list[dict]:
        """Take up to ``limit`` runnable tasks for ``worker``.

        Queued tasks come first, the lowest lane first and in it the oldest
        window; then
        running tasks whose worker stopped renewing its lease. A task whose
        workers died ``max_attempts`` times is failed rather than tried
        forever. New tasks are taken in one conditional ``update_many``:
        per task it costs a third of an ``update_one``, and it is one round
        trip instead of many.
        """
        taken: list[dict] = []
        for _ in range(20):
            if len(taken) >= limit:
                break
            now = utcnow()
            cands = await self._queued_candidates(now, limit - len(taken))
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
        return taken

    async def _claim_expired(self, worker: str, now: dt.datetime) -> dict | None:
        for _ in range(10):
            cand = await self.tasks.find_one({"status": RUNNING, "lease_until": {"$lt": now}})
            if cand is None:
                return None
            if cand.get("attempts", 0) >= self.max_attempts:
                await self._fail_abandoned(cand, now)
                continue
            got = await self._take(cand, worker, now)
            if got is not None:
                return got
        return None

    async def _take_fresh(self, cands: list[dict], worker: str,
                          now: dt.datetime) -> list[dict]:
        token = uuid.uuid4().hex
        changes = {"status": RUNNING, "worker": worker, "started_at": now, "claim": token,
                   "lease_until": now + dt.timedelta(seconds=self.lease_seconds)}
        ids = [c["_id"] for c in cands]
        result = await self.tasks.update_many(
            {"_id": {"$in": ids}, "status": QUEUED, "attempts": 0,
             "lease_until": {"$lte": now}},
            {"$set": changes, "$inc": {"attempts": 1}},
            # By _id: left to itself the planner may walk the claim index,
            # that is, the whole queue.
            hint=[("_id", ASCENDING)])
        if result.modified_count == 0:
            return []
        self._count(queued=-result.modified_count)
        if result.modified_count < len(ids):
            # Some went to another worker: ask which are ours.
            mine = {d["_id"] for d in await self.tasks.find(
                {"_id": {"$in": ids}, "claim": token}, {"_id": 1}).to_list(None)}
            cands = [c for c in cands if c["_id"] in mine]
        for cand in cands:
            cand.update(changes)
            cand["attempts"] = 1
        return cands

    async def _queued_candidates(self, now: dt.datetime, n: int) -> list[dict]:
        """Up to ``n`` queued tasks that look runnable, lowest lane first.

        They are found by scanning lease_until in small windows from a
        cursor, one per lane. SecantusDB reads every index match before it sorts or
        limits, so one query over the whole queue costs time in proportion
        to its depth (40 ms at 2,000 queued); a window that holds a few
        tasks costs under a millisecond, and empty windows grow fourfold,
        so even a cursor far behind reaches ``now`` in a few dozen cheap
        queries. Candidates are kept between calls: the claim's
        compare-and-set makes a stale one harmless, and ``_CANDIDATE_TTL``
        bounds how long they can hide a new task in a lower lane.
        """
        if not self._candidates or time.monotonic() - self._scanned_at > _CANDIDATE_TTL:
            await self._scan(now)
        out = []
        while self._candidates and len(out) < n:
            cand = self._candidates.pop()
            if cand["lease_until"] <= now:
                out.append(cand)
        return out

    async def _scan(self, now: dt.datetime) -> None:
        if not self._cursors or now - self._cursor_reset > _RESCAN_EVERY:
            # Now and then start from the beginning, for a task that
            # slipped behind the cursor (an API host with a slow clock).
            self._cursors = dict.fromkeys(range(LANES), _EPOCH)
            self._cursor_reset = now
        self._candidates, self._scanned_at = [], time.monotonic()
        for lane in range(LANES):
            self._candidates = await self._scan_lane(lane, now)
            if self._candidates:
                return

    async def _scan_lane(self, lane: int, now: dt.datetime) -> list[dict]:
        low, window = self._cursors[lane], _WINDOW
        while True:
            high = min(now, low + window)
            found = await self.tasks.find(
                {"status": QUEUED, "lane": lane,
                 "lease_until": {"$gte": low, "$lte": high}}).to_list(None)
            if found:
                found.sort(key=lambda d: d["lease_until"])
                self._cursors[lane] = found[0]["lease_until"]
                # Oldest window first, but within it each worker goes in its
                # own random order: workers holding the same list would
                # otherwise race for the same task at every step.
                found = found[:64]
                random.shuffle(found)
                return found
            if high >= now:
                # Nothing runnable from the cursor on. A task stamped before
                # the cursor but committed after the scan that set it (API
                # requests commit out of order under load) would be behind
                # it: step back by a margin, so the next scan finds it.
                self._cursors[lane] = min(self._cursors[lane], now - _CURSOR_MARGIN)
                return []
            low, window = high, window * 4

    async def _take(self, cand: dict, worker: str, now: dt.datetime) -> dict | None:
        changes: dict[str, Any] = {"status": RUNNING, "worker": worker,
                                   "lease_until": now + dt.timedelta(seconds=self.lease_seconds)}
        if cand.get("started_at") is None:
            changes["started_at"] = now
        result = await self.tasks.update_one(
            {"_id": cand["_id"], "status": cand["status"], "lease_until": cand["lease_until"]},
            {"$set": changes, "$inc": {"attempts": 1}})
        if not result.modified_count:
            return None
        if cand["status"] == QUEUED:
            self._count(queued=-1)
        cand.update(changes)
        cand["attempts"] = cand.get("attempts", 0) + 1
        return cand

    async def _fail_abandoned(self, cand: dict, now: dt.datetime) -> None:
        await self.tasks.update_one(
            {"_id": cand["_id"], "status": RUNNING, "lease_until": cand["lease_until"]},
            {"$set": self._finish_fields(cand, now, FAILED, error={
                "code": "worker_lost",
                "message": f"processing stopped unexpectedly {cand.get('attempts', 0)} times; "
                           "giving up"})})

    def _finish_fields(self, task: dict, now: dt.datetime, status: str,
                       md5: str | None = None, error: dict | None = None) -> dict:
        fields: dict[str, Any] = {"status": status, "md5": md5, "error": error,
                                  "finished_at": now, "lease_until": None}
        note = (task.get("notification") or {}).get("status")
        if note == NOTE_PENDING:
            fields["notification.next_at"] = now
        return fields

    async def renew(self, task_id: str, worker: str, bytes_done: int,
                    bytes_total: int | None) -> bool:
        """Extend the lease and record progress; False when the lease is lost."""
        result = await self.tasks.update_one(
            {"_id": task_id, "status": RUNNING, "worker": worker},
            {"$set": {"lease_until": _after(self.lease_seconds),
                      "bytes_done": bytes_done, "bytes_total": bytes_total}})
        return bool(result.matched_count)

    async def finish(self, task: dict, worker: str, md5: str | None = None,
                     error: dict | None = None, bytes_done: int | None = None,
                     bytes_total: int | None = None) -> bool:
        now = utcnow()
        fields = self._finish_fields(task, now, DONE if md5 else FAILED, md5=md5, error=error)
        if bytes_done is not None:
            fields["bytes_done"] = bytes_done
            fields["bytes_total"] = bytes_total
        result = await self.tasks.update_one(
            {"_id": task["_id"], "status": RUNNING, "worker": worker}, {"$set": fields})
        return bool(result.modified_count)

    async def retry_later(self, task: dict, worker: str, delay: float, error: dict,
                          count_attempt: bool = True) -> bool:
        """Put a running task back in the queue, runnable after ``delay``."""
        update: dict[str, Any] = {"$set": {"status": QUEUED, "worker": None,
                                           "lease_until": _after(delay), "error": error,
                                           "bytes_done": 0}}
        if not count_attempt:
            update["$inc"] = {"attempts": -1}
        result = await self.tasks.update_one(
            {"_id": task["_id"], "status": RUNNING, "worker": worker}, update)
        if result.modified_count:
            self._count(queued=1)
        return bool(result.modified_count)

    # -- notifications --------------------------------------------------

    async def claim_notification(self, worker: str, lease: float) -> dict | None:
        """Take a finished task whose mail is due. The claim pushes next_at
        forward by ``lease``, so a crashed sender's mail becomes due again."""
        for _ in range(20):
            now = utcnow()
            cand = await self.tasks.find_one(
                {"notification.status": NOTE_PENDING, "notification.next_at": {"$lte": now}},
                sort=[("notification.next_at", ASCENDING)])
            if cand is None:
                return None
            result = await self.tasks.update_one(
                {"_id": cand["_id"], "notification.status": NOTE_PENDING,
                 "notification.next_at": cand["notification"]["next_at"]},
                {"$set": {"notification.next_at": now + dt.timedelta(seconds=lease),
                          "notification.worker": worker},
                 "$inc": {"notification.attempts": 1}})
            if result.modified_count:
                cand["notification"]["attempts"] = cand["notification"].get("attempts", 0) + 1
                return cand
        return None

    async def notification_sent(self, task_id: str) -> None:
        await self.tasks.update_one(
            {"_id": task_id},
            {"$set": {"notification.status": NOTE_SENT, "notification.sent_at": utcnow(),
                      "notification.next_at": None, "notification.error": None}})

    async def notification_failed(self, task_id: str, error: str, retry_in: float | None) -> None:
        if retry_in is None:
            changes = {"notification.status": NOTE_FAILED, "notification.next_at": None}
        else:
            changes = {"notification.next_at": _after(retry_in)}
        changes["notification.error"] = error
        await self.tasks.update_one({"_id": task_id}, {"$set": changes})

    # -- worker liveness ------------------------------------------------

    async def heartbeat(self, worker: str, active: int, stuck: int = 0) -> None:
        await self.db["workers"].update_one(
            {"_id": worker},
            {"$set": {"heartbeat_at": utcnow(), "active": active, "stuck": stuck}},
            upsert=True)

    async def live_workers(self, within: float) -> tuple[int, list[str]]:
        """How many workers sent a heartbeat lately, and the names of those
        among them that report downloads making no progress."""
        since = utcnow() - dt.timedelta(seconds=within)
        live = await self.db["workers"].find(
            {"heartbeat_at": {"$gte": since}}, {"stuck": 1}).to_list(None)
        return len(live), sorted(w["_id"] for w in live if w.get("stuck"))
