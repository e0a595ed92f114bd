"""One download for every submit of the same file while it is in flight.

The registry (collection ``inflight``) holds one entry per file being
fetched, ``{_id: file key, leader: task id, followers: [task ids]}``; the
key is the normalized URL and the digests asked for (model.same_file).

- A submit first tries to insert the entry naming itself: the database's
  unique ``_id`` elects one leader among any number of concurrent submits.
  The leader is an ordinary task. Unless another submit of the same API
  process is electing for the file, the election runs while the task is
  stored (``elect_early``), as a leader: one database round trip on the
  submit's path, not two. A task stored so whose election was lost (to a
  submit of another process) is made a follower before any worker is
  told of it (``demote``); should a worker have found it first, it runs
  on its own.
- A submit that finds an entry stores its task as a *follower*: queued,
  ``follows: <leader id>`` and no ``lease_until``, so no claim ever takes it
  (claims scan ``lease_until`` windows). Then it adds its id to the entry,
  on condition that the entry still names that leader; if the leader has
  ended meanwhile, the task is made runnable on its own instead.
- When the leader's download ends, its worker removes the entry before
  it writes the end (``release``), so that a submit made once the task is
  seen done starts a download of its own instead of joining one that has
  ended. Nobody followed most leaders: their entries go in one delete on
  condition of an empty list, shared by the leaders that end together.
  Otherwise a read, then a delete on condition that the list it read is
  still the list, so a follower is either in that list or was refused by
  the join's condition. Once the end is written, the worker ends every
  follower with the leader's result in one bulk write
  (``settle_followers``): same digests, same error, each task verified
  against its own expected checksum and mailed to its own address.
- A cancelled leader hands its place to its oldest follower still waiting,
  which becomes runnable; the others follow it.
- A crash between those steps leaves a follower whose leader has ended, or
  an entry whose leader has ended or never got stored: ``sweep`` (every
  worker, twice a minute) ends or frees them, so none waits forever.

Manifest lines neither lead nor follow: a manifest counts its own lines.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from pymongo import UpdateOne
from pymongo.errors import DuplicateKeyError, PyMongoError

from service.model.digests import mismatch
from service.model.same_file import file_key
from service.model.task import Status, Task
from service.storage.batching import END_LINGER, Batcher, InsertBatcher
from service.storage.conditional import only_if
from service.storage.counters import TaskCounters
from service.storage.database import Collections, utcnow
from service.storage.queue_docs import held_test, literal

# An entry older than this whose leader has ended (or never got stored) is
# a leftover of a crash: a submit stores its task within seconds.
_STALE = dt.timedelta(seconds=30)


class Coalescer:
    def __init__(self, cols: Collections, counters: TaskCounters):
        self.inflight = cols.inflight
        self.tasks = cols.tasks
        self.counters = counters
        # Every submit elects: batched like the tasks' own inserts, a burst
        # of them costs the database a few writes, not one each.
        self._elections = InsertBatcher(cols.inflight)
        self._lone_ends: Batcher[tuple[str, str], bool] = Batcher(
            self._delete_unfollowed, END_LINGER)
        # File keys whose election a submit of this process runs early.
        self._early: dict[str, asyncio.Future[str | None]] = {}

    # -- at submit ------------------------------------------------------------

    async def elect(self, task: Task) -> str | None:
        """Make ``task`` the leader for its file, or return the id of the
        task that already is (then store ``task`` with ``follow``)."""
        key = file_key(task.url, task.algorithms)
        for _ in range(3):
            try:
                await self._elections.insert({"_id": key, "leader": task.id,
                                              "followers": [], "created_at": utcnow()})
                return None
            except DuplicateKeyError:
                doc = await self.inflight.find_one({"_id": key}, {"leader": 1})
                if doc is not None:
                    return str(doc["leader"])
                # Released between our insert and our read: try again.
        return None  # a file finishing over and over: run this one alone

    def elect_early(self, task: Task) -> asyncio.Future[str | None] | None:
        """Start ``elect`` for a submit that stores ``task`` meanwhile, as a
        leader; None when a submit of this process is doing so for the same
        file (that one likely leads: elect first and store a follower).
        End with ``early_done``."""
        key = file_key(task.url, task.algorithms)
        if key in self._early:
            return None
        election = self._early[key] = asyncio.ensure_future(self.elect(task))
        return election

    def early_done(self, task: Task, election: asyncio.Future[str | None]) -> None:
        key = file_key(task.url, task.algorithms)
        if self._early.get(key) is election:
            del self._early[key]

    @staticmethod
    async def outcome(election: asyncio.Future[str | None]) -> str | None:
        """The leader an early election found; None when this task leads,
        or when the election failed (then it runs on its own: a leader
        whose entry may be missing settles nobody, which is nobody lost)."""
        try:
            return await election
        except PyMongoError:
            return None

    async def demote(self, task: Task, leader: str) -> bool:
        """``task``, stored to lead (queued, or assigned to a worker not yet
        told), follows ``leader`` instead; False when that is no longer
        its state (a worker's scan took it, or it was cancelled)."""
        if task.status == Status.RUNNING:
            test = held_test(task, task.worker or "")
        else:
            test = {"$and": [{"$eq": ["$status", str(Status.QUEUED)]},
                             {"$eq": [{"$ifNull": ["$claim", None]}, None]},
                             {"$eq": [{"$ifNull": ["$follows", None]}, None]}]}
        changes = {"status": str(Status.QUEUED), "worker": None, "claim": None, "attempts": 0,
                   "started_at": None, "claimed_at": None, "follows": leader,
                   "lease_until": None}
        result = await self.tasks.update_one(
            {"_id": task.id}, only_if(test, literal(changes)))
        if not result.modified_count:
            return False
        if task.status == Status.RUNNING:
            self.counters.count(queued=1)
        task.unassign()
        task.follow(leader)
        return True

    async def abandon(self, task: Task, leader_id: str) -> None:
        """The elected leader was never stored (refused by a quota, or an
        idempotent retry of a task that exists already). Best effort: the
        sweep frees whoever joined meanwhile, should this fail."""
        try:
            doc = await self.inflight.find_one_and_delete(
                {"_id": file_key(task.url, task.algorithms), "leader": leader_id})
            if doc and doc["followers"]:
                await self._hand_over(list(doc["followers"]), leader_id)
        except PyMongoError:
            pass

    async def join(self, task: Task, leader: str) -> bool:
        """Add a stored follower to its leader's entry. False (and the task
        made runnable on its own) when the leader has ended meanwhile."""
        result = await self.inflight.update_one(
            {"_id": file_key(task.url, task.algorithms), "leader": leader},
            {"$push": {"followers": task.id}})
        if result.matched_count:
            return True
        await self._free([task.id], leader)
        return False

    # -- when the leader ends -------------------------------------------------

    async def settle(self, leader: Task) -> int:
        """End the followers of a leader that has ended (done, failed or
        cancelled); how many were ended or freed."""
        return await self.settle_followers(leader, await self.release(leader))

    async def release(self, leader: Task) -> list[str]:
        """Remove ``leader``'s entry, so that no submit joins it any more;
        the followers it had."""
        key = file_key(leader.url, leader.algorithms)
        if await self._lone_ends.submit((key, leader.id)):
            return []
        while True:
            # A read and a delete on condition that no follower joined in
            # between: SecantusDB's find-and-modify costs ten times both.
            doc = await self.inflight.find_one({"_id": key, "leader": leader.id})
            if doc is None:
                return []
            followers = list(doc["followers"])
            gone = await self.inflight.delete_one(
                {"_id": key, "leader": leader.id, "followers": followers})
            if gone.deleted_count:
                return followers

    async def settle_followers(self, leader: Task, followers: list[str]) -> int:
        """End (or, the leader cancelled, free) ``followers`` of ``leader``,
        whose end is written; how many. One still waiting for a leader not
        yet ended is left to the sweep."""
        return await self._settle(followers, leader.id) if followers else 0

    async def _delete_unfollowed(self, ends: list[tuple[str, str]]) -> list[bool]:
        """Delete the entries of ended leaders nobody follows, in one write;
        for each, whether its entry is gone (False: it has followers)."""
        keys = [key for key, _ in ends]
        gone = await self.inflight.delete_many(
            {"_id": {"$in": keys}, "leader": {"$in": [leader for _, leader in ends]},
             "followers": []})
        if gone.deleted_count == len(ends):
            return [True] * len(ends)
        left = {d["_id"]: d["leader"] for d in await self.inflight.find(
            {"_id": {"$in": keys}}, {"leader": 1}).to_list(None)}
        return [left.get(key) != leader for key, leader in ends]

    async def _settle(self, followers: list[str], leader_id: str) -> int:
        ended = await self.tasks.find_one({"_id": leader_id})
        if ended is None or Status(ended["status"]) == Status.CANCELLED:
            return await self._hand_over(followers, leader_id)
        leader = Task.from_doc(ended)
        if not leader.status.finished:
            return 0
        waiting = await self.tasks.find(
            {"_id": {"$in": followers}, "status": str(Status.QUEUED), "follows": leader.id},
        ).to_list(None)
        now = utcnow()
        writes = [UpdateOne({"_id": doc["_id"], "status": str(Status.QUEUED),
                             "follows": leader.id},
                            {"$set": _result_of(Task.from_doc(doc), leader, now)})
                  for doc in waiting]
        if not writes:
            return 0
        result = await self.tasks.bulk_write(writes, ordered=False)
        self.counters.count(queued=-result.modified_count)
        return result.modified_count

    async def _hand_over(self, followers: list[str], leader_id: str) -> int:
        """The leader was cancelled (or lost): its oldest waiting follower
        leads now, under a new entry, and the others follow it."""
        waiting = await self.tasks.find(
            {"_id": {"$in": followers}, "status": str(Status.QUEUED), "follows": leader_id},
            sort=[("created_at", 1)]).to_list(None)
        if not waiting:
            return 0
        heir, rest = Task.from_doc(waiting[0]), [doc["_id"] for doc in waiting[1:]]
        await self._free([heir.id], leader_id)
        if rest:
            try:
                await self.inflight.insert_one({
                    "_id": file_key(heir.url, heir.algorithms), "leader": heir.id,
                    "followers": rest, "created_at": utcnow()})
            except DuplicateKeyError:
                # A new submit leads already: the rest run on their own.
                await self._free(rest, leader_id)
            else:
                await self.tasks.update_many(
                    {"_id": {"$in": rest}, "status": str(Status.QUEUED), "follows": leader_id},
                    {"$set": {"follows": heir.id}})
        return len(waiting)

    async def _free(self, task_ids: list[str], leader_id: str) -> None:
        """Followers become ordinary queued tasks, runnable now."""
        await self.tasks.update_many(
            {"_id": {"$in": task_ids}, "status": str(Status.QUEUED), "follows": leader_id},
            {"$set": {"follows": None, "lease_until": utcnow()}})

    # -- after a crash ---------------------------------------------------------

    async def sweep(self) -> int:
        """End or free followers whose leader ended without settling them,
        and drop entries whose leader ended or was never stored."""
        done = 0
        cutoff = utcnow() - _STALE
        async for entry in self.inflight.find({"created_at": {"$lt": cutoff}}):
            leader = await self.tasks.find_one({"_id": entry["leader"]}, {"status": 1})
            if leader is None or Status(leader["status"]).finished:
                if (await self.inflight.delete_one({"_id": entry["_id"],
                                                    "leader": entry["leader"]})).deleted_count:
                    done += await self._settle(list(entry["followers"]), entry["leader"])
        # Followers that never made it into an entry (a crash between their
        # insert and their join) wait for a leader that will not settle them.
        orphans = await self.tasks.find(
            {"status": str(Status.QUEUED), "lease_until": None, "created_at": {"$lt": cutoff}},
            {"follows": 1}).to_list(None)
        by_leader: dict[str, list[str]] = {}
        for doc in orphans:
            if doc.get("follows"):
                by_leader.setdefault(doc["follows"], []).append(doc["_id"])
        for leader_id, ids in by_leader.items():
            leader = await self.tasks.find_one({"_id": leader_id}, {"status": 1})
            if leader is None or Status(leader["status"]).finished:
                done += await self._settle(ids, leader_id)
        return done


def _result_of(follower: Task, leader: Task, now: dt.datetime) -> dict[str, Any]:
    """A follower's end: the leader's download, judged by the follower's
    own expected checksum."""
    fields: dict[str, Any] = {
        "finished_at": now, "started_at": leader.started_at, "lease_until": None,
        "bytes_done": leader.bytes_done, "bytes_total": leader.bytes_total,
        "server_digest": leader.server_digest.to_doc() if leader.server_digest else None}
    digests = leader.digests
    if digests and not (leader.error and leader.error.code != "mismatch"):
        wrong = mismatch(follower.expected, digests) if follower.expected else None
        fields.update(status=str(Status.FAILED if wrong else Status.DONE), digests=digests,
                      md5=None if wrong else digests.get("md5"),
                      verified=None if follower.expected is None else not wrong,
                      error={"code": "mismatch", "message": wrong} if wrong else None)
    else:
        error = leader.error.to_doc() if leader.error else {
            "code": "internal", "message": "the download this task shared ended without a result"}
        fields.update(status=str(Status.FAILED), error=error)
    if follower.mail_pending:
        fields["notification.next_at"] = now  # the mail is due now
    if follower.callback_pending:
        fields["callback.next_at"] = now  # and so is the webhook
    return fields
