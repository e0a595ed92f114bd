"""Every place md5-light reaches into Tornado's HTTP client internals.

Tornado's ``SimpleAsyncHTTPClient`` has no public way to do what a
checksum service needs, so these subclasses override private methods of
Tornado 6.6 (``tests/test_hardening_fetch.py`` fails loudly if an upgrade
removes one of them):

- Larger body reads (``params.chunk_size``): at gigabytes a second the
  Python work per 64 KiB read, not the copying, limits throughput.
- Framing checks that Tornado either lacks or only logs: a malformed
  response (conflicting or negative Content-Length, Transfer-Encoding with
  Content-Length, a bad chunk, no status line) is remembered on the stream
  as an ``HTTPInputError`` so that the fetch fails with that reason,
  instead of a bare "connection closed" that looks transient.
- Chunked bodies read as curl reads them: chunk extensions
  (``5;name=value``) and trailers are accepted; Tornado refuses both.
- ``on_connection_close`` hands a stream's real error to the fetch's
  callback. Tornado 6.6 raises it instead, inside a block that logs and
  swallows it, so the fetch never resolved (a chunk-size line over 64
  bytes hung a download forever).
- A TCPClient that hands each connection's stream to the download that
  opened it, so that a watchdog can abort it by closing the stream.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from typing import Any

from tornado import httputil
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.iostream import IOStream, StreamClosedError, UnsatisfiableReadError
from tornado.simple_httpclient import HTTPStreamClosedError, SimpleAsyncHTTPClient, _HTTPConnection
from tornado.tcpclient import TCPClient

from service.model.numbers import whole_number

READ_CHUNK = 512 * 1024
SOCKET_READ = 256 * 1024
# curl skips a chunk extension of any length; a bound still stops one
# endless line from buffering without limit.
CHUNK_LINE_MAX = 16 * 1024
TRAILERS_MAX = 64 * 1024
_HEX = frozenset(b"0123456789abcdefABCDEF")
# Yield to the IOLoop now and then when a body arrives faster than it is
# handled, as Tornado's own readers do.
_YIELD_EVERY = 256 * 1024


class MalformedResponse(httputil.HTTPInputError):
    """The server broke HTTP/1.1 framing; the message says how."""


class HeadersTooLarge(httputil.HTTPInputError):
    pass


def _is_done(future: Awaitable) -> bool:
    return isinstance(future, asyncio.Future) and future.done()


class StrictHTTP1Connection(HTTP1Connection):
    """The client side of one HTTP/1.1 exchange, stricter and more lenient
    where curl is (see the module docstring)."""

    def _malformed(self, message: str) -> MalformedResponse:
        error = MalformedResponse(message)
        if self.stream is not None:
            # Tornado catches the HTTPInputError, logs it and closes the
            # stream; the client's on_connection_close then reports this.
            self.stream.error = error
        return error

    def _parse_headers(self, data: bytes) -> tuple[str, httputil.HTTPHeaders]:
        try:
            start_line, headers = super()._parse_headers(data)
        except httputil.HTTPInputError as exc:
            raise self._malformed(f"its response headers are not valid ({exc})") from None
        if self.is_client:
            try:
                httputil.parse_response_start_line(start_line)
            except httputil.HTTPInputError:
                raise self._malformed(
                    f"its response does not start with an HTTP status line "
                    f"(got {start_line[:40]!r}; HTTP/0.9 is not supported)") from None
        return start_line, headers

    def _read_body(self, code: int, headers: httputil.HTTPHeaders,
                   delegate: httputil.HTTPMessageDelegate) -> Awaitable[None] | None:
        problem = framing_problem(headers)
        if problem:
            raise self._malformed(problem)
        return super()._read_body(code, headers, delegate)

    async def _read_chunked_body(self, delegate: httputil.HTTPMessageDelegate) -> None:
        # Tornado's reader, with chunk extensions and trailers accepted.
        # Small chunks are coalesced, and pending data is delivered whenever
        # the next read would wait for the network.
        pending = bytearray()
        work = 0

        def read(future: Awaitable[bytes]) -> Awaitable[bytes]:
            if pending and not _is_done(future):
                return flush_and_read(future)
            return future

        async def flush_and_read(future: Awaitable[bytes]) -> bytes:
            data = bytes(pending)
            pending.clear()
            await self._deliver_body(delegate, data)
            return await future

        chunk_size = self.params.chunk_size
        while True:
            line = await read(self._read_line(CHUNK_LINE_MAX, "a chunk-size line"))
            size = parse_chunk_size(line)
            if size is None:
                raise self._malformed(f"a chunk-size line is not valid: {line[:40]!r}")
            if size == 0:
                await read(self._read_trailers())
                if pending:
                    await self._deliver_body(delegate, bytes(pending))
                return
            left = size
            while left:
                chunk = await read(self.stream.read_bytes(min(left, chunk_size), partial=True))
                left -= len(chunk)
                if not pending and len(chunk) == chunk_size:
                    await self._deliver_body(delegate, chunk)
                else:
                    pending += chunk
                    if len(pending) >= chunk_size:
                        data = bytes(pending[:chunk_size])
                        del pending[:chunk_size]
                        await self._deliver_body(delegate, data)
                work += len(chunk)
                if work >= _YIELD_EVERY:
                    work = 0
                    await asyncio.sleep(0)
            if await read(self.stream.read_bytes(2)) != b"\r\n":
                raise self._malformed("a chunk is longer than its chunk-size line says")
            work += 1024
            if work >= _YIELD_EVERY:
                work = 0
                await asyncio.sleep(0)

    async def _read_line(self, limit: int, what: str) -> bytes:
        try:
            return await self.stream.read_until(b"\r\n", max_bytes=limit)
        except StreamClosedError as exc:
            if isinstance(exc.real_error, UnsatisfiableReadError):
                raise self._malformed(f"{what} is longer than {limit} bytes") from None
            raise

    async def _read_trailers(self) -> bytes:
        """Trailer fields after the last chunk: read and ignored, as curl does."""
        total = 0
        while True:
            line = await self._read_line(TRAILERS_MAX, "a trailer line")
            total += len(line)
            if line == b"\r\n":
                return b""
            if total > TRAILERS_MAX:
                raise self._malformed(f"its trailers are longer than {TRAILERS_MAX} bytes")


def parse_chunk_size(line: bytes) -> int | None:
    """``1a;name=value\\r\\n`` -> 26; None when it is not a chunk size."""
    digits = line[:-2].split(b";", 1)[0].strip(b" \t")
    if not digits or len(digits) > 16 or not _HEX.issuperset(digits):
        return None
    return int(digits, 16)


def framing_problem(headers: httputil.HTTPHeaders) -> str | None:
    """Why a response's framing cannot be trusted, or None. These are the
    request-smuggling shapes (RFC 9112 section 6): curl refuses most of them
    too, and hashing any of them could report the md5 of the wrong bytes."""
    lengths = headers.get_list("Content-Length")
    encodings = headers.get_list("Transfer-Encoding")
    if lengths and encodings:
        return "it sent both Transfer-Encoding and Content-Length"
    values = {v.strip() for item in lengths for v in item.split(",")}
    if len(values) > 1:
        return f"it sent conflicting Content-Length values ({', '.join(sorted(values))})"
    if values:
        value = values.pop()
        if whole_number(value, max_digits=len(value)) is None:
            return f"its Content-Length is not a whole number ({value[:40]!r})"
    if encodings:
        codings = [c.strip().lower() for item in encodings for c in item.split(",")]
        if codings != ["chunked"]:
            return (f"its Transfer-Encoding {', '.join(codings)[:60]!r} is not supported "
                    "(only chunked)")
    return None


class _Exchange(_HTTPConnection):
    """One request of the client, with the connection class above."""

    def _create_connection(self, stream: IOStream) -> HTTP1Connection:
        stream.set_nodelay(True)
        return StrictHTTP1Connection(
            stream, True,
            HTTP1ConnectionParameters(
                no_keep_alive=True, max_header_size=self.max_header_size,
                max_body_size=self.max_body_size, chunk_size=READ_CHUNK,
                decompress=bool(self.request.decompress_response)),
            self._sockaddr)

    def on_connection_close(self) -> None:
        if self.final_callback is None:
            return
        error = self.stream.error
        if isinstance(error, UnsatisfiableReadError):
            error = HeadersTooLarge(f"its response headers are larger than "
                                    f"{self.max_header_size // 1024} KiB")
        if error is None:
            error = HTTPStreamClosedError("Connection closed")
        self._handle_exception(type(error), error, None)

    def _handle_exception(self, typ: Any, value: BaseException | None, tb: Any) -> bool:
        if isinstance(value, StreamClosedError) and self.code is None:
            value = self._before_headers(value)
        return super()._handle_exception(typ, value, tb)

    def _before_headers(self, error: StreamClosedError) -> BaseException:
        """Why the connection ended before a complete response head."""
        # Headers over max_header_size end as a StreamClosedError whose real
        # error names a regular expression.
        if isinstance(error.real_error, UnsatisfiableReadError):
            return HeadersTooLarge(f"its response headers are larger than "
                                   f"{self.max_header_size // 1024} KiB")
        # Data that never formed a response head: if it does not even begin
        # like a status line, it is an HTTP/0.9 answer, which curl refuses
        # too. A server that dies mid-head stays a (transient) closed
        # connection. Tornado keeps what arrived in a private buffer.
        stream = getattr(self, "stream", None)
        start = bytes(getattr(stream, "_read_buffer", b"")[:5])
        if start and not b"HTTP/".startswith(start) and not start.startswith(b"HTTP/"):
            return MalformedResponse(
                "its response does not start with an HTTP status line "
                "(HTTP/0.9 is not supported)")
        return error


class Client(SimpleAsyncHTTPClient):
    # Called with each request's URL and headers before it is sent, redirect
    # hops included (Tornado fetches each hop through fetch_impl).
    before_hop: Callable[[str, httputil.HTTPHeaders], None] | None = None

    def _connection_class(self) -> type:
        return _Exchange

    def fetch_impl(self, request: Any, callback: Callable[[Any], None]) -> None:
        if self.before_hop is not None:
            self.before_hop(request.url, request.headers)
        owner = TrackingTCPClient.current.get()
        if owner is not None:
            # The URL of the hop being fetched (the download's own is the first).
            owner.hop_url = request.url
        super().fetch_impl(request, callback)


class TrackingTCPClient(TCPClient):
    """Hands every new stream to ``on_stream`` of the download whose context
    opened it. The context variable is set around ``fetch``, and Tornado's
    connection task, created inside that call, inherits it."""

    current: contextvars.ContextVar[Any] = contextvars.ContextVar(
        "md5light_download", default=None)

    async def connect(self, *args: Any, **kwargs: Any) -> IOStream:  # type: ignore[override]
        stream = await super().connect(*args, **kwargs)
        stream.read_chunk_size = SOCKET_READ
        owner = self.current.get()
        if owner is not None:
            owner.attach(stream, args[0] if args else kwargs.get("host"))
        return stream


def make_client(resolver: Any, max_clients: int, max_header_size: int) -> Client:
    client = Client(force_instance=True, max_clients=max_clients, resolver=resolver,
                    max_body_size=2**62, max_header_size=max_header_size)
    # SimpleAsyncHTTPClient builds its own TCPClient from the resolver and
    # offers no argument for another class.
    client.tcp_client = TrackingTCPClient(resolver=resolver)
    return client


PRIVATE_HOOKS: list[tuple[type, str]] = [
    (HTTP1Connection, "_parse_headers"), (HTTP1Connection, "_read_body"),
    (HTTP1Connection, "_read_chunked_body"), (HTTP1Connection, "_deliver_body"),
    (_HTTPConnection, "_create_connection"), (_HTTPConnection, "on_connection_close"),
    (_HTTPConnection, "_handle_exception"), (SimpleAsyncHTTPClient, "_connection_class"),
    (SimpleAsyncHTTPClient, "fetch_impl"),
]
# Instance attributes read above, set in IOStream.__init__.
PRIVATE_STREAM_ATTRIBUTES = ["_read_buffer"]
