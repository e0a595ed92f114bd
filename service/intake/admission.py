"""Admission at /submit: a cap on each client's unfinished tasks and on the
whole queue, and the lane a new task goes to.

Counting a client's unfinished tasks costs about 25 ms on SecantusDB at
1,000 of them, and the queue's size is read from the shared counters
(storage/counters.py; before their first recount, a count that reads the
whole queue), so neither is asked on every submit. Each count is cached with the number
of tasks this process admitted since it was taken: their sum is an upper
bound (tasks only leave by finishing, which the next count sees), so the
cached value never lets a client past its cap. A count is taken again
when it is a couple of seconds old, or at once when the bound reaches
the cap, at most once a second per client. A client's count comes from
the tasks collection itself, so it cannot drift after a crash.

With several API processes, each sees the others' submits only at its
next count: a client spread over N of them may briefly exceed its cap by
what it submits in a couple of seconds.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import ipaddress
import logging
import time

import pymongo
from pymongo.errors import PyMongoError

from service.storage.queue_scan import lane_for
from service.storage.store import Store

log = logging.getLogger("md5light.api")

MAX_AGE = 2.0          # seconds a count is trusted while under the cap
RECHECK = 1.0          # at the cap, count again at most this often
COST_FACTOR = 10       # and never spend more than a tenth of the time counting
RETRY_AFTER_CLIENT = 5
RETRY_AFTER_FULL = 30
QUEUE_COUNT_TIMEOUT = 60.0
_FORGET_AFTER = 300.0  # drop a client's cached count unused this long
_SWEEP_ABOVE = 10_000


class QuotaExceeded(Exception):
    """The client has too many unfinished tasks."""

    def __init__(self, verdict: Verdict):
        super().__init__("per-client limit reached")
        self.verdict = verdict


class QueueFull(Exception):
    """The queue as a whole is full."""

    def __init__(self, queued: int, limit: int):
        super().__init__("queue full")
        self.queued, self.limit = queued, limit


@dataclasses.dataclass
class Verdict:
    limit: int       # 0: no per-client limit
    pending: int     # the client's unfinished tasks before this one (an upper bound)
    lane: int

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.pending)


@dataclasses.dataclass
class _Count:
    value: int | None = None   # from the database
    added: int = 0             # admitted here since that count was taken
    at: float = float("-inf")  # when it was taken (monotonic)
    cost: float = 0.0          # how long it took
    used: float = 0.0
    refreshing: asyncio.Future | None = None

    @property
    def bound(self) -> int:
        return (self.value or 0) + self.added

    def age(self, now: float) -> float:
        return now - self.at

    def fresh(self, now: float, max_age: float) -> bool:
        return self.value is not None and self.age(now) < max(max_age, COST_FACTOR * self.cost)


def client_key(address: str) -> str:
    """The unit a quota counts: one IPv4 address, or one IPv6 /64 (what a
    single host or customer is usually given; per address, one host would
    have 2^64 quotas)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


def client_address(request, header: str | None) -> str:
    """The quota's unit for ``request``'s sender (see ``peer_address``)."""
    return client_key(peer_address(request, header))


def peer_address(request, header: str | None) -> str:
    """Who sent ``request``. With ``header`` (say X-Forwarded-For), its
    right-most entry: that is the one our trusted proxy appended; entries
    to its left came from the client and can be forged. A request without
    a usable header (one that bypassed the proxy) counts by its
    connection's address."""
    if header:
        value = request.headers.get(header, "")
        last = value.rsplit(",", 1)[-1].strip()
        try:
            return str(ipaddress.ip_address(last))
        except ValueError:
            pass
    return request.remote_ip or ""


class Admission:
    def __init__(self, store: Store, per_client: int, max_queued: int):
        self.store = store
        self.per_client = per_client
        self.max_queued = max_queued
        self._clients: dict[str, _Count] = {}
        self._queued = _Count()
        self._queued_task: asyncio.Task | None = None

    async def admit(self, client: str, n: int = 1) -> Verdict:
        """Reserve places for ``n`` new tasks of ``client`` (a manifest's
        lines), or raise QueueFull or QuotaExceeded. A client under its cap
        may submit a manifest bigger than what is left of it: the manifest
        is one request, and its tasks go to the lane their number puts them
        in, behind other clients' single submits."""
        self._check_queue(n)
        now = time.monotonic()
        count = self._count_of(client, now)
        at_cap = bool(self.per_client) and count.bound >= self.per_client
        if not count.fresh(now, MAX_AGE) or (at_cap and count.age(now) >= RECHECK):
            await self._refresh(count, client)
        verdict = Verdict(self.per_client, count.bound, lane_for(count.bound + n - 1))
        if self.per_client and verdict.pending >= self.per_client:
            raise QuotaExceeded(verdict)
        count.added += n
        self._queued.added += n
        return verdict

    def release(self, client: str, n: int = 1) -> None:
        """Reserved places that were not used (the insert failed)."""
        count = self._clients.get(client)
        if count is not None:
            count.added = max(0, count.added - n)
        self._queued.added = max(0, self._queued.added - n)

    def peek(self, client: str) -> Verdict:
        """The client's standing, without a database call."""
        count = self._clients.get(client) or _Count()
        return Verdict(self.per_client, count.bound, lane_for(count.bound))

    # -- the client's count -------------------------------------------------

    def _count_of(self, client: str, now: float) -> _Count:
        count = self._clients.get(client)
        if count is None:
            if len(self._clients) > _SWEEP_ABOVE:
                self._forget_idle(now)
            count = self._clients[client] = _Count()
        count.used = now
        return count

    def _forget_idle(self, now: float) -> None:
        for key, count in list(self._clients.items()):
            if now - count.used > _FORGET_AFTER and count.refreshing is None:
                del self._clients[key]

    async def _refresh(self, count: _Count, client: str) -> None:
        """Count again; concurrent submits of one client share one count.
        Runs in the request's context, so its database deadline applies."""
        if count.refreshing is not None:
            await asyncio.shield(count.refreshing)
            return
        count.refreshing = asyncio.get_running_loop().create_future()
        started, added = time.monotonic(), count.added
        try:
            value = await self.store.records.pending_of(client)
            # Tasks admitted while counting may or may not be in the count:
            # keep them, the bound stays an upper bound.
            count.value, count.added = value, count.added - added
            count.at, count.cost = started, time.monotonic() - started
        finally:
            count.refreshing.set_result(None)
            count.refreshing = None

    # -- the whole queue ----------------------------------------------------

    def _check_queue(self, n: int = 1) -> None:
        if not self.max_queued:
            return
        if not self._queued.fresh(time.monotonic(), MAX_AGE) and self._queued_task is None:
            # In the background: before the counters' first recount this
            # reads the whole queue (seconds at 100,000), which no submit
            # should wait for. Until it is in, only this process's own
            # submits count.
            self._queued_task = asyncio.get_running_loop().create_task(
                self._count_queue(), context=contextvars.Context())
        if self._queued.bound + n - 1 >= self.max_queued:
            raise QueueFull(self._queued.bound, self.max_queued)

    async def _count_queue(self) -> None:
        count = self._queued
        started, added = time.monotonic(), count.added
        try:
            with pymongo.timeout(QUEUE_COUNT_TIMEOUT):
                value = await self.store.counters.queued()
            count.value, count.added = value, count.added - added
            count.at, count.cost = started, time.monotonic() - started
        except PyMongoError as exc:
            log.debug("counting the queue failed: %s", type(exc).__name__)
        finally:
            self._queued_task = None
