"""Digests fed from the IOLoop that do their hashing on helper threads.

``hashlib``'s ``update`` releases the GIL for large buffers, so while
threads hash coalesced blocks the IOLoop goes on reading the next ones.
Each digest has its own ordered lane on the shared executor, so md5 never
waits for sha256 to finish a block (nor the reverse): with a free core,
md5 and sha256 of a file cost little more than md5 alone. The reader may
run ``DEPTH`` blocks ahead of the slowest digest; a pipeline one block
deep left md5 idle whenever the reader and sha256 shared the other core
(md5+sha256 of 1 GiB: 1.39x md5 alone one block deep, 1.15x four deep).
That bounds memory per download to about ``DEPTH + 1`` blocks whatever
the file size. ``feed`` returns an awaitable only when the reader has to
wait for the hashers; Tornado's ``streaming_callback`` awaits it, so a
slow hasher slows the socket reads instead of growing a buffer.

A resumable sink (``make_resumable``) hashes with ``checkpoint``'s
serializable hashers, inline: they hold the GIL, so a thread would gain
nothing; inline, and unbuffered, every chunk is hashed by the time
``feed`` returns, so ``hashed`` and ``states`` always describe one exact
byte offset: the last one received.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Awaitable, Iterable
from concurrent.futures import Executor
from typing import Any

from service.fetch.checkpoint import ResumableHash
from service.model.digests import new_hash

BLOCK = 4 * 1024 * 1024
DEPTH = 4
# Below this the tail is hashed inline: a thread hop costs more than it saves.
INLINE = 64 * 1024


class _Lane:
    """One digest's updates, run in order on a shared executor: a pool
    thread drains the lane's queue, so consecutive blocks of one hash
    never run at once on two threads."""

    def __init__(self, digest: Any, executor: Executor):
        self._digest = digest
        self._executor = executor
        self._loop = asyncio.get_running_loop()
        self._queue: deque[tuple[bytes | bytearray, asyncio.Future]] = deque()
        self._lock = threading.Lock()
        self._draining = False

    def update(self, block: bytes | bytearray) -> asyncio.Future:
        done = self._loop.create_future()
        with self._lock:
            self._queue.append((block, done))
            if self._draining:
                return done
            self._draining = True
        self._executor.submit(self._drain)
        return done

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._draining = False
                    return
                block, done = self._queue.popleft()
            try:
                self._digest.update(block)
            except BaseException as exc:  # handed to the awaiting reader
                self._loop.call_soon_threadsafe(_settle, done, exc)
            else:
                self._loop.call_soon_threadsafe(_settle, done, None)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class DigestSink:
    def __init__(self, algorithms: Iterable[str], executor: Executor | None):
        self._hashes: dict[str, Any] = {a: new_hash(a) for a in algorithms}
        # Fed the same bytes, but not digests of the file: a multipart
        # claim's part digests (``watch``), and those claims' checks.
        self._watchers: list[Any] = []
        self.checks: list[Any] = []
        # What the first byte must wait for (``hold``).
        self._gate: asyncio.Future | None = None
        self._gated: deque[bytes] = deque()
        self._gate_task: asyncio.Future | None = None
        self._fed = False
        self._buffer = bytearray()
        self._executor = executor
        self._lanes: list[_Lane] | None = None
        # Per block in flight, its update on every lane.
        self._blocks: deque[list[asyncio.Future]] = deque()
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

    def watch(self, consumer: Any) -> None:
        """Feed ``consumer.update`` the body too, from the first byte on,
        on a lane of its own. A checkpoint does not save it: a resumed
        download does without it."""
        if self._fed:
            raise RuntimeError("a consumer cannot be added once bytes were hashed")
        self._watchers.append(consumer)

    def hold(self, gate: asyncio.Future) -> None:
        """Hash nothing until ``gate`` is done (it may ``watch`` more
        consumers meanwhile): ``feed`` returns an awaitable that waits for
        it, so the reader pauses instead of buffering. Chunks fed meanwhile
        (several connections of a segmented download feed one sink) queue
        in their order and are hashed in it."""
        self._gate = gate

    async def _after_gate(self) -> None:
        assert self._gate is not None
        await asyncio.wait([self._gate])
        self._gate = None
        while self._gated:
            waiter = self._feed_now(self._gated.popleft())
            if waiter is not None:
                await waiter
        self._gate_task = None

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

    def feed(self, chunk: bytes) -> Awaitable[object] | None:
        if self._gate is not None and self._gate.done() and not self._gated:
            self._gate = None
        if self._gate is not None or self._gated:
            self._gated.append(chunk)
            if self._gate_task is None:
                self._gate_task = asyncio.ensure_future(self._after_gate())
            return self._gate_task
        return self._feed_now(chunk)

    def _feed_now(self, chunk: bytes) -> Awaitable[object] | None:
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
        self._submit(block)
        return self._backlog()

    def _submit(self, block: bytes | bytearray) -> None:
        if self._executor is None:
            self._update_all(block)
            return
        if self._lanes is None:
            self._lanes = [_Lane(h, self._executor)
                           for h in [*self._hashes.values(), *self._watchers]]
        self._blocks.append([lane.update(block) for lane in self._lanes])
        self._hashed += len(block)

    def _backlog(self) -> Awaitable[object] | None:
        """What the reader must wait for before the next block: the oldest
        one, once ``DEPTH`` blocks are in flight."""
        while self._blocks and all(f.done() for f in self._blocks[0]):
            for update in self._blocks.popleft():
                update.result()  # surface a failed update, never skip it
        if len(self._blocks) < DEPTH:
            return None
        return asyncio.gather(*self._blocks[0])

    def _update_all(self, block: bytes | bytearray) -> None:
        for h in self._hashes.values():
            h.update(block)
        for watcher in self._watchers:
            watcher.update(block)
        self._hashed += len(block)

    async def _drain(self) -> None:
        while self._blocks:
            await asyncio.gather(*self._blocks.popleft())

    async def hexdigests(self) -> dict[str, str]:
        """Every digest, by algorithm, once the last block is hashed."""
        if self._gate_task is not None:  # chunks queued behind the gate
            await self._gate_task
        if self._gate is not None:  # no byte came: nothing waited for it
            await asyncio.wait([self._gate])
            self._gate = None
        await self._drain()
        if self._buffer:
            if self._executor is None or len(self._buffer) < INLINE:
                self._update_all(self._buffer)
            else:
                self._submit(self._buffer)
                await self._drain()
            self._buffer = bytearray()
        return {a: h.hexdigest() for a, h in self._hashes.items()}

    async def discard(self) -> None:
        """Wait for the blocks in flight so no thread outlives the download."""
        self._gated.clear()
        if self._gate_task is not None and not self._gate_task.done():
            self._gate_task.cancel()
        try:
            await self._drain()
        except Exception:
            self._blocks.clear()
        self._buffer = bytearray()
