"""Task history for GET /tasks: newest first, a page at a time, at a cost
that does not grow with the history.

SecantusDB reads every index match before it sorts or limits (a limit
without a sort does not stop it early either): "the newest 100 tasks" as
``find().sort(created_at: -1).limit(100)`` reads the whole collection,
1.6 s at 100,000 tasks. So, like the queue's scan (``queue_scan.py``), a
page is read in windows of ``created_at`` going back in time from the
cursor. Each window is one indexed range query whose cost is the tasks it
holds; its width is chosen from the density the previous window showed,
so that it holds about what the page still needs, and an empty window is
four times wider than the last. A page thus reads about a page of tasks
(plus a few cheap empty windows), with 1,000 tasks stored or 1,000,000.

The cursor is the (created_at, _id) of the last task shown. New tasks are
stamped later than any cursor, so pages already begun neither repeat nor
skip a task when tasks are added meanwhile.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from service.model.numbers import whole_number
from service.model.task import Status, Task, utcnow

PAGE_MAX = 1000
PAGE_DEFAULT = 100
_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)  # older than any task
_UNIX = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_FIRST_WINDOW = dt.timedelta(seconds=1)
# A window holds this much more than the density seen so far predicts
# for the rest of the page, so that one more window usually suffices.
_SLACK = 1.25
_GROWTH = 4.0
# From 1 s, growing fourfold, 16 windows span 100 years: a bound on the
# queries of one page that no history reaches.
_MAX_WINDOWS = 24
# Fields the listing never reads, so they cannot leak into it.
_HIDDEN = {"email": 0, "client": 0}


class BadCursor(ValueError):
    """An ``after`` token this service did not hand out."""


@dataclasses.dataclass(frozen=True)
class Cursor:
    """Where a page ended: the last task shown."""
    created_at: dt.datetime
    id: str

    def token(self) -> str:
        ms = (self.created_at - _UNIX) // dt.timedelta(milliseconds=1)
        raw = f"{ms}.{self.id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def parse(cls, token: str) -> Cursor:
        if len(token) > 200:
            raise BadCursor(token)
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
            ms_text, task_id = raw.split(".", 1)
            if whole_number(ms_text) is None or not 0 < len(task_id) <= 100 \
                    or not task_id.isprintable():
                raise ValueError(raw)
            created_at = _UNIX + dt.timedelta(milliseconds=int(ms_text))
        except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError):
            raise BadCursor(token) from None
        return cls(created_at, task_id)

    def after(self, doc: dict) -> bool:
        """Whether ``doc`` comes after (is older than) this cursor."""
        return (doc["created_at"], doc["_id"]) < (self.created_at, self.id)


@dataclasses.dataclass
class Page:
    tasks: list[Task]
    next: Cursor | None  # None: this is the last page


class TaskHistory:
    def __init__(self, tasks: AsyncCollection):
        self.tasks = tasks
        # Tasks per second seen by the last unfiltered page: where the next
        # page starts its first window, instead of at 1 s.
        self._rate: float | None = None
        # The newest task the last unfiltered first page found. Below it
        # the density is known, so the window that reaches it after an idle
        # stretch (empty windows, each four times wider) reads only about a
        # page below it, not a quarter of that stretch's width of history.
        self._newest: dt.datetime | None = None

    async def page(self, limit: int = PAGE_DEFAULT, status: Status | None = None,
                   url: str | None = None, since: dt.datetime | None = None,
                   after: Cursor | None = None, owner: str | None = None,
                   ids: list[str] | None = None) -> Page:
        """Up to ``limit`` tasks, newest first, older than ``after``,
        created at or after ``since``, with the given status and url, of
        ``owner`` (an API key's id) and among ``ids``, when given."""
        match: dict[str, Any] = {}
        if owner is not None:
            match["owner"] = owner
        if ids is not None:
            # Named tasks: one read by _id, whatever their dates.
            return await self._named(ids, match, limit, since, after)
        if status is not None:
            match["status"] = str(status)
        if url is not None:
            match["url"] = url
        need = limit + 1  # one more tells whether there is a next page
        floor = max(since, _EPOCH) if since is not None else _EPOCH
        top = after.created_at if after else utcnow()
        width = _FIRST_WINDOW
        anchor = None
        if not match and self._rate:
            width = dt.timedelta(seconds=min(86400.0, max(0.01, need / self._rate)))
            if self._newest is not None and after is None:
                anchor = self._newest - width * _SLACK
        found: list[dict] = []
        high: dt.datetime | None = after.created_at if after else None
        low = _back(top, width, floor)
        for first in [True] + [False] * (_MAX_WINDOWS - 1):
            bounds: dict[str, Any] = {"$gte": max(low, floor)}
            if high is not None:
                # The first window includes the cursor's millisecond (others
                # may share it); a later one ends where the last began.
                bounds["$lte" if first else "$lt"] = high
            docs = await self.tasks.find({**match, "created_at": bounds},
                                         _HIDDEN).to_list(None)
            if after is not None and first:
                docs = [d for d in docs if after.after(d)]
            found += docs
            if len(found) >= need or low <= floor:
                break
            growth = _GROWTH if not docs else \
                min(_GROWTH, max(1.0, _SLACK * (need - len(found)) / len(docs)))
            width = width * growth
            high, low = low, _back(low, width, floor)
            if anchor is not None and low < anchor < high:
                low, width = anchor, high - anchor
        if not match and found:
            # Over the span the tasks occupy: an idle stretch above them
            # says nothing of their density.
            newest = max(d["created_at"] for d in found)
            self._rate = len(found) / max(0.001, (newest - low).total_seconds())
            if after is None:
                self._newest = newest
        found.sort(key=lambda d: (d["created_at"], d["_id"]), reverse=True)
        shown = [Task.from_doc(d) for d in found[:limit]]
        more = len(found) > limit
        return Page(shown, Cursor(shown[-1].created_at, shown[-1].id) if more else None)


    async def _named(self, ids: list[str], match: dict[str, Any], limit: int,
                     since: dt.datetime | None, after: Cursor | None) -> Page:
        query: dict[str, Any] = {**match, "_id": {"$in": ids}}
        if since is not None:
            query["created_at"] = {"$gte": since}
        docs = await self.tasks.find(query, _HIDDEN).to_list(None)
        if after is not None:
            docs = [d for d in docs if after.after(d)]
        docs.sort(key=lambda d: (d["created_at"], d["_id"]), reverse=True)
        shown = [Task.from_doc(d) for d in docs[:limit]]
        more = len(docs) > limit
        return Page(shown, Cursor(shown[-1].created_at, shown[-1].id) if more else None)


def _back(when: dt.datetime, width: dt.timedelta, floor: dt.datetime) -> dt.datetime:
    """``when - width``, but not before ``floor`` (nor before year 1: a
    cursor far in the future makes for wide windows)."""
    try:
        return max(floor, when - width)
    except OverflowError:
        return floor
