"""Download a URL and hash it as it streams, within limits.

The md5 is of the bytes the server sends after redirects, exactly what
``curl -sL URL | md5sum`` sees: identity encoding is requested and nothing
is decompressed. Error pages are never hashed.

Tornado's fetch has no cancel API and its ``request_timeout`` bounds the
whole download, which is wrong for big files. So each download watches its
own progress and aborts by closing its connection; a TCPClient subclass
hands the connection's stream to the download it belongs to (through a
context variable that Tornado's connection task inherits). The abort
reason is kept here, because a read-until-close body that is cut off
looks, to Tornado, like a complete one.
"""

from __future__ import annotations

import contextvars
import email.utils
import errno
import socket
import ssl
import time
import urllib.parse
from concurrent.futures import Executor
from dataclasses import dataclass

from tornado import httputil
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse
from tornado.ioloop import PeriodicCallback
from tornado.iostream import IOStream, StreamClosedError
from tornado.simple_httpclient import (HTTPStreamClosedError, HTTPTimeoutError,
                                       SimpleAsyncHTTPClient, _HTTPConnection)
from tornado.tcpclient import TCPClient

from .config import Config, human_size
from .hashing import Md5Sink
from .netpolicy import AddressPolicy, BlockedAddress, FilteringResolver, parse_overrides
from .redact import scrub_urls

USER_AGENT = "md5-light/1.0 (+https://github.com/md5-light)"
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}

_current: contextvars.ContextVar["Download | None"] = contextvars.ContextVar(
    "md5light_download", default=None)


@dataclass
class FetchError(Exception):
    code: str
    message: str
    transient: bool
    retry_after: float | None = None

    def __str__(self) -> str:
        return self.message

    def as_doc(self) -> dict:
        return {"code": self.code, "message": self.message}


# Tornado reads bodies 64 KiB at a time; at gigabytes a second the Python
# work per read, not the copying, limits throughput. Larger reads cut it
# eightfold (profiled: see bench/perf.py and the README).
READ_CHUNK = 512 * 1024
SOCKET_READ = 256 * 1024


class _LargeReadConnection(_HTTPConnection):
    def _create_connection(self, stream: IOStream):
        connection = super()._create_connection(stream)
        connection.params.chunk_size = READ_CHUNK
        return connection


class _Client(SimpleAsyncHTTPClient):
    def _connection_class(self) -> type:
        return _LargeReadConnection


class _TrackingTCPClient(TCPClient):
    async def connect(self, *args, **kwargs) -> IOStream:  # type: ignore[override]
        stream = await super().connect(*args, **kwargs)
        stream.read_chunk_size = SOCKET_READ
        download = _current.get()
        if download is not None:
            download.attach(stream)
        return stream


def make_client(config: Config) -> AsyncHTTPClient:
    """One client per worker process, sized to its concurrency so that no
    request waits in Tornado's queue (where it would time out)."""
    resolver = FilteringResolver(
        policy=AddressPolicy(config.allow_private_urls, config.allow_networks),
        overrides=parse_overrides(config.resolve))
    # max_body_size is left unbounded: the Download enforces MAX_FILE_SIZE
    # itself, so that hitting it reads as "too large" and not as a dropped
    # connection, whatever the framing (length, chunked, until close).
    client = _Client(force_instance=True, max_clients=config.concurrency,
                             resolver=resolver, max_body_size=2**62,
                             max_header_size=64 * 1024)
    client.tcp_client = _TrackingTCPClient(resolver=resolver)
    return client


def _host(url: str) -> str:
    try:
        return urllib.parse.urlsplit(url).hostname or url
    except ValueError:
        return url


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Download:
    """One fetch of one URL into an md5."""

    def __init__(self, url: str, config: Config, client: AsyncHTTPClient,
                 executor: Executor | None):
        self.url = url
        self.config = config
        self.client = client
        self.sink = Md5Sink(executor)
        self.bytes_done = 0
        self.bytes_total: int | None = None
        self.error: FetchError | None = None
        self._stream: IOStream | None = None
        self._status: int | None = None
        self._reason = ""
        self._headers = httputil.HTTPHeaders()
        self._hashing = False
        self._mark = (time.monotonic(), 0)
        self._last_data = time.monotonic()

    # -- control ----------------------------------------------------------

    def attach(self, stream: IOStream) -> None:
        self._stream = stream
        if self.error is not None:
            stream.close()

    def abort(self, error: FetchError) -> None:
        if self.error is None:
            self.error = error
        if self._stream is not None:
            self._stream.close()

    def _watch(self) -> None:
        now = time.monotonic()
        since, at_bytes = self._mark
        if self.bytes_done - at_bytes >= self.config.min_speed:
            self._mark = (now, self.bytes_done)
        elif now - since >= self.config.idle_timeout:
            seconds = f"{self.config.idle_timeout:g} s"
            if now - self._last_data >= self.config.idle_timeout:
                message = f"no data from {_host(self.url)} for {seconds}"
            else:
                message = (f"download from {_host(self.url)} stalled: "
                           f"{self.bytes_done - at_bytes} bytes in {seconds}")
            self.abort(FetchError("timeout", message, transient=True))

    # -- Tornado callbacks -----------------------------------------------

    def _on_header(self, line: str) -> None:
        if self._status is None or line.startswith("HTTP/"):
            if line.startswith("HTTP/"):
                start = httputil.parse_response_start_line(line.strip())
                self._status, self._reason = start.code, start.reason
                self._headers = httputil.HTTPHeaders()
            return
        if line != "\r\n":
            self._headers.parse_line(line)
            return
        self._on_headers_done()

    def _on_headers_done(self) -> None:
        status, host = self._status or 0, _host(self.url)
        if 300 <= status < 400 and "Location" in self._headers:
            self.abort(FetchError(
                "redirects", f"more than {self.config.max_redirects} redirects", False))
            return
        if not 200 <= status < 300:
            transient = status in _TRANSIENT_STATUS
            self.abort(FetchError(
                "http_status", f"HTTP {status} {self._reason} from {host}".replace("  ", " "),
                transient, _retry_after(self._headers.get("Retry-After"))))
            return
        length = self._headers.get("Content-Length")
        if length is not None:
            try:
                self.bytes_total = int(length.split(",")[0])
            except ValueError:
                self.abort(FetchError("bad_response",
                                      f"{host} sent an invalid Content-Length", False))
                return
            if self.bytes_total > self.config.max_file_size:
                self.abort(self._too_large())
                return
        self._hashing = True

    def _on_chunk(self, chunk: bytes):
        if not self._hashing or self.error is not None:
            return None
        self.bytes_done += len(chunk)
        self._last_data = time.monotonic()
        if self.bytes_done > self.config.max_file_size:
            self.abort(self._too_large())
            return None
        return self.sink.feed(chunk)

    def _too_large(self) -> FetchError:
        return FetchError("too_large",
                          f"file larger than {human_size(self.config.max_file_size)} limit", False)

    # -- the fetch --------------------------------------------------------

    async def run(self) -> str:
        """The md5 hex digest of the body, or FetchError."""
        request = HTTPRequest(
            self.url, method="GET",
            headers={"Accept-Encoding": "identity", "Accept": "*/*"},
            user_agent=USER_AGENT, follow_redirects=True,
            max_redirects=self.config.max_redirects,
            decompress_response=False,
            connect_timeout=self.config.connect_timeout,
            request_timeout=0,  # the watchdog bounds idleness instead
            header_callback=self._on_header, streaming_callback=self._on_chunk)
        watchdog = PeriodicCallback(self._watch, 1000)
        watchdog.start()
        token = _current.set(self)
        try:
            response = await self.client.fetch(request, raise_error=False)
        except Exception as exc:  # noqa: BLE001 - classify, don't crash the worker
            response = None
            fetch_exc: BaseException | None = exc
        else:
            fetch_exc = response.error
        finally:
            _current.reset(token)
            watchdog.stop()
        if self.error is not None:
            await self.sink.discard()
            raise self.error
        if response is None or response.code == 599 or not self._hashing:
            await self.sink.discard()
            raise self._classify(fetch_exc, response)
        if self.bytes_total is not None and self.bytes_done != self.bytes_total:
            await self.sink.discard()
            raise FetchError("truncated", (
                f"{_host(self.url)} sent {self.bytes_done} bytes but announced "
                f"{self.bytes_total}"), True)
        return await self.sink.hexdigest()

    def _classify(self, exc: BaseException | None, response: HTTPResponse | None) -> FetchError:
        host = _host(response.effective_url if response and response.effective_url else self.url)
        if isinstance(exc, BlockedAddress):
            return FetchError("blocked", str(exc), False)
        if isinstance(exc, socket.gaierror):
            transient = exc.errno in (socket.EAI_AGAIN,)
            return FetchError("dns", f"could not resolve host {host}", transient)
        if isinstance(exc, HTTPTimeoutError):
            return FetchError("timeout", f"timed out connecting to {host} "
                              f"(CONNECT_TIMEOUT {self.config.connect_timeout:g} s)", True)
        if isinstance(exc, ssl.SSLCertVerificationError):
            return FetchError("tls", f"TLS certificate of {host} is not valid: "
                              f"{exc.verify_message}", False)
        if isinstance(exc, ssl.SSLError):
            return FetchError("tls", f"TLS handshake with {host} failed: {exc.reason}", False)
        if isinstance(exc, ConnectionRefusedError):
            return FetchError("connection", f"connection refused by {host}", True)
        if isinstance(exc, (HTTPStreamClosedError, StreamClosedError, ConnectionResetError)):
            got = f" after {self.bytes_done} bytes" if self.bytes_done else ""
            return FetchError("connection", f"connection to {host} closed{got}", True)
        if isinstance(exc, httputil.HTTPInputError):
            if "too long" in str(exc) or "too large" in str(exc):
                return self._too_large()
            return FetchError("bad_response", f"{host} sent a malformed HTTP response: "
                              f"{scrub_urls(str(exc))}", False)
        if isinstance(exc, ValueError) and "scheme" in str(exc):
            return FetchError("redirects", f"redirect to an unsupported URL scheme from {host}",
                              False)
        if isinstance(exc, OSError):
            transient = exc.errno not in (errno.ENETUNREACH, errno.EHOSTUNREACH)
            return FetchError("connection", f"could not connect to {host}: "
                              f"{exc.strerror or exc}", transient)
        return FetchError("unknown", f"download from {host} failed: {scrub_urls(str(exc))}",
                          True)
