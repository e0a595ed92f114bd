"""Mirrors: other URLs of the same file, as sources of a segmented
download's pieces (``segments``), and which of them may be trusted.

A digest is ``done`` only if every byte hashed came from one version of
one file. A mirror therefore joins only after a probe (``GET`` with
``Range: bytes=0-0``, through the worker's client: the same address
policy as any URL) answered 206 for the same total length and either
the primary's own strong validator, or another one when the task has a
way to check the bytes at the end: an expected checksum (the user's or a
Metalink's) or a Metalink's piece hashes. Mirrors on other servers
usually have other ETags, so that proof is what makes them useful; without
it such a mirror is dropped, with the reason.

Mirrors come from the task (``mirrors`` on the submit, a Metalink's urls)
and from the primary's first answer: ``Link: <url>; rel=duplicate``
(RFC 6249), read here and held to the submit's rules for a mirror.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import urllib.parse
from typing import Any

from tornado import httputil
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.iostream import IOStream

from service.config import Config
from service.fetch import netpolicy
from service.fetch import tornado_hooks as hooks
from service.fetch.checkpoint import validator as validator_of
from service.fetch.client import ResponseHead, host_of
from service.fetch.errors import classify
from service.model.digests import Checksum
from service.model.pieces import PieceHashes

# As the submit's MAX_MIRRORS and MAX_URL_LENGTH (intake.validation), which
# fetch does not import: a Link header is held to the same rules.
MAX_MIRRORS = 8
MAX_URL_LENGTH = 2048
# A probe is one byte: a mirror that takes longer to answer it would not
# help a download anyway.
PROBE_SECONDS = 10.0
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
# A mirror's piece is held in memory until its hash is checked: longer
# Metalink pieces than this are not used (the window would not bound them).
MAX_CHECKED_PIECE = 16 * 1024 * 1024


@dataclasses.dataclass
class Wanted:
    """What the task says about mirrors and how their bytes can be checked."""
    urls: list[str]
    expected: Checksum | None = None
    pieces: PieceHashes | None = None
    # The length the file must have (a Metalink's <size>).
    size: int | None = None

    def usable_pieces(self, total: int) -> PieceHashes | None:
        """The piece hashes, if they describe a file of ``total`` bytes in
        pieces short enough to hold while they are checked."""
        pieces = self.pieces
        if pieces is None or not pieces.fits(total) or pieces.length > MAX_CHECKED_PIECE:
            return None
        return pieces

    def proof(self, total: int) -> str | None:
        """What checks a mirror's bytes that another validator vouches
        for (None: nothing; only the primary's validator will do)."""
        if self.usable_pieces(total) is not None:
            return "the Metalink's piece hashes"
        if self.expected is not None:
            return f"the expected {self.expected.algorithm}"
        return None


@dataclasses.dataclass(eq=False)
class Source:
    """One server of the file's pieces: the primary or a mirror."""
    url: str
    validator: str
    primary: bool = False
    # Where it came from: submit (or a Metalink), link (rel=duplicate).
    origin: str = "submit"
    # Why its bytes may be hashed with the primary's though its validator
    # differs (None: the validator is the primary's own).
    proven_by: str | None = None
    dropped: str | None = None
    bytes: int = 0
    connections: int = 0  # connections it ever served
    alive: int = 0        # connections serving it now

    @property
    def host(self) -> str:
        return host_of(self.url)

    def view(self) -> dict[str, Any]:
        return {"url": self.url, "from": self.origin, "bytes": self.bytes,
                "connections": self.connections,
                "validator": self.validator or None,
                "checked_by": self.proven_by, "dropped": self.dropped}


def duplicates(headers: httputil.HTTPHeaders, base: str) -> list[str]:
    """The URLs a ``Link: <...>; rel=duplicate`` header names (RFC 6249),
    most preferred (lowest ``pri``) first; ones a submit would refuse as a
    mirror are left out."""
    found: list[tuple[int, int, str]] = []
    links = [link for value in headers.get_list("Link") for link in _links(value)]
    for order, (target, params) in enumerate(links):
        rels = _param(params, "rel")
        if rels is None or "duplicate" not in rels.lower().split():
            continue
        pri = _param(params, "pri") or ""
        url = urllib.parse.urljoin(base, target)
        if url_problem(url) is None:
            found.append((int(pri) if pri.isdigit() and pri.isascii() else 999999, order, url))
    urls: list[str] = []
    for _, _, url in sorted(found):
        if url not in urls:
            urls.append(url)
    return urls[:MAX_MIRRORS]


_LINK = re.compile(r'\s*<([^>]*)>((?:\s*;\s*[^;,=\s]+(?:\s*=\s*(?:"[^"]*"|[^;,]*))?)*)\s*,?')


def _links(value: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in _LINK.finditer(value)]


def _param(params: str, name: str) -> str | None:
    for part in params.split(";"):
        key, _, value = part.partition("=")
        if key.strip().lower() == name:
            return value.strip().strip('"')
    return None


def url_problem(url: str) -> str | None:
    """The submit's rules for a mirror (intake.validation.check_url): http(s),
    a host, no credentials, no spaces or control characters, 2048
    characters at most. Blocked addresses are refused by the resolver, for
    this URL as for any."""
    if len(url) > MAX_URL_LENGTH:
        return "longer than 2048 characters"
    if _CONTROL.search(url):
        return "contains spaces or control characters"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return "malformed"
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or port == 0:
        return "not an http(s) URL with a host"
    if "@" in parts.netloc:
        return "contains a user name or password"
    return None


class _Probe:
    """The probe's stream, for the pins and to close it at its headers."""

    def __init__(self, pins: dict[str, Any]):
        self.pins = pins
        self.stream: IOStream | None = None
        self.hop_url: str | None = None

    def attach(self, stream: IOStream, host: str | None = None) -> None:
        self.stream = stream
        netpolicy.pin(self.pins, host, stream)  # every piece from this host goes there


async def probe(url: str, origin: str, primary: str, total: int, proof: str | None,
                client: AsyncHTTPClient, config: Config, pins: dict[str, Any],
                user_agent: str) -> Source:
    """The mirror as a source of pieces, or (``dropped`` set) why not."""
    source = Source(url, "", origin=origin)
    host = host_of(url)
    head = ResponseHead()
    owner = _Probe(pins)
    ended = False  # the final head arrived

    def on_header(line: str) -> None:
        nonlocal ended
        if head.feed(line) and owner.stream is not None:
            # All a probe needs is in the headers; the body is not read.
            ended = True
            owner.stream.close()

    request = HTTPRequest(
        url, method="GET", headers={"Accept-Encoding": "identity", "Accept": "*/*",
                                    "Range": "bytes=0-0"},
        user_agent=user_agent, follow_redirects=True, max_redirects=config.max_redirects,
        decompress_response=False, connect_timeout=min(config.connect_timeout, PROBE_SECONDS),
        request_timeout=PROBE_SECONDS, header_callback=on_header,
        streaming_callback=lambda chunk: None)
    token = hooks.TrackingTCPClient.current.set(owner)
    pinned = netpolicy.PINNED.set(pins)
    try:
        fetch = asyncio.ensure_future(client.fetch(request, raise_error=False))
    finally:
        hooks.TrackingTCPClient.current.reset(token)
        netpolicy.PINNED.reset(pinned)
    try:
        response = await asyncio.shield(fetch)
        error: BaseException | None = response.error
    except asyncio.CancelledError:
        if owner.stream is not None:
            owner.stream.close()
        fetch.add_done_callback(_consume)
        raise
    except Exception as exc:  # noqa: BLE001 - resolve and connect errors come raised
        error = exc
    if not ended:
        failure = classify(error, host, 0, config.connect_timeout)
        source.dropped = f"the probe failed: {failure.message}"
        return source
    assert head.status is not None  # the final head names its status
    source.dropped = judge(source, head.status, head.headers, primary, total, proof)
    return source


def judge(source: Source, status: int, headers: httputil.HTTPHeaders, primary: str,
          total: int, proof: str | None) -> str | None:
    """Why the probe's answer rules the mirror out (None: it is a source;
    ``source`` then holds its validator and what proves its bytes)."""
    if status != 206:
        return (f"it answered the probe (Range: bytes=0-0) with HTTP {status}, not 206: "
                "no ranges from it" if 200 <= status < 300 else
                f"it answered the probe with HTTP {status}")
    content_range = headers.get("Content-Range", "").strip()
    length = content_range.rpartition("/")[2]
    if not content_range.startswith("bytes 0-0/") or not length.isdigit():
        return f"it answered the probe with Content-Range {content_range or 'none'}"
    if int(length) != total:
        return f"its copy is {int(length)} bytes long, the primary's {total}: another file"
    mine = validator_of(headers)
    if mine is None:
        return ("it sent no strong ETag nor Last-Modified, so its pieces could not be told to "
                "be of one version")
    source.validator = mine
    if mine == primary:
        return None
    if proof is None:
        return (f"another validator ({mine}, the primary's is {primary}) and nothing to check "
                "the bytes against: give expected= or a Metalink with hashes")
    source.proven_by = proof
    return None


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
