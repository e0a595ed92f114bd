"""Connections at accept time: a cap per remote address, and an accept loop
that survives running out of file descriptors without flooding the log.

20,000 slowloris connections from one host once took every descriptor.
Tornado's accept handler (tornado.netutil.add_accept_handler) catches only
EWOULDBLOCK and ECONNABORTED: EMFILE escapes into the event loop, which
logs a traceback and, the listening socket being still readable, calls the
handler again at once: 190,000 tracebacks in 18 s and a core at 100%.
Here an over-cap connection is closed as soon as it is accepted, EMFILE
pauses accepting for a moment instead, and both are logged at most once a
second with a count of what was left out.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

from service.intake.admission import client_key

log = logging.getLogger("md5light.api")

ACCEPT_PAUSE = 0.1
_ACCEPT_BATCH = 128
# Running out of descriptors or kernel memory: retrying at once cannot help.
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class ThrottledLog:
    """A warning at most once per ``interval``; what was left out is
    counted and reported by the next line, or after the interval."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0):
        self.logger, self.interval = logger, interval
        self._last = float("-inf")
        self._suppressed = 0
        self._message = ""

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            if self._suppressed == 0:
                IOLoop.current().call_later(self._last + self.interval - now, self._flush)
            self._suppressed += 1
            self._message = message
            return
        self._emit(message, now)

    def _flush(self) -> None:
        if self._suppressed:
            self._emit(self._message, time.monotonic())

    def _emit(self, message: str, now: float) -> None:
        if self._suppressed:
            message += f" ({self._suppressed} more like this in the last second)"
        self.logger.warning("%s", message)
        self._last, self._suppressed = now, 0


_accept_log = ThrottledLog(log)
_refusal_log = ThrottledLog(log)


class LimitedHTTPServer(HTTPServer):
    """HTTPServer with MAX_CONNECTIONS_PER_CLIENT and a quiet accept loop."""

    def initialize(self, *args: Any, max_connections_per_client: int = 0,
                   **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        self.max_per_client = max_connections_per_client
        self._open: collections.Counter[str] = collections.Counter()
        self._client_of: dict[Any, str] = {}

    def add_sockets(self, sockets) -> None:
        # TCPServer.add_sockets with our accept handler; stop() undoes it
        # through the same two dictionaries.
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = add_accept_handler(sock, self._handle_connection)

    def handle_stream(self, stream, address) -> None:
        client = client_key(address[0]) if isinstance(address, tuple) else "local"
        if self.max_per_client and self._open[client] >= self.max_per_client:
            _refusal_log.warning(f"closing new connections from {client}: it holds "
                                 f"{self._open[client]} (MAX_CONNECTIONS_PER_CLIENT)")
            stream.close()
            return
        self._open[client] += 1
        self._client_of[stream] = client
        super().handle_stream(stream, address)

    def on_close(self, server_conn) -> None:
        super().on_close(server_conn)
        client = self._client_of.pop(server_conn.stream, None)
        if client is not None:
            self._open[client] -= 1
            if self._open[client] <= 0:
                del self._open[client]


def add_accept_handler(sock: socket.socket,
                       callback: Callable[[socket.socket, Any], None]) -> Callable[[], None]:
    """tornado.netutil.add_accept_handler, plus: when descriptors run out,
    stop watching the socket for ACCEPT_PAUSE (the waiting connections stay
    in the kernel's backlog) and log it, throttled."""
    io_loop = IOLoop.current()
    state: dict[str, Any] = {"removed": False, "timer": None}

    def accept(fd: socket.socket, events: int) -> None:
        for _ in range(_ACCEPT_BATCH):
            if state["removed"]:
                return
            try:
                connection, address = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _EXHAUSTED:
                    raise
                _accept_log.warning(f"cannot accept connections: {os.strerror(exc.errno)}; "
                                    f"pausing accepts for {ACCEPT_PAUSE} s")
                io_loop.remove_handler(sock)
                state["timer"] = io_loop.call_later(ACCEPT_PAUSE, resume)
                return
            callback(connection, address)

    def resume() -> None:
        state["timer"] = None
        if not state["removed"]:
            io_loop.add_handler(sock, accept, IOLoop.READ)

    def remove() -> None:
        if state["timer"] is not None:
            io_loop.remove_timeout(state["timer"])
        else:
            io_loop.remove_handler(sock)
        state["removed"] = True

    io_loop.add_handler(sock, accept, IOLoop.READ)
    return remove


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: the default soft limit
    (often 1,024) is what a burst of connections exhausts first. Children
    started after this (the workers) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open file limit raised from %d to %d", soft, target)
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open file limit from %d: %s", soft, exc)
