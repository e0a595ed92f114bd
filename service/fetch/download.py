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
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import Executor
from typing import Any

from tornado import httputil
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.ioloop import PeriodicCallback
from tornado.iostream import IOStream

from service.config import Config, human_size
from service.fetch import server_claims
from service.fetch import tornado_hooks as hooks
from service.fetch.checkpoint import Checkpoint, strong_validators
from service.fetch.client import host_of, retry_after_seconds
from service.fetch.errors import FetchError, Interrupted, classify
from service.fetch.hashing import DigestSink
from service.fetch.resume import Answer, Resumer
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


class Download:
    """One fetch of one URL into its digests."""

    def __init__(self, url: str, config: Config, client: AsyncHTTPClient,
                 executor: Executor | None, algorithms: list[str] | None = None,
                 checkpoint: Checkpoint | None = None, revalidate: KnownFile | None = None):
        self.url = url
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

    # -- control ----------------------------------------------------------

    def attach(self, stream: IOStream) -> None:
        self._stream = stream
        if self.error is not None:
            stream.close()

    def abort(self, error: FetchError | Interrupted) -> None:
        # A reason from outside wins over a start over, which would lose it.
        if self.error is None or isinstance(self.error, _StartOver):
            self.error = error
        if self._stream is not None:
            self._stream.close()
        # Closing the stream normally ends the fetch at once; should the
        # HTTP client still not resolve it, stop waiting for it.
        if self._gave_up is not None and not self._gave_up.done():
            asyncio.get_running_loop().call_later(ABORT_GRACE, self._give_up)

    def _give_up(self) -> None:
        if self._gave_up is not None and not self._gave_up.done():
            self._gave_up.set_result(None)

    def _watch(self) -> None:
        now = time.monotonic()
        since, at_bytes = self._mark
        if self.error is not None:
            return
        if self.bytes_done - at_bytes >= self.config.min_speed:
            self._mark = (now, self.bytes_done)
        elif now - since >= self.config.idle_timeout:
            seconds = f"{self.config.idle_timeout:g} s"
            if now - self.last_progress >= self.config.idle_timeout:
                message = f"no data from {host_of(self.url)} for {seconds}"
            else:
                message = (f"download from {host_of(self.url)} stalled: "
                           f"{self.bytes_done - at_bytes} bytes in {seconds}")
            self.abort(FetchError("timeout", message, transient=True))

    def checkpoint(self, due: bool = False) -> Checkpoint | None:
        """The checkpoint a retry would start from (None: byte 0); with
        ``due``, only a new one worth writing now."""
        return self.resume.due(self.sink) if due else self.resume.latest(self.sink)

    def progress(self) -> dict[str, Any]:
        return self.resume.progress(self.fetched)

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
        if answer is Answer.CONTINUE:
            self.claim, total = self.resume.continue_into(self.sink, self._headers)
            if total > self.config.max_file_size:
                self.abort(self._too_large())
                return
            self.bytes_done, self.bytes_total = self.sink.hashed, total
            self._mark = (time.monotonic(), self.bytes_done)
            self._hashing = True
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
            self.bytes_total = length
        self.claim = server_claims.pick(server_claims.claims(self._headers),
                                        self.sink.algorithms)
        if self.claim is not None:
            server_claims.prepare(self.claim, self.sink, self.bytes_total, self._headers, self)
        self.resume.begin(self.sink, self.bytes_total, self._headers, self.claim)
        self._hashing = True

    def _on_chunk(self, chunk: bytes):
        if not self._hashing or self.error is not None:
            return None
        self.bytes_done += len(chunk)
        self.fetched += len(chunk)
        self.last_progress = time.monotonic()
        if self.bytes_done > self.config.max_file_size:
            self.abort(self._too_large())
            return None
        return self.sink.feed(chunk)

    def _too_large(self) -> FetchError:
        return FetchError("too_large",
                          f"file larger than {human_size(self.config.max_file_size)} limit", False)

    # -- the fetch --------------------------------------------------------

    async def run(self) -> Fetched:
        """The digests of the body, or FetchError."""
        try:
            return await self._run_once()
        except _StartOver:
            self._begin()
            return await self._run_once()

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
        if self.bytes_total is not None and self.bytes_done != self.bytes_total:
            await self.sink.discard()
            raise FetchError("truncated", (
                f"{host_of(self.url)} sent {self.bytes_done} bytes but announced "
                f"{self.bytes_total}"), True)
        return self._checked(await self.sink.hexdigests())

    def _validators(self) -> tuple[str | None, str | None]:
        return strong_validators(self._headers)

    def _checked(self, digests: dict[str, str]) -> Fetched:
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
