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

A resumable sink (``make_resumable``) hashes with ``checkpoint``'s
serializable hashers, inline: they hold the GIL, so a thread would gain
nothing; inline, and unbuffered, every chunk is hashed by the time
``feed`` returns, so ``hashed`` and ``states`` always describe one exact
byte offset: the last one received.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from concurrent.futures import Executor
from typing import Any

from service.fetch.checkpoint import ResumableHash
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
        self._hashed = 0
        self.resumable = False

    @property
    def algorithms(self) -> list[str]:
        return list(self._hashes)

    def add(self, algorithm: str) -> None:
        """One more digest, before the first byte (say, the one a server
        announced in its headers)."""
        if self._fed:
            raise RuntimeError("a digest cannot be added once bytes were hashed")
        self._hashes.setdefault(algorithm, new_hash(algorithm))

    def make_resumable(self, states: dict[str, bytes] | None = None, offset: int = 0) -> None:
        """Hash with serializable hashers from here on, before the first
        byte: fresh ones, or ones restored from a checkpoint at ``offset``
        (the bytes fed next are the file's from ``offset`` on)."""
        if self._fed:
            raise RuntimeError("a sink cannot change hashers once bytes were hashed")
        states = states or {}
        # A saved state may hold one more digest (the server's claim's).
        names = list(self._hashes) + [a for a in states if a not in self._hashes]
        self._hashes = {a: ResumableHash(a, states.get(a)) for a in names}
        self._hashed = offset
        self._executor = None
        self.resumable = True

    @property
    def hashed(self) -> int:
        """The offset up to which the digests have been fed, a block
        boundary; bytes still buffered are not counted."""
        return self._hashed

    def states(self) -> dict[str, bytes]:
        """Every digest's state at ``hashed`` (a resumable sink only)."""
        return {a: h.state() for a, h in self._hashes.items()}

    def feed(self, chunk: bytes) -> Awaitable[None] | None:
        self._fed = True
        if self.resumable:
            # Unbuffered: a checkpoint then stands at the last byte received.
            self._update_all(chunk)
            return None
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
        self._hashed += len(block)
        self._pending = updates[0] if len(updates) == 1 else asyncio.gather(*updates)

    def _update_all(self, block: bytes | bytearray) -> None:
        for h in self._hashes.values():
            h.update(block)
        self._hashed += len(block)

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
