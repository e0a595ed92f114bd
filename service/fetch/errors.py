"""What can go wrong with a download, as the user will read it.

``classify`` turns whatever the HTTP client raised into a ``FetchError``:
a code (for tools and metrics), a sentence a user can act on, and whether
trying again may help. It decides by exception type and attributes, not by
message text, except where Tornado offers nothing else (an unsupported URL
scheme in a redirect is a bare ValueError).
"""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass

from tornado import httputil
from tornado.iostream import StreamClosedError
from tornado.simple_httpclient import HTTPStreamClosedError, HTTPTimeoutError

from service.fetch.netpolicy import BlockedAddress, InvalidHostName, UnresolvableHost
from service.model.digests import ServerDigest
from service.model.task import TaskError
from service.redact import scrub_urls


class Interrupted(Exception):
    """A reason from outside to stop a download (the worker's lease is
    lost, the worker is stopping): raised by ``Download.run`` as it is."""


@dataclass
class FetchError(Exception):
    code: str
    message: str
    transient: bool
    retry_after: float | None = None
    # A corrupted transfer: the server's digest that the bytes did not match.
    server: ServerDigest | None = None

    def __str__(self) -> str:
        return self.message

    def as_task_error(self) -> TaskError:
        return TaskError(self.code, self.message)


def classify(exc: BaseException | None, host: str, bytes_done: int = 0,
             connect_timeout: float = 0.0) -> FetchError:
    """The FetchError for an exception of the HTTP client; ``host`` is the
    host the download was talking to, ``bytes_done`` how far it got."""
    if isinstance(exc, BlockedAddress):
        return FetchError("blocked", str(exc), False)
    if isinstance(exc, UnresolvableHost):
        return FetchError("dns", f"could not resolve host {exc.host}", exc.transient)
    if isinstance(exc, InvalidHostName):
        return FetchError("dns", str(exc), False)
    if isinstance(exc, socket.gaierror):
        transient = exc.errno in (socket.EAI_AGAIN,)
        return FetchError("dns", f"could not resolve host {host}", transient)
    if isinstance(exc, HTTPTimeoutError):
        return FetchError("timeout", f"timed out connecting to {host} "
                          f"(CONNECT_TIMEOUT {connect_timeout:g} s)", True)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return FetchError("tls", f"TLS certificate of {host} is not valid: "
                          f"{exc.verify_message}", False)
    if isinstance(exc, ssl.SSLError):
        return FetchError("tls", f"TLS handshake with {host} failed: {exc.reason}", False)
    if isinstance(exc, ConnectionRefusedError):
        return FetchError("connection", f"connection refused by {host}", True)
    if isinstance(exc, (HTTPStreamClosedError, StreamClosedError, ConnectionResetError)):
        got = f" after {bytes_done} bytes" if bytes_done else ""
        return FetchError("connection", f"connection to {host} closed{got}", True)
    if isinstance(exc, httputil.HTTPInputError):
        return FetchError("bad_response", f"{host} sent a malformed HTTP response: "
                          f"{scrub_urls(str(exc))}", False)
    if isinstance(exc, ValueError) and "scheme" in str(exc):
        return FetchError("redirects", f"redirect to an unsupported URL scheme from {host}",
                          False)
    if isinstance(exc, UnicodeError):
        return FetchError("redirects", f"{host} redirected to a host name that is not "
                          "valid", False)
    if isinstance(exc, OSError):
        transient = exc.errno not in (errno.ENETUNREACH, errno.EHOSTUNREACH)
        return FetchError("connection", f"could not connect to {host}: "
                          f"{exc.strerror or exc}", transient)
    return FetchError("unknown", f"download from {host} failed: {scrub_urls(str(exc))}",
                      True)
