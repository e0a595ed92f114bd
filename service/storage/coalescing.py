"""One download for every submit of the same file while it is in flight.

The key is the normalized URL and the digests asked for
(model.same_file). A *leader* is an ordinary task. A *follower* is stored
queued with ``follows: <leader id>`` and no ``lease_until``, so no claim
ever takes it (claims scan ``lease_until`` windows), and then its id is
``$push``ed to the leader's own ``followers`` list on condition that the
leader has not ended (``join``). The leader's end is conditioned on the
list it last read (``TaskQueue.finish``), so a follower is either in the
list that end settles or was refused by the join's condition and runs on
its own: a submit made once the leader is seen done never gets a
download fetched before it was made.

Finding the leader costs no write:

- An API process remembers the leaders it stored (file key -> a future
  of the leader's id, set before the leader's insert, so that concurrent
  submits of one file wait for the first and follow it), and forgets
  each when a worker reports its end (``ended``).
- Across processes, a worker registers a download that has run a second
  in ``inflight`` (``{_id: key, leader, created_at}``) and removes it when
  the download ends (``register``, ``unregister``). A submit this process
  knows no leader for reads it while its task is stored, as a leader, in
  batches (``Election.found``); a task stored so whose file another
  process's download turns out to be fetching is made a follower before
  any worker is told of it (``demote``). Small files, most of a burst,
  end before their first second: neither write (before, every submit
  inserted an entry and every end deleted it, a fifth of the database's
  CPU in a burst). Submits of one file through two API processes within
  its first second may each download it: a second download, never a
  wrong answer.
- Both are hints: one whose leader has ended fails the join's condition,
  and the task runs on its own.

Once the end is written, the worker ends every follower with the
leader's result in one bulk write (``settle_followers``): same digests,
same error, each task verified against its own expected checksum and
mailed to its own address. A cancelled leader hands its place to its
oldest follower still waiting, which becomes runnable; the others follow
it. A crash between those steps leaves a follower whose leader has ended,
or an entry whose leader has ended: ``sweep`` (every worker, twice a
minute) ends or frees them, so none waits forever. Entries written by
the version before (which listed the followers in the entry) are settled
by the same sweep.

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
from service.storage.batching import ENOUGH, INSERT_LINGER, Batcher
from service.storage.conditional import only_if
from service.storage.counters import TaskCounters
from service.storage.database import Collections, utcnow
from service.storage.queue_docs import held_test, literal

# An entry older than this whose leader has ended (or never got stored) is
# a leftover of a crash: a worker removes its own when the download ends.
_STALE = dt.timedelta(seconds=30)
# Leaders an API process remembers; beyond this the oldest are forgotten
# (their files' later submits then ask the database, or download again).
MAX_REMEMBERED = 100_000
# How long a submit waits for the one of its process that leads its file
# to be stored (one insert); past it, it goes on as a leader of its own.
_WAIT_FOR_LEADER = 30.0
_UNENDED = [str(Status.QUEUED), str(Status.RUNNING)]


class Election:
    """A submit's place in its file's coalescing. ``leader``: the task to
    follow, known before the task is stored; None: this task is stored
    as a leader, and ``found`` says (once it is stored) whether another
    process's download of the file leads after all. ``stored`` ends it."""

    def __init__(self, coalescer: Coalescer, key: str, leader: str | None,
                 own: asyncio.Future[str | None] | None = None,
                 lookup: asyncio.Future[str | None] | None = None):
        self._coalescer = coalescer
        self.key = key
        self.leader = leader
        self._own = own
        self._lookup = lookup

    async def found(self) -> str | None:
        """The leader registered by another process's worker; None when
        there is none, or the read failed (a second download at worst)."""
        if self._lookup is None:
            return None
        try:
            return await self._lookup
        except PyMongoError:
            return None

    def stored(self, leader: str | None) -> None:
        """Tell this process's submits waiting on this one which task to
        follow: the one that leads the file now, or None (nothing was
        stored: they lead their own)."""
        if self._lookup is not None:
            if not self._lookup.done():
                self._lookup.cancel()
            elif not self._lookup.cancelled():
                self._lookup.exception()  # a failed read not asked for: no warning
        if self._own is None or self._own.done():
            return
        self._own.set_result(leader)
        self._coalescer._settled(self.key, self._own, leader)


class Coalescer:
    def __init__(self, cols: Collections, counters: TaskCounters):
        self.inflight = cols.inflight
        self.tasks = cols.tasks
        self.counters = counters
        # An API process's leaders: file key -> the leader's id, once known.
        self._leaders: dict[str, asyncio.Future[str | None]] = {}
        self._key_of: dict[str, str] = {}  # leader id -> its file key
        # Every submit this process knows no leader for reads the entries,
        # batched like the tasks' own inserts.
        self._lookups: Batcher[str, str | None] = Batcher(
            self._registered_leaders, INSERT_LINGER, ENOUGH)
        # A worker's downloads it registered for other processes' submits.
        self._registered: set[str] = set()

    # -- at submit ------------------------------------------------------------

    async def elect(self, task: Task) -> Election:
        """The leader ``task`` follows, if this process knows of one (a
        submit of the same file being stored waits for it); otherwise
        ``task`` is to be stored as a leader, while the entries are read."""
        key = file_key(task.url, task.algorithms)
        for _ in range(3):
            known = self._leaders.get(key)
            if known is None:
                break
            try:
                leader = await asyncio.wait_for(asyncio.shield(known), _WAIT_FOR_LEADER)
            except TimeoutError:
                break
            if leader is not None:
                return Election(self, key, leader)
            # Never stored (refused, say): the next waiting submit leads.
        own: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._remember(key, own)
        lookup = asyncio.ensure_future(self._lookups.submit(key))
        return Election(self, key, None, own, lookup)

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

    async def join(self, task: Task, leader: str) -> bool:
        """Add a stored follower to its leader's list. False (and the task
        made runnable on its own, the file's leader from now on) when the
        leader has ended meanwhile."""
        result = await self.tasks.update_one(
            {"_id": leader, "status": {"$in": _UNENDED}, "follows": None},
            {"$push": {"followers": task.id}})
        if result.matched_count:
            return True
        await self._free([task.id], leader)
        self.ended(leader)
        key = file_key(task.url, task.algorithms)
        if key not in self._leaders:
            now_leads: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
            now_leads.set_result(task.id)
            self._remember(key, now_leads)
            self._settled(key, now_leads, task.id)
        return False

    def ended(self, task_id: str) -> None:
        """A task has ended (a worker said so, or this process cancelled
        it): no submit of this process follows it any more."""
        key = self._key_of.pop(task_id, None)
        if key is None:
            return
        known = self._leaders.get(key)
        if known is not None and known.done() and known.result() == task_id:
            del self._leaders[key]

    def _remember(self, key: str, leader: asyncio.Future[str | None]) -> None:
        self._leaders.pop(key, None)
        self._leaders[key] = leader
        while len(self._leaders) > MAX_REMEMBERED:
            oldest = next(iter(self._leaders))
            gone = self._leaders.pop(oldest)
            forgotten = gone.result() if gone.done() else None
            if forgotten is not None:
                self._key_of.pop(forgotten, None)

    def _settled(self, key: str, own: asyncio.Future[str | None], leader: str | None) -> None:
        if self._leaders.get(key) is not own:
            return
        if leader is None:
            del self._leaders[key]
        else:
            self._key_of[leader] = key

    async def _registered_leaders(self, keys: list[str]) -> list[str | None]:
        docs = await self.inflight.find({"_id": {"$in": list(set(keys))}},
                                        {"leader": 1}).to_list(None)
        leaders = {doc["_id"]: str(doc["leader"]) for doc in docs}
        return [leaders.get(key) for key in keys]

    # -- while the leader downloads -------------------------------------------

    async def register(self, task: Task) -> None:
        """A download that has run a while: let other API processes'
        submits of its file find it. One entry per file: a live leader's
        stays, an ended one's is replaced."""
        if task.id in self._registered:
            return
        key = file_key(task.url, task.algorithms)
        entry = {"_id": key, "leader": task.id, "created_at": utcnow()}
        try:
            await self.inflight.insert_one(entry)
        except DuplicateKeyError:
            doc = await self.inflight.find_one({"_id": key}, {"leader": 1})
            if doc is None or doc["leader"] == task.id:
                self._registered.add(task.id)
                return
            other = await self.tasks.find_one({"_id": doc["leader"]}, {"status": 1})
            if other is not None and not Status(other["status"]).finished:
                return  # another download of the file, found first
            replaced = await self.inflight.replace_one(
                {"_id": key, "leader": doc["leader"]}, entry)
            if not replaced.matched_count:
                return
        self._registered.add(task.id)

    async def unregister(self, task: Task) -> None:
        """The download has ended (or is no longer this worker's): its
        entry goes, if it registered one."""
        if task.id not in self._registered:
            return
        self._registered.discard(task.id)
        await self.inflight.delete_one(
            {"_id": file_key(task.url, task.algorithms), "leader": task.id})

    # -- when the leader ends -------------------------------------------------

    async def settle_followers(self, leader: Task, followers: list[str]) -> int:
        """End (or, the leader cancelled, free) ``followers`` of ``leader``,
        whose end is written; how many. One still waiting for a leader not
        yet ended is left to the sweep."""
        return await self._settle(followers, leader.id) if followers else 0

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
        leads now, and the others follow it. They are pointed at it before
        it may run, so that its end finds them in its list."""
        waiting = await self.tasks.find(
            {"_id": {"$in": followers}, "status": str(Status.QUEUED), "follows": leader_id},
            sort=[("created_at", 1)]).to_list(None)
        if not waiting:
            return 0
        heir, rest = str(waiting[0]["_id"]), [doc["_id"] for doc in waiting[1:]]
        if rest:
            await self.tasks.update_many(
                {"_id": {"$in": rest}, "status": str(Status.QUEUED), "follows": leader_id},
                {"$set": {"follows": heir}})
        await self.tasks.update_one(
            {"_id": heir, "status": str(Status.QUEUED), "follows": leader_id},
            {"$set": {"follows": None, "lease_until": utcnow(), "followers": rest}})
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
                    # An entry of the version before lists its followers.
                    listed = list(entry.get("followers") or [])
                    done += await self._settle(listed, entry["leader"]) if listed else 0
        # Followers whose leader ended without settling them (a crash
        # between the end and the settle, or between their insert and
        # their join) wait for a leader that will not settle them.
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
