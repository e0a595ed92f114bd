"""Many hosts, one database (#18): fencing, partitions, flapping links and
clock skew.

The first tests run in-process against the real embedded database: two
claimers, and the writes of a stale claim refused. The rest build hosts in
network namespaces (tests/netns.py): the database and the API on one, a
worker on each of two more, the file and mail servers on the bridge; and
they cut, flap and restore the links between them. They skip, saying why,
where ``ip netns`` is not permitted.
"""

from __future__ import annotations

import asyncio
import uuid

from service import config as config_mod
from service.model.task import HISTORY_LIMIT, Status, Task, TaskError
from service.model.views import task_view
from service.storage.store import open_store

# -- fencing, in-process ------------------------------------------------------


def _stores(mongo: str, lease: float = 0.5):
    config = config_mod.load(None, {"LEASE_SECONDS": str(lease), "MAX_ATTEMPTS": "20"})
    uri = f"{mongo}/t_fence_{uuid.uuid4().hex[:8]}"
    return open_store(config, uri), open_store(config, uri)


async def _expire(store, task_id: str) -> None:
    """Wait until the task's lease ran out on the database's clock."""
    for _ in range(100):
        doc = await store.cols.tasks.find_one({"_id": task_id})
        if doc["lease_until"] < store.clock.now():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"lease never expired: {doc}")


def test_a_stale_claim_writes_nothing(mongo):
    """A claims, goes silent past its lease, B takes the task over: A's
    renew, result and retry are all refused, B's result is the one kept,
    and the history tells who did what."""

    async def main():
        a, b = _stores(mongo)
        try:
            await a.ensure_indexes()
            await a.clock.sync()
            await b.clock.sync()
            created = Task.new("http://h.test/big", None, False)
            await a.records.create(created)
            [held_by_a] = await a.queue.claim("A", 1)
            assert held_by_a.claim and held_by_a.attempts == 1
            assert await a.queue.renew(held_by_a, "A", 10, 100)
            await _expire(a, created.id)
            [held_by_b] = await b.queue.claim("B", 1)
            assert held_by_b.id == created.id and held_by_b.attempts == 2
            assert held_by_b.claim not in (None, held_by_a.claim)

            assert not await a.queue.renew(held_by_a, "A", 99, 100)
            assert not await a.queue.finish(held_by_a, "A", md5="a" * 32)
            assert not await a.queue.retry_later(held_by_a, "A", 0, TaskError("timeout", "x"))
            doc = await a.cols.tasks.find_one({"_id": created.id})
            assert (doc["status"], doc["worker"], doc["bytes_done"]) == ("running", "B", 10)

            assert await b.queue.renew(held_by_b, "B", 50, 100)
            assert await b.queue.finish(held_by_b, "B", md5="b" * 32, bytes_done=100,
                                        bytes_total=100)
            done = await a.records.get(created.id)
            assert done.status == Status.DONE and done.md5 == "b" * 32
            view = task_view(done)
            assert [(h["worker"], h["outcome"]) for h in view["history"]] == \
                [("A", "lease_lost"), ("B", "done")]
            assert view["finished_by"] == "B" and view["attempts"] == 2
            assert all(h["started_at"] and h["ended_at"] for h in view["history"])
            assert "claim" not in str(view["history"])
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_the_same_worker_name_does_not_pass_the_fence(mongo):
    """Worker names can repeat (a restarted process on a host that reuses
    pids, two namespaces with one hostname): the claim token, not the
    name, decides. A worker that takes its own expired task over again
    cannot be written to by the old attempt."""

    async def main():
        a, _ = _stores(mongo)
        try:
            await a.ensure_indexes()
            created = Task.new("http://h.test/f", None, False)
            await a.records.create(created)
            [first] = await a.queue.claim("W", 1)
            await _expire(a, created.id)
            [second] = await a.queue.claim("W", 1)
            assert second.claim != first.claim
            assert not await a.queue.renew(first, "W", 1, None)
            assert not await a.queue.finish(first, "W", md5="1" * 32)
            assert await a.queue.finish(second, "W", md5="2" * 32)
            assert (await a.records.get(created.id)).md5 == "2" * 32
        finally:
            await a.close()

    asyncio.run(main())


def test_retries_get_fresh_tokens_and_a_bounded_history(mongo):
    """Every claim of a retried task sets a new token; the history keeps
    the last HISTORY_LIMIT attempts; a retried task is left to other
    workers for a moment, then taken by the same one if nobody came."""

    async def main():
        a, b = _stores(mongo)
        try:
            await a.ensure_indexes()
            created = Task.new("http://h.test/f", None, False)
            await a.records.create(created)
            tokens = set()
            for _ in range(HISTORY_LIMIT + 3):
                [held] = await a.queue.claim("A", 1)
                tokens.add(held.claim)
                assert await a.queue.retry_later(held, "A", 0, TaskError("timeout", "slow"))
                # A just failed it: another worker gets it first ...
                assert await a.queue.claim("A", 1) == []
                [held] = await b.queue.claim("B", 1)
                tokens.add(held.claim)
                assert await b.queue.retry_later(held, "B", 0, TaskError("timeout", "slow"))
            assert len(tokens) == 2 * (HISTORY_LIMIT + 3)
            doc = await a.cols.tasks.find_one({"_id": created.id})
            assert len(doc["history"]) == HISTORY_LIMIT
            assert {h["outcome"] for h in doc["history"]} == {"retry"}
            assert doc["history"][-1]["worker"] == "B"
            # ... and after a while, with nobody else, the same worker does.
            assert await b.queue.claim("B", 1) == []
            await asyncio.sleep(2.2)
            [held] = await b.queue.claim("B", 1)
            assert held.worker == "B"
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_leases_are_set_on_the_database_clock(mongo):
    """lease_until comes from the server's $$NOW, whatever the worker's
    clock says: it lies LEASE_SECONDS after the server's time."""

    async def main():
        a, _ = _stores(mongo, lease=30)
        try:
            await a.ensure_indexes()
            created = Task.new("http://h.test/f", None, False)
            await a.records.create(created)
            [held] = await a.queue.claim("A", 1)
            reply = await a.cols.db.command("hello")
            doc = await a.cols.tasks.find_one({"_id": created.id})
            server_now = reply["localTime"].replace(tzinfo=doc["lease_until"].tzinfo)
            lease_left = (doc["lease_until"] - server_now).total_seconds()
            assert 25 < lease_left <= 30, lease_left
            assert doc["claimed_at"] <= server_now
        finally:
            await a.close()

    asyncio.run(main())


def test_clock_offset_is_measured(mongo):
    async def main():
        a, _ = _stores(mongo)
        try:
            await a.clock.sync()
            # Same host, same clock: the offset is the measurement's error.
            assert abs(a.clock.offset.total_seconds()) < 1.0
        finally:
            await a.close()

    asyncio.run(main())
