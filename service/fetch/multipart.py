"""Checking a multipart object's claim: the digest of its parts' digests.

S3 gives an object uploaded in parts an ETag ``"<md5hex>-<parts>"``, the
MD5 of the concatenated raw MD5s of its parts, and, with a COMPOSITE
checksum, ``x-amz-checksum-<algorithm>: <base64>-<parts>``, the checksum
of the concatenated raw checksums of its parts (moto computes both that
way too). Neither says how large the parts were, and the uploader chose:
aws-cli 8 MiB, s3cmd 15 MiB, others 16, 5, 64 or 100 MiB, some
``ceil(length / parts)``. A part size ``s`` is consistent with ``length``
and ``parts`` when ``(parts - 1) * s < length <= parts * s``; every
consistent candidate is hashed part by part while the file streams (one
running digest per candidate and a list of its parts' digests: memory is
a few bytes per part), and the first whose combined digest matches is the
one recorded. None matching proves nothing (the uploader may have used
any size, or parts of unequal sizes), so it is recorded as unverified,
never as corruption.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from service.model.claim_text import human_bytes
from service.model.digests import ServerDigest, new_hash

MIB = 1024 * 1024
# The part-size question (HEAD ?partNumber=1) waits at most this long
# before the body is hashed with the uploaders' sizes instead.
PROBE_TIMEOUT = 5.0
# The part sizes uploaders use, most common first.
UPLOADER_SIZES = (8 * MIB, 15 * MIB, 16 * MIB, 5 * MIB, 64 * MIB, 100 * MIB)


def consistent(size: int, length: int, parts: int) -> bool:
    return (parts - 1) * size < length <= parts * size


def candidate_sizes(length: int, parts: int, first_part: int | None = None) -> list[int]:
    """The part sizes worth trying, in the order tried: the first part's
    size if the server told it, the uploaders' sizes, ``ceil(length /
    parts)`` rounded up to a MiB; only those consistent with the length
    and the part count, each once."""
    if parts < 2 or length < parts:
        return []
    rounded = _ceil_div(_ceil_div(length, parts), MIB) * MIB
    found: list[int] = []
    for size in ((first_part,) if first_part else ()) + UPLOADER_SIZES + (rounded,):
        if size and size not in found and consistent(size, length, parts):
            found.append(size)
    return found


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class PartDigests:
    """The digest of each part of one candidate size, fed the file's bytes
    in order (blocks of any size)."""

    def __init__(self, algorithm: str, size: int):
        self.algorithm = algorithm
        self.size = size
        self._current: Any = new_hash(algorithm)
        self._filled = 0
        self._parts: list[bytes] = []

    def update(self, block: bytes | bytearray | memoryview) -> None:
        view = memoryview(block)
        while view:
            room = self.size - self._filled
            piece = view[:room]
            self._current.update(piece)
            self._filled += len(piece)
            view = view[len(piece):]
            if self._filled == self.size:
                self._parts.append(self._current.digest())
                self._current = new_hash(self.algorithm)
                self._filled = 0

    def combined(self) -> tuple[str, int]:
        """The digest of the parts' digests, and the number of parts."""
        parts = list(self._parts)
        if self._filled or not parts:
            parts.append(self._current.digest())
        whole = new_hash(self.algorithm)
        for digest in parts:
            whole.update(digest)
        return whole.hexdigest(), len(parts)


class MultipartCheck:
    """Every candidate part size of one claim, hashed side by side. Each
    candidate is a consumer of the sink of its own (``DigestSink.watch``),
    so they hash on separate lanes, in parallel with the file's digests."""

    def __init__(self, algorithm: str, value: str, header: str, parts: int, length: int):
        self.algorithm, self.value, self.header, self.parts = algorithm, value, header, parts
        self.length = length
        self.sizes = candidate_sizes(length, parts)
        self.candidates = [PartDigests(algorithm, size) for size in self.sizes]
        # The first part's length as the server told it (HEAD ?partNumber=1).
        self.first_part: int | None = None

    def told(self, first_part: int) -> None:
        """The server said how long the first part is: only that size is
        tried (parts of equal size but the last; none if it cannot be)."""
        self.first_part = first_part
        self.sizes = [first_part] if consistent(first_part, self.length, self.parts) else []
        self.candidates = [PartDigests(self.algorithm, size) for size in self.sizes]

    def result(self) -> ServerDigest:
        for candidate in self.candidates:
            combined, count = candidate.combined()
            if count == self.parts and combined == self.value:
                return ServerDigest(self.algorithm, self.value, self.header, True, True,
                                    parts=self.parts, part_size=candidate.size)
        return self.unverified(self._why())

    def unverified(self, why: str) -> ServerDigest:
        return ServerDigest(self.algorithm, self.value, self.header, False, None, why,
                            parts=self.parts)

    def _why(self) -> str:
        if self.first_part is not None:
            told = f"the server's first part is {human_bytes(self.first_part)}"
            if not self.sizes:
                return (f"{told}, and {self.parts} parts of that size cannot make "
                        f"{self.length} bytes: the parts differ in size")
            return (f"{told}, and parts of that size do not give this {self.algorithm}; "
                    "the parts may differ in size")
        if not self.sizes:
            return (f"no part size is consistent with {self.length} bytes in {self.parts} "
                    "parts among those tried")
        tried = ", ".join(human_bytes(s) for s in self.sizes)
        return (f"no part size tried ({tried}) gives this {self.algorithm} of "
                f"{self.parts} parts; the uploader may have used another size, or parts "
                "of different sizes")


def single_part(algorithm: str, value: str, header: str, whole_hex: str) -> ServerDigest:
    """A claim of one part: the digest of the whole file's digest."""
    digest = new_hash(algorithm)
    digest.update(bytes.fromhex(whole_hex))
    if digest.hexdigest() == value:
        return ServerDigest(algorithm, value, header, True, True, parts=1)
    return ServerDigest(algorithm, value, header, False, None,
                        "the digest of the file's digest differs (one part)", parts=1)


async def first_part_size(config: Any, url: str, parts: int) -> int | None:
    """The first part's length, asked of an S3-like server with ``HEAD
    <url>?partNumber=1``: S3 answers that part's Content-Length and the
    object's ``x-amz-mp-parts-count``. None when the answer is not that
    (another server, a refusal, a part count that differs, a time-out).
    The request goes through a client of ``make_client`` (the address
    policy, the worker's hooks) of its own, so that probes never wait for
    a connection slot that the downloads waiting for them hold."""
    from service.fetch import tornado_hooks as hooks
    # Not this download's connection: the watchdog must not close it.
    hooks.TrackingTCPClient.current.set(None)
    split = urllib.parse.urlsplit(url)
    query = f"{split.query}&partNumber=1" if split.query else "partNumber=1"
    request = HTTPRequest(
        urllib.parse.urlunsplit(split._replace(query=query, fragment="")), method="HEAD",
        headers={"Accept-Encoding": "identity"}, follow_redirects=False,
        connect_timeout=min(config.connect_timeout, PROBE_TIMEOUT),
        request_timeout=PROBE_TIMEOUT)
    try:
        response = await _probe_client(config).fetch(request, raise_error=False)
    except Exception:  # noqa: BLE001 - no answer is an answer: use the uploaders' sizes
        return None
    if response.code not in (200, 206):
        return None
    count = response.headers.get("x-amz-mp-parts-count", "").strip()
    length = response.headers.get("Content-Length", "").strip()
    if not (count.isascii() and count.isdigit() and int(count) == parts):
        return None
    if not (length.isascii() and length.isdigit() and int(length) > 0):
        return None
    return int(length)


_PROBE_CLIENTS: dict[int, AsyncHTTPClient] = {}


def _probe_client(config: Any) -> AsyncHTTPClient:
    from service.fetch.client import make_client
    key = id(config)
    if key not in _PROBE_CLIENTS:
        _PROBE_CLIENTS[key] = make_client(config)
    return _PROBE_CLIENTS[key]
