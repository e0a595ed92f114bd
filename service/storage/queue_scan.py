"""Finding runnable queued tasks on a database that reads every index match
before it sorts or limits.

SecantusDB (the embedded default) answers ``find(...).sort().limit(1)``
over the queue by reading every queued task first: 40 ms at 2,000 queued,
growing with the queue. ``WindowedQueueScan`` instead scans ``lease_until``
in small windows from a cursor, one cursor per lane: a window that holds a
few tasks costs under a millisecond, and empty windows grow fourfold, so
even a cursor far behind reaches ``now`` in a few dozen cheap queries. On
MongoDB proper the same queries are cheap too, so one strategy serves both.

Lanes keep one client's backlog from starving everyone else: a task's lane
comes from how many unfinished tasks its client already had when it was
submitted (``lane_for``), and the scan returns the lowest lane with
runnable work first. So every client's first few tasks go before anyone's
hundredth: round-robin across clients at the granularity of the lanes,
with no per-client state in the database to keep right.
"""

from __future__ import annotations

import datetime as dt
import random
import time

from pymongo.asynchronous.collection import AsyncCollection

from service.model.task import Status

_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_WINDOW = dt.timedelta(milliseconds=50)
# How far the cursor steps back when a scan reaches now: a task stamped
# before the cursor but committed after the scan that set it (API requests
# commit out of order under load) is found by the next scan.
_CURSOR_MARGIN = dt.timedelta(seconds=2)
# Now and then start from the beginning, for a task that slipped behind the
# cursor (an API host with a slow clock).
_RESCAN_EVERY = dt.timedelta(seconds=60)
# How long scanned candidates are used before the lanes are scanned again: a
# cached list of one client's backlog must not keep a newer task in a lower
# lane waiting for longer than this.
_CANDIDATE_TTL = 1.0
# Candidates kept from one window; each worker shuffles them, or workers
# holding the same list would race for the same task at every step.
_KEEP = 64

# Lane of a task whose client had fewer than LANE_LIMITS[i] unfinished
# tasks at submit: i. Each lane costs idle claims a few cheap queries, so
# there are few of them.
LANE_LIMITS = (4, 64)
LANES = len(LANE_LIMITS) + 1


def lane_for(pending: int) -> int:
    """The lane of a new task whose client has ``pending`` unfinished ones."""
    for lane, limit in enumerate(LANE_LIMITS):
        if pending < limit:
            return lane
    return len(LANE_LIMITS)


class WindowedQueueScan:
    """Candidates for a claim: documents of queued tasks that look runnable.
    They are kept between calls; the claim's compare-and-set makes a stale
    one harmless."""

    def __init__(self, tasks: AsyncCollection):
        self.tasks = tasks
        self._cursors: dict[int, dt.datetime] = {}
        # Lanes found empty by the last scan: few tasks arrive in one
        # between scans, so one query over all of [cursor, now] is cheap,
        # where stepping windows up to now cost four or five queries per
        # empty lane at every scan (most of a burst's queries).
        self._empty: set[int] = set()
        self._cursor_reset = _EPOCH
        self._candidates: list[dict] = []
        self._scanned_at = 0.0

    async def candidates(self, now: dt.datetime, n: int) -> list[dict]:
        """Up to ``n`` runnable queued tasks, lowest lane first."""
        if not self._candidates or time.monotonic() - self._scanned_at > _CANDIDATE_TTL:
            await self._scan(now)
        out: list[dict] = []
        while self._candidates and len(out) < n:
            cand = self._candidates.pop()
            if cand["lease_until"] <= now:
                out.append(cand)
        return out

    async def _scan(self, now: dt.datetime) -> None:
        if not self._cursors or now - self._cursor_reset > _RESCAN_EVERY:
            self._cursors = dict.fromkeys(range(LANES), _EPOCH)
            self._cursor_reset = now
        self._candidates, self._scanned_at = [], time.monotonic()
        for lane in range(LANES):
            self._candidates = await self._scan_lane(lane, now)
            if self._candidates:
                return

    async def _scan_lane(self, lane: int, now: dt.datetime) -> list[dict]:
        low, window = self._cursors[lane], _WINDOW
        if lane in self._empty:
            window = max(window, now - low)
        while True:
            high = min(now, low + window)
            found = await self.tasks.find(
                {"status": Status.QUEUED, "lane": lane,
                 "lease_until": {"$gte": low, "$lte": high}}).to_list(None)
            if found:
                found.sort(key=lambda d: d["lease_until"])
                self._cursors[lane] = found[0]["lease_until"]
                found = found[:_KEEP]
                random.shuffle(found)
                self._empty.discard(lane)
                return found
            if high >= now:
                self._cursors[lane] = min(self._cursors[lane], now - _CURSOR_MARGIN)
                self._empty.add(lane)
                return []
            low, window = high, window * 4
