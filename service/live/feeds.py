"""What an event stream sends: a ``snapshot`` first, ``progress`` as the
watcher sees changes, one ``end`` when the task (or manifest) has ended,
and a keep-alive comment whenever it has been quiet for a while.

Event ids: ``end`` for the terminal event; otherwise an opaque token of
the state (``<status>.<attempts>.<bytes_done>`` for a task,
``<ended lines>.<bytes_done>`` for a manifest). A reconnect always starts
with a fresh snapshot; one whose ``Last-Event-ID`` is ``end`` already saw
the ending, and gets 204 (which tells an EventSource to stop) instead of
seeing it again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from service.live.watcher import Subscription, Watcher
from service.model.manifest import ENDED, Manifest
from service.model.manifest_views import manifest_view
from service.model.task import Task
from service.model.views import task_view

T = TypeVar("T")
END_ID = "end"
KEEPALIVE = b": keep-alive\n\n"
# How long an EventSource waits before reconnecting, in ms.
RETRY_MS = 2000


@dataclasses.dataclass(frozen=True)
class Event:
    id: str
    name: str
    data: dict[str, Any]

    def encode(self) -> bytes:
        data = json.dumps(self.data, separators=(",", ":"), sort_keys=True)
        return f"id: {self.id}\nevent: {self.name}\ndata: {data}\n\n".encode()


@dataclasses.dataclass
class Feed(Generic[T]):
    """One kind of stream: how to read its state, tell when it ended, and
    put it in an event."""
    watcher: Watcher[T]
    read: Callable[[str], Awaitable[T | None]]
    ended: Callable[[T], bool]
    version: Callable[[T], Hashable]
    full: Callable[[T], dict[str, Any]]
    brief: Callable[[T], dict[str, Any]]
    token: Callable[[T], str]

    def event(self, state: T, name: str) -> Event:
        if name == "end":
            return Event(END_ID, name, self.full(state))
        return Event(self.token(state), name,
                     self.full(state) if name == "snapshot" else self.brief(state))


async def events(feed: Feed[T], sub: Subscription[T], first: T, keepalive: float,
                 closed: asyncio.Event) -> AsyncIterator[Event | bytes]:
    """The stream after the snapshot of ``first``, until it ends or the
    client goes (``closed``)."""
    yield feed.event(first, "snapshot")
    sent = feed.version(first)
    state = first
    while not feed.ended(state):
        try:
            async with asyncio.timeout(keepalive):
                await sub.changed.wait()
        except TimeoutError:
            if closed.is_set():
                return
            yield KEEPALIVE
            continue
        if closed.is_set():
            return
        fresh, latest = sub.take()
        if not fresh:
            continue
        if latest is None:
            return  # deleted (TASK_TTL_DAYS): nothing more will come
        state = latest
        if feed.version(state) != sent and not feed.ended(state):
            sent = feed.version(state)
            yield feed.event(state, "progress")
    yield feed.event(state, "end")


def task_feed(watcher: Watcher[Task], read: Callable[[str], Awaitable[Task | None]]
              ) -> Feed[Task]:
    return Feed(watcher, read, ended=lambda t: t.status.finished, version=task_version,
                full=_task_full, brief=_task_brief,
                token=lambda t: f"{t.status}.{t.attempts}.{t.bytes_done}")


def task_version(task: Task) -> Hashable:
    return (str(task.status), task.attempts, task.bytes_done, task.bytes_total)


def _task_full(task: Task) -> dict[str, Any]:
    return task_view(task)


def _task_brief(task: Task) -> dict[str, Any]:
    attempt = task.attempt or {}
    return {"id": task.id, "status": str(task.status), "attempts": task.attempts,
            "bytes_done": task.bytes_done, "bytes_total": task.bytes_total,
            "bytes_fetched": task.bytes_fetched + (attempt.get("fetched") or 0),
            "connections": attempt.get("connections")}


ManifestState = tuple[Manifest, dict[str, int]]


def manifest_feed(watcher: Watcher[ManifestState],
                  read: Callable[[str], Awaitable[ManifestState | None]]
                  ) -> Feed[ManifestState]:
    return Feed(watcher, read, ended=lambda s: s[0].finished, version=manifest_version,
                full=_manifest_full, brief=_manifest_full,
                token=lambda s: f"{sum(s[1].get(n, 0) for n in ENDED)}."
                                f"{s[1].get('bytes_done', 0)}")


def manifest_version(state: ManifestState) -> Hashable:
    manifest, totals = state
    return (manifest.finished, tuple(sorted(totals.items())))


def _manifest_full(state: ManifestState) -> dict[str, Any]:
    view = manifest_view(state[0], state[1], [], None, 0)
    for key in ("results", "next"):
        view.pop(key, None)
    return view
