"""Download a URL and hash it as it streams, within limits.

The digests are of the bytes the server sends after redirects, exactly what
``curl -sL URL | md5sum`` sees: identity encoding is requested and nothing
is decompressed. Error pages are never hashed. A digest the server states
in its headers is checked against them (``server_claims``).

Tornado's fetch has no cancel API and its ``request_timeout`` bounds the
whole download, which is wrong for big files. So each download watches its
own progress and aborts by closing its connection (the stream reaches it
through ``httpclient_hooks``). The abort reason is kept here, because a
read-until-close body that is cut off looks, to Tornado, like a complete
one. An aborted fetch that Tornado still does not resolve is given up
after ``ABORT_GRACE`` seconds: every download ends, whatever the server
or the HTTP client does.

A download larger than RESUMABLE_MIN_SIZE is checkpointed as it goes, and
a retry resumes from its task's checkpoint (``resume``): ``bytes_done``
counts the file's bytes from offset 0 (the resumed ones included), and
``fetched`` what this attempt actually received.

A download of at least SEGMENT_MIN_SIZE whose first answer allows ranges
(``Accept-Ranges: bytes`` or a 206, a strong validator, a length) goes on
over several ranged connections (``segments``), hashed in order and
checkpointed at its hashing front whatever its size: its first request is
closed at its headers and the file fetched as pieces from then on. Its
pieces may also come from mirrors (``mirrors``: the task's, and those a
``Link: rel=duplicate`` of the first answer names), each probed first. If
mirror bytes that no piece hash checked end in a digest other than the
expected one (or the server's binding claim), the mirrors are suspect, not
the file: the download starts over from the primary alone, and
``sources_note`` says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable
from concurrent.futures import Executor
from typing import Any

from tornado import httputil
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.ioloop import PeriodicCallback
from tornado.iostream import IOStream

from service.config import Config, human_size
from service.fetch import mirrors, server_claims, stall
from service.fetch import tornado_hooks as hooks
from service.fetch.checkpoint import Checkpoint, strong_validators, validator
from service.fetch.client import host_of, retry_after_seconds
from service.fetch.errors import FetchError, Interrupted, classify
from service.fetch.hashing import DigestSink
from service.fetch.mirrors import Source, Wanted
from service.fetch.netpolicy import pin
from service.fetch.resume import Answer, Resumer
from service.fetch.segments import HostSlots, Plan, RangesRefused, Segments
from service.fetch.server_claims import Claim
from service.model.digests import ALWAYS, ServerDigest
from service.model.numbers import whole_number
from service.model.same_file import KnownFile

USER_AGENT = "md5-light/1.0 (+https://github.com/md5-light)"
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
# The redirects Tornado follows; any other 3xx is an answer, not a hop.
_FOLLOWED = {301, 302, 303, 307, 308}
# How long an aborted fetch may take to wind down before it is given up.
ABORT_GRACE = 2.0
# A big download's first bytes are held, unhashed, while its rate is
# measured: this much, or for this long, whichever comes first. The time is
# one connection's alone: at 16 MB/s a connection, a half second cost 0.4 s
# of a four-connection download; a quarter tells 80 MB/s from 20 as well.
MEASURE_BYTES = 8 * 1024 * 1024
MEASURE_SECONDS = 0.25


@dataclasses.dataclass
class Fetched:
    """What a download produced: the digests asked for, by algorithm, and
    the server's own claim checked against them."""
    digests: dict[str, str]
    server: ServerDigest | None = None
    # The response's validators, for a later revalidation (model.same_file).
    etag: str | None = None
    last_modified: str | None = None
    # The server answered 304 to the task's validators: ``digests`` are
    # the earlier download's, and no body was received.
    not_modified: bool = False


class _StartOver(Interrupted):
    """The answer to a range request cannot be used: fetch from byte 0."""


class _Segment(Interrupted):
    """The first answer allows ranges: go on over several connections."""


class _PrimaryOnly(Exception):
    """Mirror bytes went into a digest that is not what was expected."""


class Download:
    """One fetch of one URL into its digests."""

    def __init__(self, url: str, config: Config, client: AsyncHTTPClient,
                 executor: Executor | None, algorithms: list[str] | None = None,
                 checkpoint: Checkpoint | None = None, revalidate: KnownFile | None = None,
                 connections: int | None = None, slots: HostSlots | None = None,
                 wanted: Wanted | None = None):
        self.url = url
        # The task's mirrors and what checks their bytes; the mirrors the
        # first answer's Link headers name; each probed mirror (dropped
        # ones too, with why), and what became of them.
        self.wanted = wanted
        self.link_mirrors: list[str] = []
        self.mirror_sources: list[Source] = []
        self.sources_note: str | None = None
        self._primary_only = False
        self._probing: asyncio.Future | None = None
        # The URL of the hop being fetched (tornado_hooks sets it): Link
        # headers are relative to it.
        self.hop_url: str | None = None
        # Segmented downloads need the worker's per-host budget (``slots``).
        self.connections = (connections or config.connections_per_download) if slots else 1
        self.slots = slots
        self.segments: Segments | None = None
        # Why this download runs over one connection (None: it does not, or
        # it is not decided yet).
        self.single_why: str | None = None
        # The address each host's first connection went to (segments pin to it).
        self.pins: dict[str, tuple[int, str]] = {}
        # Asked with If-None-Match / If-Modified-Since (never together with
        # a resumed range: a checkpoint is newer knowledge than the cache).
        self.revalidate = revalidate if checkpoint is None else None
        self.config = config
        self.client = client
        self.algorithms = list(algorithms or [ALWAYS])
        self.resume = Resumer(config, self.algorithms, checkpoint)
        self.fetched = 0
        self._executor = executor
        self._begin()

    def _begin(self) -> None:
        """The state of one request (a start over within the attempt
        begins it anew, with fresh hashers)."""
        self.sink = DigestSink(self.algorithms, self._executor)
        self.claim: Claim | None = None
        self.bytes_done = 0
        self.bytes_total: int | None = None
        self.error: FetchError | Interrupted | None = None
        # When bytes last arrived (or the download began): /health calls a
        # worker stuck when a download shows no progress for long.
        self.last_progress = time.monotonic()
        self._stream: IOStream | None = None
        self._status: int | None = None
        self._reason = ""
        self._headers = httputil.HTTPHeaders()
        self._hashing = False
        self._not_modified = False
        self._mark = (time.monotonic(), 0)
        self._gave_up: asyncio.Future | None = None
        # While the first connection's rate is measured: when it began, the
        # bytes held, and the resume.begin arguments of a body from byte 0.
        self._measuring: float | None = None
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._fresh = False

    # -- control ----------------------------------------------------------

    def attach(self, stream: IOStream, host: str | None = None) -> None:
        self._stream = stream
        pin(self.pins, host, stream)
        if self.error is not None:
            stream.close()

    def abort(self, error: FetchError | Interrupted) -> None:
        # A reason from outside wins over a start over or a switch to
        # pieces, which would lose it (a drain's ShuttingDown is sent once).
        if self.error is None or isinstance(self.error, (_StartOver, _Segment)):
            self.error = error
        if self._stream is not None:
            self._stream.close()
        if self.segments is not None:
            self.segments.abort(self.error)
        if self._probing is not None:
            self._probing.cancel()
        # Closing the stream normally ends the fetch at once; should the
        # HTTP client still not resolve it, stop waiting for it.
        if self._gave_up is not None and not self._gave_up.done():
            asyncio.get_running_loop().call_later(ABORT_GRACE, stall.give_up, self._gave_up)

    def _watch(self) -> None:
        if self.error is not None:
            return
        self._mark, stalled = stall.check(self.config, host_of(self.url), self._mark,
                                          self.bytes_done, self.last_progress)
        if stalled is not None:
            self.abort(stalled)

    def checkpoint(self, due: bool = False) -> Checkpoint | None:
        """The checkpoint a retry would start from (None: byte 0); with
        ``due``, only a new one worth writing now."""
        return self.resume.due(self.sink) if due else self.resume.latest(self.sink)

    def progress(self) -> dict[str, Any]:
        shown = self.resume.progress(self.fetched)
        segments = self.segments
        shown["connections"] = {
            "used": segments.used if segments else 1, "asked": self.connections,
            "why_fewer": segments.why_fewer if segments else self.single_why}
        if self.mirror_sources:
            shown["sources"] = [s.view() for s in self.mirror_sources]
        note = self.sources_note
        why_one = self.single_why if self.connections > 1 else (
            "one connection was asked for, or this is a retry after the file changed")
        if note is None and not self.mirror_sources and why_one is not None and (
                self.link_mirrors or (self.wanted is not None and self.wanted.urls)):
            # Known once the first answer (and the link's rate) decided it.
            note = ("the mirrors were not used: mirrors serve pieces of a download over "
                    f"several connections, and this one ran over one ({why_one})")
        if note is not None:
            shown["sources_note"] = note
        return shown

    # -- Tornado callbacks -----------------------------------------------

    def _on_header(self, line: str) -> None:
        if line.startswith("HTTP/"):
            start = httputil.parse_response_start_line(line.strip())
            self._status, self._reason = start.code, start.reason[:100]
            self._headers = httputil.HTTPHeaders()
            return
        if self._status is None:
            return
        if line != "\r\n":
            self._headers.parse_line(line)
            return
        if 100 <= self._status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real
            # one follows on the same connection, as curl expects.
            self._status = None
            return
        self._on_headers_done()

    def _on_headers_done(self) -> None:
        status, host = self._status or 0, host_of(self.url)
        answer = self.resume.answer(status, self._headers)
        if answer is Answer.START_OVER:
            self.abort(_StartOver("the server's answer to a range request is not usable"))
            return
        if status == 304 and self.revalidate is not None:
            if not self.revalidate.confirmed_by(self._headers):
                # A 304 that does not name the version the digests are of.
                self.revalidate = None
                self.abort(_StartOver("the server's 304 did not repeat the validator"))
                return
            self._not_modified = True
            return
        if 200 <= status < 300 and self.connections > 1:
            self.link_mirrors = mirrors.duplicates(self._headers, self.hop_url or self.url)
        if answer is Answer.CONTINUE:
            self.claim, total = self.resume.continue_into(self.sink, self._headers)
            if total > self.config.max_file_size:
                self.abort(self._too_large())
                return
            if self._wrong_size(total):
                return
            self.bytes_done, self.bytes_total = self.sink.hashed, total
            self._mark = (time.monotonic(), self.bytes_done)
            self._hashing = True
            if self._worth_measuring(total):
                self._measuring = time.monotonic()
            return
        if status in _FOLLOWED and "Location" in self._headers:
            self.abort(FetchError(
                "redirects", f"more than {self.config.max_redirects} redirects", False))
            return
        if not 200 <= status < 300:
            transient = status in _TRANSIENT_STATUS
            message = f"HTTP {status} {self._reason} from {host}".replace("  ", " ")
            if 300 <= status < 400:
                message += " (not a redirect this service follows)"
            self.abort(FetchError("http_status", message, transient,
                                  retry_after_seconds(self._headers.get("Retry-After"))))
            return
        length = whole_number(self._headers.get("Content-Length", "").strip())
        if length is not None:
            if length > self.config.max_file_size:
                self.abort(self._too_large())
                return
            if self._wrong_size(length):
                return
            self.bytes_total = length
        self.claim = server_claims.pick(server_claims.claims(self._headers),
                                        self.sink.algorithms)
        if self.claim is not None:
            server_claims.prepare(self.claim, self.sink, self.bytes_total, self._headers, self)
        self._hashing = True
        if self._worth_measuring(self.bytes_total):
            # Which hashers and how many connections depend on the link's
            # rate, not on the size alone: decided in _decide.
            self._measuring, self._fresh = time.monotonic(), True
        else:
            self.resume.begin(self.sink, self.bytes_total, self._headers, self.claim)
            self._segmentable(self.bytes_total)  # says why one connection, if asked for more

    def _wrong_size(self, total: int) -> bool:
        """A file of another length than the Metalink's <size> is not the
        file it describes (aborted as ``mismatch``)."""
        size = self.wanted.size if self.wanted is not None else None
        if size is None or total == size:
            return False
        self.abort(FetchError("mismatch", (
            f"the file at {host_of(self.url)} is {total} bytes long, but the Metalink "
            f"document says {size}"), False))
        return True

    def _worth_measuring(self, total: int | None) -> bool:
        """Whether a slow link would change how this download goes on: a big
        file whose server allows ranges under a strong validator."""
        return (total is not None and total >= self.config.segment_min_size
                and (self._status == 206
                     or self._headers.get("Accept-Ranges", "").strip().lower() != "none")
                and validator(self._headers) is not None)

    def _decide(self, last: bool = False) -> Awaitable[object] | None:
        """The first connection's rate is known (``last``: the body ended
        first). Below SEGMENT_MAX_RATE the link, not the machine, is the
        limit: hash with the resumable hashers whatever the size (a crash
        then costs a checkpoint's worth, not the file) and, where the server
        allows, go on over several connections. At or above it, one
        connection and hashlib on threads, as for any fast download."""
        began = self._measuring or time.monotonic()
        rate = self._held_bytes / max(time.monotonic() - began, 1e-6)
        slow = rate < self.config.segment_max_rate and not last
        self._measuring = None
        if self._fresh:
            self.resume.begin(self.sink, self.bytes_total, self._headers, self.claim,
                              any_size=slow)
        waits = [w for w in (self.sink.feed(c) for c in self._held) if w is not None]
        self._held, self._held_bytes = [], 0
        segmentable = self.bytes_total is not None and self._segmentable(self.bytes_total)
        if slow and segmentable and self.sink.hashed < (self.bytes_total or 0):
            self.abort(_Segment("the link is slow and the server allows ranges: going on "
                                "over several connections"))
        elif segmentable and not slow:
            self.single_why = (f"its first connection alone delivered {rate / 1e6:.0f} MB/s "
                               f"(SEGMENT_MAX_RATE is {self.config.segment_max_rate / 1e6:.0f})")
        return asyncio.gather(*waits) if waits else None

    def _segmentable(self, total: int | None) -> bool:
        """Whether this first answer allows a segmented download; if not,
        and more than one connection was wanted, ``single_why`` says why."""
        if self.connections <= 1:
            return False
        headers = self._headers
        why = None
        if total is None:
            why = "the server did not announce the file's length"
        elif total < self.config.segment_min_size:
            why = "the file is smaller than SEGMENT_MIN_SIZE"
        elif self._status != 206 and \
                headers.get("Accept-Ranges", "").strip().lower() != "bytes":
            why = "the server does not announce Accept-Ranges: bytes"
        elif validator(headers) is None:
            why = ("the server sent no strong ETag nor Last-Modified, so pieces could not "
                   "be told to be of one version")
        self.single_why = why
        return why is None

    def _on_chunk(self, chunk: bytes):
        if not self._hashing or self.error is not None:
            return None
        self.bytes_done += len(chunk)
        self.fetched += len(chunk)
        self.last_progress = time.monotonic()
        if self.bytes_done > self.config.max_file_size:
            self.abort(self._too_large())
            return None
        if self._measuring is not None:
            self._held.append(chunk)
            self._held_bytes += len(chunk)
            if self._held_bytes >= MEASURE_BYTES \
                    or time.monotonic() - self._measuring >= MEASURE_SECONDS:
                return self._decide()
            return None
        return self.sink.feed(chunk)

    def _too_large(self) -> FetchError:
        return FetchError("too_large",
                          f"file larger than {human_size(self.config.max_file_size)} limit", False)

    # -- the fetch --------------------------------------------------------

    async def run(self) -> Fetched:
        """The digests of the body, or FetchError."""
        try:
            return await self._run()
        except _PrimaryOnly as exc:
            # Which mirror sent the wrong bytes is unknown (no piece hashes
            # pinned it): none is trusted again, and the primary alone
            # decides whether the file is the expected one.
            if self.error is not None and not isinstance(self.error, (_StartOver, _Segment)):
                raise self.error from None  # aborted meanwhile: a cancel, a drain
            self.sources_note = (f"{exc}; the mirrors' bytes are suspect, not the file, so it "
                                 f"was fetched again from {host_of(self.url)} alone")
            for source in self.mirror_sources:
                if source.dropped is None:
                    source.dropped = "its bytes were part of a digest that did not match"
            self._primary_only = True
            self.segments = None
            self.resume.forget()
            self._begin()
            return await self._run()

    async def _run(self) -> Fetched:
        try:
            try:
                return await self._run_once()
            except _StartOver:
                self._begin()
                return await self._run_once()
        except _Segment:
            self.error = None
            try:
                return await self._run_segmented()
            except RangesRefused:
                # Ranges are not honoured after all: one plain request,
                # hashed from byte 0 with fresh hashers.
                self.segments, self.error = None, None
                self.single_why = ("the server answered ranged requests with the whole file; "
                                   "fetched over one connection from the start")
                self.connections = 1
                self.resume.forget()
                self._begin()
                return await self._run_once()

    async def _run_segmented(self) -> Fetched:
        total = self.bytes_total
        assert total is not None
        plan = Plan(self.url, validator(self._headers) or "", total, self.connections,
                    USER_AGENT, self.config.max_redirects)
        assert self.slots is not None and plan.validator
        try:
            usable = [s for s in await self._probe_mirrors(plan) if s.dropped is None]
        except BaseException:
            await self.sink.discard()
            raise
        self.segments = segments = Segments(
            plan, self.sink, self.client, self.config, self.slots, self.pins,
            self._on_piece_bytes, mirrors=usable,
            pieces=self.wanted.usable_pieces(total) if self.wanted is not None else None)
        self.bytes_done = self.sink.hashed
        self._mark = (time.monotonic(), self.bytes_done)
        watchdog = PeriodicCallback(self._watch, 1000)
        watchdog.start()
        try:
            await segments.run()
        except BaseException:
            await self.sink.discard()
            raise
        finally:
            watchdog.stop()
            self.bytes_done = segments.front
        return self._checked(await self.sink.hexdigests())

    async def _probe_mirrors(self, plan: Plan) -> list[Source]:
        """Every mirror probed at once (``mirrors.probe``): the task's
        first, then the Link headers', MAX_MIRRORS in all."""
        if self._primary_only:
            return []
        wanted = self.wanted or Wanted([])
        urls: list[tuple[str, str]] = []
        for url, origin in [*((u, "submit") for u in wanted.urls),
                            *((u, "link") for u in self.link_mirrors)]:
            if url not in (self.url, self.hop_url) and all(url != u for u, _ in urls):
                urls.append((url, origin))
        if not urls:
            return []
        proof = wanted.proof(plan.total)
        self._probing = asyncio.ensure_future(asyncio.gather(*(
            mirrors.probe(url, origin, plan.validator, plan.total, proof, self.client,
                          self.config, self.pins, USER_AGENT)
            for url, origin in urls[:mirrors.MAX_MIRRORS])))
        try:
            self.mirror_sources = list(await self._probing)
        except asyncio.CancelledError:
            if self.error is not None:
                raise self.error from None
            raise
        finally:
            self._probing = None
        return self.mirror_sources

    def _on_piece_bytes(self, n: int) -> None:
        self.fetched += n
        self.last_progress = time.monotonic()
        if self.segments is not None:
            self.bytes_done = self.segments.front

    async def _run_once(self) -> Fetched:
        request = HTTPRequest(
            self.url, method="GET",
            headers={"Accept-Encoding": "identity", "Accept": "*/*",
                     **server_claims.REQUEST_HEADERS,
                     **self.resume.request_headers(),
                     **(self.revalidate.conditional_headers() if self.revalidate else {})},
            user_agent=USER_AGENT, follow_redirects=True,
            max_redirects=self.config.max_redirects,
            decompress_response=False,
            connect_timeout=self.config.connect_timeout,
            request_timeout=0,  # the watchdog bounds idleness instead
            header_callback=self._on_header, streaming_callback=self._on_chunk)
        self._gave_up = asyncio.get_running_loop().create_future()
        watchdog = PeriodicCallback(self._watch, 1000)
        watchdog.start()
        token = hooks.TrackingTCPClient.current.set(self)
        try:
            fetch = asyncio.ensure_future(self.client.fetch(request, raise_error=False))
        finally:
            hooks.TrackingTCPClient.current.reset(token)
        try:
            await asyncio.wait([fetch, self._gave_up], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watchdog.stop()
        response, fetch_exc = None, None
        if fetch.done():
            try:
                response = fetch.result()
                fetch_exc = response.error
            except Exception as exc:  # noqa: BLE001 - classify, don't crash the worker
                fetch_exc = exc
        else:
            fetch.add_done_callback(_ignore_outcome)
        if self.error is not None:
            await self.sink.discard()
            raise self.error
        if self._not_modified and response is not None and response.code == 304:
            await self.sink.discard()
            assert self.revalidate is not None
            # The validators confirmed (confirmed_by), kept for the next time.
            known = self.revalidate
            return Fetched({a: known.digests[a] for a in self.algorithms},
                           etag=known.etag, last_modified=known.last_modified,
                           not_modified=True)
        if response is None or response.code == 599 or not self._hashing:
            await self.sink.discard()
            host = host_of(response.effective_url if response and response.effective_url
                         else self.url)
            raise classify(fetch_exc, host, self.bytes_done, self.config.connect_timeout)
        if self._measuring is not None:
            wait = self._decide(last=True)
            if wait is not None:
                await wait
        if self.bytes_total is not None and self.bytes_done != self.bytes_total:
            await self.sink.discard()
            raise FetchError("truncated", (
                f"{host_of(self.url)} sent {self.bytes_done} bytes but announced "
                f"{self.bytes_total}"), True)
        return self._checked(await self.sink.hexdigests())

    def _validators(self) -> tuple[str | None, str | None]:
        return strong_validators(self._headers)

    def _mixed(self) -> bool:
        """Whether mirror bytes no piece hash checked may be in the digest:
        this run's, or a checkpoint's from an attempt that had mirrors."""
        if self._primary_only:
            return False
        if self.segments is not None and self.segments.unchecked_mirror_bytes:
            return True
        had = bool(self.link_mirrors or (self.wanted is not None and self.wanted.urls))
        return self.resume.resumed_from is not None and had

    def _mixed_problem(self, digests: dict[str, str]) -> str | None:
        expected = self.wanted.expected if self.wanted is not None else None
        if expected is not None and digests.get(expected.algorithm) != expected.hex:
            return (f"the {expected.algorithm} of the bytes from {host_of(self.url)} and its "
                    f"mirrors is {digests.get(expected.algorithm)}, not the expected "
                    f"{expected.hex}")
        if self.claim is not None and self.claim.binding:
            server = server_claims.compare(self.claim, digests, self.sink)
            if not server.match:
                return (f"the bytes from {host_of(self.url)} and its mirrors do not match "
                        f"its {server.header} header")
        return None

    def _checked(self, digests: dict[str, str]) -> Fetched:
        if self._mixed():
            problem = self._mixed_problem(digests)
            if problem is not None:
                raise _PrimaryOnly(problem)
        size = self.wanted.size if self.wanted is not None else None
        if size is not None and self.bytes_done != size:
            raise FetchError("mismatch", (
                f"the file at {host_of(self.url)} is {self.bytes_done} bytes long, but the "
                f"Metalink document says {size}"), False)
        etag, modified = self._validators()
        fetched = Fetched({a: digests[a] for a in self.algorithms}, etag=etag,
                          last_modified=modified)
        if self.claim is None:
            return fetched
        fetched.server = server = server_claims.compare(self.claim, digests, self.sink)
        if not server.match and self.claim.binding:
            self.resume.corrupted()
            raise FetchError("corrupted", server=server, transient=True, message=(
                f"the transfer from {host_of(self.url)} was corrupted: its {server.header} "
                f"header says {server.algorithm} {server.value}, but the "
                f"{self.bytes_done} bytes received hash to {digests[server.algorithm]}"))
        return fetched

def _ignore_outcome(future: asyncio.Future) -> None:
    """A given-up fetch may still end later; nobody is waiting for it then."""
    if not future.cancelled():
        future.exception()
