"""Server-sent events: GET /tasks/<id>/events and /manifests/<id>/events.
What a stream sends is service.live's; this module speaks HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

from tornado.iostream import StreamClosedError

from service.intake.admission import client_address
from service.live.feeds import END_ID, RETRY_MS, Event, Feed, events
from service.live.watcher import StreamLimit
from service.model.ids import could_be_ours
from service.model.views import NOT_FOUND

from .base import JsonHandler

RETRY_AFTER_STREAMS = 5


class EventsHandler(JsonHandler):
    # A browser's EventSource cannot send a header: the id is the capability.
    open_without_key = True

    def initialize(self, feed: Feed, limit: StreamLimit, keepalive: float,
                   client_ip_header: str | None) -> None:
        self.feed = feed
        self.limit = limit
        self.keepalive = keepalive
        self.client_ip_header = client_ip_header
        self.closed = asyncio.Event()
        self.sub: Any = None

    async def get(self, key: str) -> None:
        if not could_be_ours(key):
            return self.send(404, NOT_FOUND)
        client = client_address(self.request, self.client_ip_header)
        if not self.limit.acquire(client):
            self.set_header("Retry-After", str(RETRY_AFTER_STREAMS))
            return self.send(429, {"error": (
                f"too many event streams open from your address (the limit is "
                f"{self.limit.per_client}); close one you no longer read and try again")})
        # Subscribed before the snapshot is read, so no change after it is missed.
        self.sub = self.feed.watcher.subscribe(key)
        try:
            await self._stream(key)
        finally:
            self.feed.watcher.unsubscribe(self.sub)
            self.limit.release(client)

    async def _stream(self, key: str) -> None:
        first = await self.db(self.feed.read(key))
        if first is None:
            return self.send(404, NOT_FOUND)
        if self.request.headers.get("Last-Event-ID") == END_ID and self.feed.ended(first):
            # It saw the ending; 204 stops an EventSource from reconnecting.
            self.set_status(204)
            self.clear_header("Content-Type")
            self.finish()
            return
        self.set_header("Content-Type", "text/event-stream; charset=UTF-8")
        self.set_header("X-Accel-Buffering", "no")  # a proxy must not hold events back
        if self.request.method == "HEAD":
            self.finish()
            return
        try:
            await self._write(f"retry: {RETRY_MS}\n\n".encode())
            async for item in events(self.feed, self.sub, first, self.keepalive, self.closed):
                await self._write(item.encode() if isinstance(item, Event) else item)
        except StreamClosedError:
            return
        if not self.closed.is_set():
            self.finish()

    async def _write(self, chunk: bytes) -> None:
        self.write(chunk)
        await self.flush()

    def on_connection_close(self) -> None:
        self.closed.set()
        if self.sub is not None:
            self.sub.changed.set()
