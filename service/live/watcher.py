"""One watcher per API process and kind (tasks, manifests): it reads every
watched key in one round of queries every ``INTERVAL`` and hands each
subscriber the keys' new states. 500 streams cost the database what 5 do:
one round per interval (none while nobody watches).

Only changes are handed on (the state's ``version`` differs from the last
round's), and a subscriber keeps only the latest state, so a slow stream
skips intermediate progress rather than queueing it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import pymongo
from pymongo.errors import PyMongoError

log = logging.getLogger("md5light.api")

T = TypeVar("T")
# Progress at most this often: workers record it once a second, so a
# quarter of that shows each step soon after it lands.
INTERVAL = 0.25
# A round slower than this is dropped; the next one reads afresh.
ROUND_TIMEOUT = 2.0

_GONE = object()


class Subscription(Generic[T]):
    """One stream's view of one key: the latest state the watcher read."""

    def __init__(self, key: str):
        self.key = key
        self.changed = asyncio.Event()
        self._latest: object = None
        self._fresh = False

    def offer(self, state: T | None) -> None:
        self._latest = _GONE if state is None else state
        self._fresh = True
        self.changed.set()

    def take(self) -> tuple[bool, T | None]:
        """(whether there is news, the state or None once the key is gone)."""
        self.changed.clear()
        fresh, self._fresh = self._fresh, False
        latest = self._latest
        return fresh, None if latest is _GONE else latest  # type: ignore[return-value]


class Watcher(Generic[T]):
    def __init__(self, read: Callable[[list[str]], Awaitable[dict[str, T]]],
                 version: Callable[[T], Hashable],
                 on_round: Callable[[], None] = lambda: None):
        self.read = read
        self.version = version
        self.on_round = on_round
        self._subs: dict[str, set[Subscription[T]]] = {}
        self._seen: dict[str, Hashable] = {}
        self._task: asyncio.Task | None = None

    def subscribe(self, key: str) -> Subscription[T]:
        sub: Subscription[T] = Subscription(key)
        self._subs.setdefault(key, set()).add(sub)
        if self._task is None or self._task.done():
            # A context of its own: the request that started it may have
            # set a pymongo.timeout, which would then bind every round.
            self._task = asyncio.get_running_loop().create_task(
                self._run(), context=contextvars.Context())
        return sub

    def unsubscribe(self, sub: Subscription[T]) -> None:
        subs = self._subs.get(sub.key)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[sub.key]
            self._seen.pop(sub.key, None)

    @property
    def watched(self) -> int:
        return len(self._subs)

    async def _run(self) -> None:
        while self._subs:
            await asyncio.sleep(INTERVAL)
            keys = list(self._subs)
            if not keys:
                break
            try:
                with pymongo.timeout(ROUND_TIMEOUT):
                    found = await self.read(keys)
            except PyMongoError as exc:
                # The streams stay open (their keep-alives go on); the
                # next round tries again.
                log.debug("event watcher round failed: %s", type(exc).__name__)
                continue
            self.on_round()
            for key in keys:
                self._hand_out(key, found.get(key))

    def _hand_out(self, key: str, state: T | None) -> None:
        subs = self._subs.get(key)
        if not subs:
            return
        version = None if state is None else self.version(state)
        if key in self._seen and self._seen[key] == version:
            return
        self._seen[key] = version
        for sub in subs:
            sub.offer(state)


class StreamLimit:
    """Open streams per client in this API process."""

    def __init__(self, per_client: int):
        self.per_client = per_client
        self._open: dict[str, int] = {}

    def acquire(self, client: str) -> bool:
        count = self._open.get(client, 0)
        if count >= self.per_client:
            return False
        self._open[client] = count + 1
        return True

    def release(self, client: str) -> None:
        count = self._open.get(client, 0) - 1
        if count > 0:
            self._open[client] = count
        else:
            self._open.pop(client, None)
