"""An md5 fed from the IOLoop that does its hashing on a helper thread.

``hashlib``'s ``update`` releases the GIL for large buffers, so while a
thread hashes one coalesced block the IOLoop goes on reading the next.
At most one block is hashed while another fills, which bounds memory per
download to about two blocks whatever the file size. ``feed`` returns an
awaitable only when the reader has to wait for the hasher; Tornado's
``streaming_callback`` awaits it, so a slow hasher slows the socket reads
instead of growing a buffer.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable
from concurrent.futures import Executor

BLOCK = 4 * 1024 * 1024
# Below this the tail is hashed inline: a thread hop costs more than it saves.
INLINE = 64 * 1024


class Md5Sink:
    def __init__(self, executor: Executor | None):
        self._md5 = hashlib.md5()
        self._buffer = bytearray()
        self._executor = executor
        self._pending: asyncio.Future | None = None

    def feed(self, chunk: bytes) -> Awaitable[None] | None:
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
            self._md5.update(block)
            return
        self._pending = asyncio.get_running_loop().run_in_executor(
            self._executor, self._md5.update, block)

    async def _submit_after_pending(self, block: bytes | bytearray) -> None:
        assert self._pending is not None
        await self._pending
        self._submit(block)

    async def hexdigest(self) -> str:
        if self._pending is not None:
            await self._pending
            self._pending = None
        if self._buffer:
            if self._executor is None or len(self._buffer) < INLINE:
                self._md5.update(self._buffer)
            else:
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._md5.update, self._buffer)
            self._buffer = bytearray()
        return self._md5.hexdigest()

    async def discard(self) -> None:
        """Wait for a block in flight so no thread outlives the download."""
        if self._pending is not None:
            try:
                await self._pending
            except Exception:
                pass
            self._pending = None
        self._buffer = bytearray()
