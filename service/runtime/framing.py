"""JSON answers for requests Tornado refuses before any handler runs.

Tornado's HTTP/1 server answers a request it cannot frame (a bad
Content-Length, both Transfer-Encoding and Content-Length, a bad chunk, an
HTTP/0.9 or garbage request line, unparseable headers) with a bare
``HTTP/1.1 400 Bad Request`` and no body, and headers over
``max_header_size`` with a reset: the stream closes itself mid-read. No
RequestHandler is involved, so ``write_error`` cannot help. Both go through
the connection's IOStream, which ``HTTPServer.handle_stream`` (a public
override point) receives per connection; so this module's IOStream

- swaps that exact bare 400 (written by ``HTTP1Connection._read_message_inner``
  while it handles the HTTPInputError) for a JSON answer naming the problem;
- when a bounded read overflows and the stream closes itself, first sends a
  JSON 431 (request headers) or 400 (a chunk-size line).

Then the connection closes "lingering": we stop sending, and whatever the
client still sends is read and dropped for a short while, so the kernel does
not answer unread data with a reset that can destroy the answer before the
client has read it. tests/test_hardening_input.py checks that these hook
points are still in Tornado's source, so an upgrade that moves them fails
there loudly rather than silently bringing back bare answers.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from typing import Any

from tornado import gen
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream, StreamClosedError, UnsatisfiableReadError

# What HTTP1Connection writes for any HTTPInputError on the server side.
TORNADO_BARE_400 = b"HTTP/1.1 400 Bad Request\r\n\r\n"

LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024

# Tornado's messages for bodies over the limit; every other one is a 400.
_TOO_LARGE = ("Content-Length too long", "chunked body too large")

_lingering: set[asyncio.Task] = set()


def json_answer(code: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}, separators=(",", ":")).encode()
    head = (f"HTTP/1.1 {code} {reason}\r\n"
            "Content-Type: application/json; charset=UTF-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
            "Connection: close\r\n\r\n")
    return head.encode("ascii") + body


def framing_answer(problem: str) -> bytes:
    problem = problem[:200]
    if problem in _TOO_LARGE:
        return json_answer(413, "Payload Too Large", f"request body too large ({problem})")
    return json_answer(400, "Bad Request",
                       f"the request is not valid HTTP/1.1 ({problem}); check its request "
                       "line, headers, Content-Length and Transfer-Encoding")


class JsonErrorStream(IOStream):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bounded_read: tuple[str, int] | None = None
        self._responded = False  # to the request being read
        self._answered = False  # with a framing error: close lingering

    def read_until_regex(self, regex: Any, max_bytes: int | None = None) -> Any:
        # Tornado reads a request's start line and headers with this.
        self._bounded_read = ("headers", max_bytes) if max_bytes else None
        self._responded = False
        return super().read_until_regex(regex, max_bytes)

    def read_until(self, delimiter: bytes, max_bytes: int | None = None) -> Any:
        # ... and each chunk-size line of a chunked body with this.
        self._bounded_read = ("chunk", max_bytes) if max_bytes else None
        return super().read_until(delimiter, max_bytes)

    def write(self, data: bytes | memoryview) -> Any:
        if len(data) == len(TORNADO_BARE_400) and bytes(data) == TORNADO_BARE_400:
            self._answered = True
            if self._responded:
                # The handler already answered (a 413, say) before the body
                # went wrong; a second answer would only confuse the client.
                return super().write(b"")
            # Called from inside Tornado's ``except HTTPInputError``.
            problem = sys.exc_info()[1]
            data = framing_answer(str(problem) if problem else "malformed request")
        if not bytes(data[:10]).startswith(b"HTTP/1.1 1"):  # a 100 Continue is no answer
            self._responded = True
        return super().write(data)

    def close(self, exc_info: Any = False) -> None:
        if not self.closed():
            if isinstance(exc_info, UnsatisfiableReadError) and self._bounded_read:
                self._send_now(self._overflow_answer(*self._bounded_read))
            if self._answered:
                self._linger()
        super().close(exc_info)

    def _overflow_answer(self, what: str, limit: int) -> bytes:
        if what == "headers":
            return json_answer(431, "Request Header Fields Too Large",
                               f"request headers are larger than {limit // 1024} KiB; "
                               "send fewer or shorter headers")
        return framing_answer(f"a chunk-size line is longer than {limit} bytes")

    def _send_now(self, answer: bytes) -> None:
        # The stream is closing itself, so no IOStream write can follow. A
        # request is being read, so nothing of ours is queued before this
        # answer, and a few hundred bytes fit an empty socket buffer.
        if self._responded:
            return
        try:
            self.socket.send(answer)
            self._answered = True
        except OSError:
            pass

    def _linger(self) -> None:
        try:
            sock = self.socket.dup()  # keeps the connection open past close()
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        task = asyncio.get_running_loop().create_task(_drain(sock))
        _lingering.add(task)
        task.add_done_callback(_lingering.discard)


async def _drain(sock: socket.socket) -> None:
    stream = IOStream(sock)
    deadline = stream.io_loop.time() + LINGER_SECONDS
    received = 0
    try:
        while received < LINGER_BYTES:
            chunk = await gen.with_timeout(deadline, stream.read_bytes(65536, partial=True),
                                           quiet_exceptions=StreamClosedError)
            received += len(chunk)
    except (TimeoutError, StreamClosedError, OSError):
        pass
    finally:
        stream.close()


class JsonErrorHTTPServer(HTTPServer):
    """An HTTPServer whose connections answer framing errors in JSON."""

    def handle_stream(self, stream: IOStream, address: tuple) -> None:
        if type(stream) is IOStream:  # plain TCP; TLS streams are left alone
            stream = JsonErrorStream(stream.socket, max_buffer_size=stream.max_buffer_size,
                                     read_chunk_size=stream.read_chunk_size)
        super().handle_stream(stream, address)
