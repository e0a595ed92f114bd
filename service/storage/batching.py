"""Group concurrent writes into one: inserts into one ``insert_many``
(``InsertBatcher``), and any other statement that can serve many callers
at once (``Batcher``: a task's end, the file's record, the coalescing
entries' read).

Under a burst of submits the database, not the API, is the limit, and on
SecantusDB a batch of 16 inserts costs about what five single ones do. A
submit waits only for the batch it joined to be written; a lone request
is written at once, and only when calls come fast enough that company is
expected (``COMPANY``) does the first of a batch wait a little for it.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    WTimeoutError,
)

# Errors that say nothing about the documents: every waiter hears of them
# (an unreachable database is a 503 for all), with no retry one by one.
NOT_THE_DOCUMENTS = (ConnectionFailure, ExecutionTimeout, WTimeoutError)

MAX_BATCH = 256

# How long the first of the writes that end a task waits for others to
# share its batch: in a burst of small files a worker's tasks end a few
# milliseconds apart, and one write for several is most of the saving (a
# statement costs SecantusDB about 0.45 ms of CPU before its first
# document, a task's end about 0.3 ms a document). Only when calls come
# fast enough that COMPANY more are expected within it: a lone end, or
# ends a tenth of a second apart, are written at once. The worker's slot
# is free by then (runtime.worker), so the wait delays the /check answer
# (two such waits: record, end), not throughput.
END_LINGER = 0.06
COMPANY = 2
# The mean gap between calls is a moving average; a pause counts as this
# long at most, so that a burst after a quiet hour is recognised within a
# few dozen calls.
LONGEST_GAP = 1.0
_GAP_WEIGHT = 0.2

T = TypeVar("T")
R = TypeVar("R")


# The same for a submit's insert (and its read of the coalescing entries):
# when submits come fast enough, the first waits this long for company. A
# burst's submits then go in batches about twice as big (a statement costs
# SecantusDB about 0.45 ms of CPU before its first document); a lone
# submit is written at once.
INSERT_LINGER = 0.015
# An insert batch this big goes at once, lingering or not: a statement's
# cost shared by sixteen is most of the saving, and a burst's callers,
# who each wait for their insert, come back together (waiting out the
# linger would only idle them). Ends linger the whole while: their
# callers' slots are free already.
ENOUGH = 16


class InsertBatcher:
    """Concurrent inserts into one collection, as ``insert_many``s."""

    def __init__(self, collection):
        self.collection = collection
        self._batcher: Batcher[dict, None] = Batcher(self._write, INSERT_LINGER, ENOUGH)

    async def insert(self, doc: dict) -> None:
        """Insert ``doc``; DuplicateKeyError if its _id exists."""
        await self._batcher.submit(doc)

    async def _write(self, docs: list[dict]) -> list[BaseException | None]:
        failed: dict[int, BaseException] = {}
        try:
            await self.collection.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            for error in exc.details.get("writeErrors", []):
                failed[error["index"]] = (DuplicateKeyError(error.get("errmsg", "duplicate"))
                                          if error.get("code") == 11000 else exc)
        except NOT_THE_DOCUMENTS as exc:
            failed = {i: exc for i in range(len(docs))}
        except Exception:  # noqa: BLE001 - every waiter must hear of it
            # One bad document (one that cannot be encoded, say) fails the
            # whole insert_many before anything is written; it must not
            # take the others down with it.
            if len(docs) == 1:
                raise
            return await one_by_one(docs, self.collection.insert_one)
        return [failed.get(i) for i in range(len(docs))]


async def one_by_one(items: list[T], write: Callable[[T], Awaitable[R]]
                     ) -> list[R | BaseException]:
    """A batch that failed as a whole for one bad item (one that cannot be
    encoded, say), written again an item at a time: the bad one fails
    alone."""
    results: list[R | BaseException] = []
    for item in items:
        try:
            results.append(await write(item))
        except Exception as exc:  # noqa: BLE001 - reported to this item's caller only
            results.append(exc)
    return results


class Batcher(Generic[T, R]):
    """Group concurrent calls into one ``write(items)``, which answers
    each item in order (a result, or an exception for that item alone).
    When calls come fast enough that ``COMPANY`` more are expected within
    ``linger`` seconds, the first call of a batch waits up to that long for
    them, less once ``enough`` calls are waiting (a burst's callers come
    back together: waiting the whole linger would only idle them); calls
    made while a batch is being written go in the next one. An exception
    raised by ``write`` itself reaches every caller of that batch."""

    def __init__(self, write: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
                 linger: float = 0.0, enough: int = MAX_BATCH):
        self._write = write
        self.linger = linger
        self.enough = enough
        self._pending: list[tuple[T, asyncio.Future]] = []
        self._flushing = False
        self._company: asyncio.Event | None = None
        self._last_call = float("-inf")
        self._gap = LONGEST_GAP  # the mean seconds between calls, lately

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        now = loop.time()
        gap = min(now - self._last_call, LONGEST_GAP)
        self._last_call = now
        self._gap += _GAP_WEIGHT * (gap - self._gap)
        future = loop.create_future()
        self._pending.append((item, future))
        if self._company is not None and len(self._pending) >= self.enough:
            self._company.set()
        if not self._flushing:
            self._flushing = True
            # A fresh context: the flush serves many callers and must not
            # inherit the first one's deadline (pymongo.timeout lives in a
            # context variable).
            asyncio.get_running_loop().create_task(self._flush(), context=contextvars.Context())
        return await future

    async def _flush(self) -> None:
        try:
            # Company is coming: calls have been fast lately. (Not "the
            # one before was just now": a batcher fed by another, the
            # ends by their record, gets its calls in clusters a linger
            # apart.)
            busy = self.linger >= COMPANY * self._gap
            if self.linger and busy and len(self._pending) < self.enough:
                self._company = asyncio.Event()
                try:
                    await asyncio.wait_for(self._company.wait(), self.linger)
                except TimeoutError:
                    pass
                finally:
                    self._company = None
            while self._pending:
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                await self._one(batch)
        finally:
            self._flushing = False

    async def _one(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        try:
            results: Sequence[R | BaseException] = await self._write([item for item, _ in batch])
        except Exception as exc:  # noqa: BLE001 - every waiter must hear of it
            results = [exc] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its caller gave up (timeout); nothing to tell
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
