"""Several ranged connections to one server, hashed strictly in order.

A far server or one that caps each connection's rate is faster over
several connections (aria2's ``-x``/``-s``); MD5 cannot be split, so the
pieces are hashed in file order. The file from the hashed offset on is cut
into pieces; each connection fetches the next piece not taken with
``Range: bytes=a-b`` and ``If-Range: <validator>``. Bytes of the piece at
the hashing front go to the digests as they arrive; bytes of later pieces
wait in memory (never on disk), at most ``SEGMENT_WINDOW`` ahead of the
front: a connection does not start a piece beyond the window, and one whose
bytes would overfill it pauses reading (TCP then slows the server), so the
fastest connections wait, never the hashing.

Every answer must be a 206 for exactly the piece (``Content-Range`` of
the same length) under the validator of the first answer (the same strong
ETag, or Last-Modified): anything else is another version of the file, or
none, and ends the download as ``changed`` (retried; the next attempt
starts over, as the checkpoint's validator no longer holds). Bytes of two
versions are never hashed together.

Servers that say no are followed, not fought: a 429 or 503 (or a refused
connection) on an extra connection retires that connection and its piece
goes to the others, down to one; ``why_fewer`` says why. A 200 to a
ranged request under the same validator means ranges are not honoured
after all (``RangesRefused``: the download goes on with one plain
request). Every connection resolves to the address the first request used
(``netpolicy.PINNED``), so all pieces come from the server the policy
checked first. A per-host budget (``HostSlots``) bounds a worker's extra
connections to one host across its downloads.

Mirrors (``mirrors``) are more sources of the same pieces: connections are
spread over the sources round-robin, each piece asks its own source with
that source's own validator in If-Range, and any failure of a mirror (an
error, a refusal, an answer of another version or range, a piece whose
Metalink hash disagrees) drops that mirror, with the reason, and its piece
goes back to the queue for the others. The primary keeps the rules above,
and always at least one connection. With a Metalink's piece hashes a
mirror's piece is held until it is whole and checked before any of it is
hashed: a corrupt mirror is pinned to the piece, and the piece is fetched
again elsewhere without starting over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import time
from collections import deque
from collections.abc import Awaitable
from typing import Any

from tornado import httputil
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.iostream import IOStream

from service.config import Config
from service.fetch import netpolicy
from service.fetch import tornado_hooks as hooks
from service.fetch.client import ResponseHead, host_of, retry_after_seconds
from service.fetch.errors import FetchError, Interrupted, classify
from service.fetch.hashing import DigestSink
from service.fetch.mirrors import Source
from service.model.pieces import PieceHashes

PIECE_MIN, PIECE_MAX = 1024**2, 16 * 1024**2
# Bytes hashed per IOLoop turn (about 0.6 ms of md5): see _advance.
HASH_SLICE = 256 * 1024
# Failed tries of pieces in a row (any connection) before the attempt fails.
MAX_FAILURES = 6
_REFUSING = {429, 503}


class RangesRefused(Exception):
    """The server answered a ranged request with the whole file under the
    same validator: it does not honour ranges for us."""


class _Retire(Exception):
    """This connection stops (the server refused it); its piece goes to the
    others. ``retry_after``: the server's Retry-After, if it said one."""

    def __init__(self, why: str, retry_after: float | None = None):
        super().__init__(why)
        self.why = why
        self.retry_after = retry_after


class _Again(Exception):
    """This try of a piece failed in a way another try may not."""


class _Drop(Exception):
    """A mirror failed: it serves no more pieces of this download."""


@dataclasses.dataclass
class Plan:
    url: str
    # What each piece's answer must carry: a strong ETag or Last-Modified.
    validator: str
    total: int
    connections: int
    user_agent: str
    max_redirects: int


class HostSlots:
    """Extra connections per host across one worker's downloads: twenty
    downloads from one server do not open eighty connections to it."""

    def __init__(self, limit: int):
        self.limit = limit
        self._used: dict[str, int] = {}

    def take(self, host: str) -> bool:
        if self._used.get(host, 0) >= self.limit:
            return False
        self._used[host] = self._used.get(host, 0) + 1
        return True

    def give(self, host: str) -> None:
        left = self._used.get(host, 0) - 1
        if left > 0:
            self._used[host] = left
        else:
            self._used.pop(host, None)


class _Piece:
    __slots__ = ("start", "end", "next", "buffer", "held")

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end
        self.next = start  # bytes [start, next) have arrived
        self.buffer = bytearray()
        # A mirror's piece that waits for its piece hashes before hashing.
        self.held = False

    def __lt__(self, other: _Piece) -> bool:
        return self.start < other.start


class _Exchange:
    """One ranged request: what the TCP client and the resolver need to
    know of it (its stream, to close it; the pinned addresses)."""

    def __init__(self, pins: dict[str, Any], host: str):
        self.pins, self.host = pins, host
        self.stream: IOStream | None = None
        self.closed_why: BaseException | None = None
        self.last_progress = time.monotonic()
        # Waiting for room in the window: quiet on purpose, not stalled.
        self.paused = False

    def attach(self, stream: IOStream, host: str | None = None) -> None:
        self.stream = stream
        if self.closed_why is not None:
            stream.close()

    def close(self, why: BaseException) -> None:
        if self.closed_why is None:
            self.closed_why = why
        if self.stream is not None:
            self.stream.close()


class Segments:
    """Fetch [sink.hashed, total) over ``plan.connections`` connections."""

    def __init__(self, plan: Plan, sink: DigestSink, client: AsyncHTTPClient, config: Config,
                 slots: HostSlots, pins: dict[str, Any], on_bytes: Any,
                 mirrors: list[Source] | None = None, pieces: PieceHashes | None = None):
        self.plan, self.sink, self.client, self.config = plan, sink, client, config
        self.slots, self.pins, self.on_bytes = slots, pins, on_bytes
        self.host = host_of(plan.url)
        self.sources = [Source(plan.url, plan.validator, primary=True), *(mirrors or [])]
        self.front = sink.hashed
        self.piece_size = max(PIECE_MIN, min(PIECE_MAX,
                                             config.segment_window // (2 * plan.connections)))
        # With piece hashes (mirrors.Wanted.usable_pieces: they fit, and a
        # piece is at most 16 MiB), pieces are whole multiples of the
        # Metalink's pieces, on its grid, so that one source sends all of each.
        self.pieces = pieces if len(self.sources) > 1 else None
        if self.pieces is not None:
            self.piece_size = self.pieces.length * max(1, self.piece_size // self.pieces.length)
        # Mirror bytes hashed that no piece hash checked: if the digest then
        # differs from what was expected, the mirrors are suspect, not the file.
        self.unchecked_mirror_bytes = 0
        self._next_start = self.front
        self._order: deque[_Piece] = deque()   # pieces not wholly hashed, in file order
        self._requeued: list[_Piece] = []      # heap: pieces a failed try gave back
        self._buffered = 0
        self._advancing = False  # an _advance_later is scheduled
        self._changed = asyncio.Event()
        self._exchanges: set[_Exchange] = set()
        self._failures = 0
        self.error: BaseException | None = None
        # What /tasks/<id> shows: how many connections ran, and why fewer.
        self.used = 0
        self.alive = 0
        self.why_fewer: str | None = None

    # -- control -----------------------------------------------------------

    def abort(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        for exchange in list(self._exchanges):
            exchange.close(error)
        self._pulse()

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _fewer(self, why: str) -> None:
        if self.why_fewer is None:
            self.why_fewer = why

    # -- the run -----------------------------------------------------------

    async def run(self) -> None:
        """Return once every byte up to ``total`` is hashed; raise what
        stopped it (FetchError, Interrupted, RangesRefused)."""
        jobs = [asyncio.ensure_future(self._connection(i)) for i in range(self.plan.connections)]
        watchdog = asyncio.ensure_future(self._watch())
        try:
            # The connections may all be done while the last bytes are
            # still being hashed (_advance_later).
            while self.front < self.plan.total and self.error is None \
                    and (self._advancing or any(not job.done() for job in jobs)):
                await self._changed.wait()
        finally:
            if self.error is None and self.front < self.plan.total:
                self.abort(FetchError("connection", f"no connection to {self.host} is left", True))
            elif self.front >= self.plan.total and self.error is None:
                self._pulse()
            watchdog.cancel()
            for job in jobs:
                if not job.done():
                    job.cancel()
            await asyncio.gather(*jobs, watchdog, return_exceptions=True)
        if self.error is not None:
            raise self.error

    async def _connection(self, index: int) -> None:
        live = [s for s in self.sources if s.dropped is None]
        source: Source | None = live[index % len(live)]
        assert source is not None
        # The first connection is the primary's and free; every other holds
        # one of its host's slots.
        slot = None
        if index > 0:
            if not self.slots.take(source.host):
                self._fewer(f"{self.slots.limit} connections to {source.host} were in use by "
                            "other downloads (MAX_CONNECTIONS_PER_HOST)")
                return
            slot = source.host
        self.alive += 1
        self.used = max(self.used, self.alive)
        source.alive += 1
        source.connections += 1
        try:
            while source is not None:
                if source.dropped is not None:
                    # Dropped by another connection's failure.
                    source.alive -= 1
                    source, slot = self._reassign(slot)
                    continue
                piece = await self._take(source)
                if piece is None:
                    if source.dropped is not None:
                        continue
                    return
                try:
                    await self._fetch(piece, source)
                    self._failures = 0
                except (_Retire, _Again, _Drop, FetchError) as exc:
                    if self.error is not None:
                        raise self.error from None
                    if not source.primary:
                        # A mirror gets no second chance: its piece goes to
                        # the others, and this connection to another source.
                        self._reset(piece)
                        self._give_back(piece)
                        self._drop(source, getattr(exc, "why", None) or str(exc))
                        source.alive -= 1
                        source, slot = self._reassign(slot)
                        continue
                    if isinstance(exc, FetchError):
                        raise
                    self._give_back(piece)
                    if isinstance(exc, _Retire):
                        if source.alive > 1:
                            self._fewer(exc.why)
                            return
                        await self._failed(exc.why, exc.retry_after)
                    else:
                        await self._failed(str(exc), None)
        except BaseException as exc:  # noqa: BLE001 - every end is the run's to report
            if not isinstance(exc, asyncio.CancelledError):
                self.abort(exc)
            raise
        finally:
            self.alive -= 1
            if source is not None:
                source.alive -= 1
            if slot is not None:
                self.slots.give(slot)
            self._pulse()

    def _drop(self, source: Source, why: str) -> None:
        if source.dropped is None:
            source.dropped = why
            self._pulse()

    def _reassign(self, slot: str | None) -> tuple[Source | None, str | None]:
        """The source a connection whose mirror was dropped serves next: the
        live one with the fewest connections, if its host has a slot."""
        if slot is not None:
            self.slots.give(slot)
        live = sorted((s for s in self.sources if s.dropped is None),
                      key=lambda s: (s.alive, not s.primary))
        for source in live:
            if self.slots.take(source.host):
                source.alive += 1
                source.connections += 1
                return source, source.host
        return None, None

    def _reset(self, piece: _Piece) -> None:
        """A held piece's bytes were never hashed: all of it is fetched again."""
        if piece.held:
            self._buffered -= len(piece.buffer)
            piece.buffer = bytearray()
            piece.next, piece.held = piece.start, False

    async def _failed(self, why: str, retry_after: float | None) -> None:
        self._failures += 1
        if self._failures > MAX_FAILURES:
            raise FetchError("connection", f"{self.host}: {why} ({MAX_FAILURES} tries of a "
                             "piece failed in a row)", True, retry_after)
        await asyncio.sleep(min(5.0, retry_after if retry_after is not None
                                else 0.2 * self._failures))

    async def _take(self, source: Source) -> _Piece | None:
        """The next piece for a free connection: one a failed try gave back,
        else the next in file order once it fits in the window. With piece
        hashes a mirror takes only whole pieces of the Metalink's grid that
        nothing of was received yet (it can then be checked before it is
        hashed); the primary takes any."""
        checked = self.pieces is not None and not source.primary
        while self.error is None and source.dropped is None:
            for piece in sorted(self._requeued):
                if not checked or self._checkable(piece):
                    self._requeued.remove(piece)
                    heapq.heapify(self._requeued)
                    piece.held = checked
                    return piece
            if self._next_start >= self.plan.total:
                return None
            start = self._next_start
            end = min(start + self.piece_size, self.plan.total)
            if self.pieces is not None:
                end = min((start // self.piece_size + 1) * self.piece_size, self.plan.total)
            fits = end - self.front <= self.config.segment_window or not self._order
            if fits and (not checked or self._checkable(_Piece(start, end))):
                piece = _Piece(start, end)
                piece.held = checked
                self._next_start = end
                self._order.append(piece)
                return piece
            await self._changed.wait()
        return None

    def _checkable(self, piece: _Piece) -> bool:
        assert self.pieces is not None
        length = self.pieces.length
        return piece.next == piece.start and piece.start % length == 0 \
            and (piece.end % length == 0 or piece.end == self.plan.total)

    def _give_back(self, piece: _Piece) -> None:
        if piece.next < piece.end:
            heapq.heappush(self._requeued, piece)
        self._pulse()

    # -- one piece ---------------------------------------------------------

    async def _fetch(self, piece: _Piece, source: Source) -> None:
        host = source.host
        exchange = _Exchange(self.pins, host)
        head = ResponseHead()
        # Set once the piece's last byte is in: the connection takes its next
        # piece then, not after the request's wind-down (several IOLoop turns,
        # each of which may be hashing a buffered piece; at every round of
        # pieces that idled each connection 60-80 ms, a tenth of the link).
        whole: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        want = f"bytes {piece.next}-{piece.end - 1}/{self.plan.total}"

        def on_header(line: str) -> None:
            if head.feed(line):
                assert head.status is not None
                problem = self._judge(head.status, head.headers, want, source)
                if problem is not None:
                    exchange.close(problem)

        def on_chunk(chunk: bytes) -> Any:
            if exchange.closed_why is not None or self.error is not None:
                return None
            exchange.last_progress = time.monotonic()
            if piece.next + len(chunk) > piece.end:
                exchange.close(FetchError("changed", f"{host} sent more than the range "
                                          "it was asked for", True))
                return None
            wait = self._deliver(piece, chunk, exchange, source)
            if piece.next == piece.end and exchange.closed_why is None and not whole.done():
                whole.set_result(None)
            return wait

        request = HTTPRequest(
            source.url, method="GET",
            headers={"Accept-Encoding": "identity", "Accept": "*/*",
                     "Range": f"bytes={piece.next}-{piece.end - 1}",
                     "If-Range": source.validator},
            user_agent=self.plan.user_agent, follow_redirects=True,
            max_redirects=self.plan.max_redirects, decompress_response=False,
            connect_timeout=self.config.connect_timeout, request_timeout=0,
            header_callback=on_header, streaming_callback=on_chunk)
        self._exchanges.add(exchange)
        owner = hooks.TrackingTCPClient.current.set(exchange)
        pinned = netpolicy.PINNED.set(self.pins)
        try:
            fetch = asyncio.ensure_future(self.client.fetch(request, raise_error=False))
        finally:
            hooks.TrackingTCPClient.current.reset(owner)
            netpolicy.PINNED.reset(pinned)
        # A run that ends (cancel, another piece's failure) cancels this
        # coroutine; the fetch itself ends when its stream is closed, and its
        # outcome is read then, so Tornado finds no cancelled future to fill.
        fetch.add_done_callback(_consume)
        either: list[asyncio.Future[Any]] = [fetch, whole]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if self.error is not None:
            raise self.error
        if not fetch.done():
            # Every byte of the piece is in (Content-Range and length were
            # judged at the headers). What the request still says is read
            # when it ends: more bytes than the range end the download.
            fetch.add_done_callback(lambda _: self._wound_down(exchange))
            return
        self._exchanges.discard(exchange)
        error: BaseException | None
        try:
            error = fetch.result().error
        except Exception as exc:  # noqa: BLE001 - resolve and connect errors come raised
            error = exc
        why = exchange.closed_why
        if isinstance(why, (FetchError, Interrupted, RangesRefused, _Retire, _Again, _Drop)):
            raise why
        if piece.next < piece.end:
            if error is not None and head.status is None:
                failure = classify(error, host, piece.next, self.config.connect_timeout)
                if failure.code in ("connection", "refused", "timeout") and source.alive > 1:
                    raise _Retire(f"{host} refused or dropped an extra connection "
                                  f"({failure.message})")
                if not failure.transient or not source.primary:
                    raise failure
                raise _Again(failure.message)
            raise _Again(f"{host} sent {piece.next - piece.start} of the piece's "
                         f"{piece.end - piece.start} bytes")

    def _wound_down(self, exchange: _Exchange) -> None:
        self._exchanges.discard(exchange)
        if isinstance(exchange.closed_why, FetchError):
            self.abort(exchange.closed_why)

    def _judge(self, status: int, headers: httputil.HTTPHeaders, want: str,
               source: Source) -> BaseException | None:
        """Why this answer cannot be used for the piece (None: it can)."""
        if not source.primary:
            mine = _validator_of(headers, source.validator)
            got = headers.get("Content-Range", "").strip()
            if status == 206 and mine == source.validator and got == want:
                return None
            return _Drop(f"a piece came back with status {status}, Content-Range "
                         f"{got or 'none'} and validator {mine or 'none'}, not 206 {want} "
                         f"under {source.validator}")
        if status in _REFUSING:
            return _Retire(f"{self.host} answered an extra connection with {status}",
                           retry_after_seconds(headers.get("Retry-After")))
        same = _validator_of(headers, self.plan.validator) == self.plan.validator
        if status == 200 and same:
            return RangesRefused()
        if status == 206 and same and headers.get("Content-Range", "").strip() == want:
            return None
        if status in (200, 206, 416):
            got = headers.get("Content-Range", "").strip() or "none"
            return FetchError("changed", (
                f"the file at {self.host} changed during the download (a piece came back "
                f"with status {status}, Content-Range {got} and validator "
                f"{_validator_of(headers, self.plan.validator) or 'none'}, not "
                f"{self.plan.validator}); it is fetched again from the start"), True)
        if 500 <= status < 600 or status == 408:
            return _Again(f"HTTP {status} from {self.host}")
        return FetchError("http_status", f"HTTP {status} from {self.host} for a piece", False)

    # -- in order ----------------------------------------------------------

    def _deliver(self, piece: _Piece, chunk: bytes, exchange: _Exchange,
                 source: Source) -> Awaitable[object] | None:
        piece.buffer += chunk
        piece.next += len(chunk)
        self._buffered += len(chunk)
        source.bytes += len(chunk)
        self.on_bytes(len(chunk))
        if piece.held and piece.next == piece.end:
            assert self.pieces is not None
            # Hashed here, on the IOLoop: a piece is at most 16 MiB (tens
            # of milliseconds of sha-1; MAX_CHECKED_PIECE), once a mirror piece.
            problem = self.pieces.problem(piece.start, piece.buffer)
            if problem is not None:
                exchange.close(_Drop(f"{problem}: its copy is corrupt"))
                return None
            piece.held = False
        elif not source.primary and not piece.held:
            self.unchecked_mirror_bytes += len(chunk)
        wait = self._advance()
        if wait is not None:
            return wait
        if self._order and piece is not self._order[0] \
                and self._buffered > self.config.segment_window:
            return self._room(exchange)
        return None

    def _advance(self) -> Awaitable[object] | None:
        """Hash what is contiguous at the front, at most HASH_SLICE bytes
        now; the rest on the next IOLoop turns. Pieces run in step, so when
        the front piece ends the next ones are mostly buffered: hashed at
        once, that held the IOLoop 60 ms at each round's end, and every
        connection's next request waited behind it (the resumable hashers
        keep the GIL, so a thread would not help)."""
        waits = []
        moved = False
        budget = HASH_SLICE
        while self._order:
            head = self._order[0]
            if head.held:
                break
            if head.buffer:
                if budget <= 0:
                    self._advance_soon()
                    break
                data = bytes(head.buffer[:budget])
                del head.buffer[:budget]
                budget -= len(data)
                self._buffered -= len(data)
                wait = self.sink.feed(data)
                if wait is not None:
                    waits.append(wait)
                self.front += len(data)
                moved = True
                if head.buffer:
                    continue
            if head.next < head.end:
                break
            self._order.popleft()
        if moved:
            self._pulse()
        if not waits:
            return None
        return asyncio.gather(*waits)

    def _advance_soon(self) -> None:
        if not self._advancing:
            self._advancing = True
            asyncio.get_running_loop().call_soon(self._advance_later)

    def _advance_later(self) -> None:
        self._advancing = False
        if self.error is not None:
            return
        try:
            wait = self._advance()
        except BaseException as exc:  # noqa: BLE001 - the run reports it, not the loop
            self.abort(exc)
            return
        if wait is not None:
            asyncio.ensure_future(wait).add_done_callback(self._fed)

    def _fed(self, wait: asyncio.Future) -> None:
        failed = None if wait.cancelled() else wait.exception()
        if failed is not None:
            self.abort(failed)
        else:
            self._advance_soon()

    async def _room(self, exchange: _Exchange) -> None:
        exchange.paused = True
        try:
            while self._buffered > self.config.segment_window and self.error is None:
                await self._changed.wait()
        finally:
            exchange.paused = False
            exchange.last_progress = time.monotonic()

    async def _watch(self) -> None:
        """A piece with no bytes for half IDLE_TIMEOUT is dropped and
        fetched again (from where it stopped), before the download's own
        watchdog would give up on the whole attempt."""
        limit = max(1.0, self.config.idle_timeout / 2)
        while True:
            await asyncio.sleep(min(1.0, limit / 2))
            now = time.monotonic()
            for exchange in list(self._exchanges):
                if not exchange.paused and now - exchange.last_progress > limit:
                    exchange.close(_Again(f"no data from {exchange.host} for {limit:g} s"))


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _validator_of(headers: httputil.HTTPHeaders, like: str) -> str | None:
    """The answer's validator of the kind the plan holds."""
    if like.startswith('"'):
        return headers.get("ETag", "").strip() or None
    return headers.get("Last-Modified", "").strip() or None
