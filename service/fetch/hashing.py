"""Digests fed from the IOLoop that do their hashing on helper threads.

``hashlib``'s ``update`` releases the GIL for large buffers, so while
threads hash one coalesced block the IOLoop goes on reading the next, and
several digests of one block are computed at once, one per thread: md5
and sha256 of a file cost about what md5 alone does, given a free core.
At most one block is hashed while another fills, which bounds memory per
download to about two blocks whatever the file size. ``feed`` returns an
awaitable only when the reader has to wait for the hasher; Tornado's
``streaming_callback`` awaits it, so a slow hasher slows the socket reads
instead of growing a buffer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from concurrent.futures import Executor
from typing import Any

from service.model.digests import new_hash

BLOCK = 4 * 1024 * 1024
# Below this the tail is hashed inline: a thread hop costs more than it saves.
INLINE = 64 * 1024


class DigestSink:
    def __init__(self, algorithms: Iterable[str], executor: Executor | None):
        self._hashes: dict[str, Any] = {a: new_hash(a) for a in algorithms}
        self._fed = False
        self._buffer = bytearray()
        self._executor = executor
        self._pending: asyncio.Future | None = None

    @property
    def algorithms(self) -> list[str]:
        return list(self._hashes)

    def add(self, algorithm: str) -> None:
        """One more digest, before the first byte (say, the one a server
        announced in its headers)."""
        if self._fed:
            raise RuntimeError("a digest cannot be added once bytes were hashed")
        self._hashes.setdefault(algorithm, new_hash(algorithm))

    def feed(self, chunk: bytes) -> Awaitable[None] | None:
        self._fed = True
        if not self._buffer and len(chunk) >= BLOCK:
            block: bytes | bytearray = chunk  # big enough as it is: no copy
        else:
            self._buffer += chunk
            if len(self._buffer) < BLOCK:
                return None
            block, self._buffer = self._buffer, bytearray()
        if self._pending is None or self._pending.done():
            self._submit(block)
            return None
        return self._submit_after_pending(block)

    def _submit(self, block: bytes | bytearray) -> None:
        if self._pending is not None:
            self._pending.result()  # surface a failed update, never skip it
        if self._executor is None:
            self._update_all(block)
            return
        loop = asyncio.get_running_loop()
        updates = [loop.run_in_executor(self._executor, h.update, block)
                   for h in self._hashes.values()]
        self._pending = updates[0] if len(updates) == 1 else asyncio.gather(*updates)

    def _update_all(self, block: bytes | bytearray) -> None:
        for h in self._hashes.values():
            h.update(block)

    async def _submit_after_pending(self, block: bytes | bytearray) -> None:
        assert self._pending is not None
        await self._pending
        self._submit(block)

    async def hexdigests(self) -> dict[str, str]:
        """Every digest, by algorithm, once the last block is hashed."""
        if self._pending is not None:
            await self._pending
            self._pending = None
        if self._buffer:
            if self._executor is None or len(self._buffer) < INLINE:
                self._update_all(self._buffer)
            else:
                self._submit(self._buffer)
                await self._settle()
            self._buffer = bytearray()
        return {a: h.hexdigest() for a, h in self._hashes.items()}

    async def _settle(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    async def discard(self) -> None:
        """Wait for a block in flight so no thread outlives the download."""
        if self._pending is not None:
            try:
                await self._pending
            except Exception:
                pass
            self._pending = None
        self._buffer = bytearray()
