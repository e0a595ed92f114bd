"""What a server says the body's digest is, read from its headers.

Checked against the bytes received, a claim tells a corrupted transfer
from a good one. The headers, newest first: ``Repr-Digest`` and
``Content-Digest`` (RFC 9530), ``Digest`` (RFC 3230), ``Content-MD5``
(RFC 1864), the object stores' (S3's ``x-amz-checksum-<algorithm>``,
which every request asks for with ``x-amz-checksum-mode: ENABLED``, GCS's
``x-goog-hash``, Azure's ``x-ms-blob-content-md5``), and an ``ETag`` that
is a plain MD5 (S3 single-part objects) or S3's multipart
``"<md5>-<parts>"``.

An ETag is only a hint: S3 objects encrypted with SSE-KMS or SSE-C carry
32-hex-digit ETags that are not the MD5 of their bytes, so a differing
ETag is recorded, never taken as corruption. A multipart claim (that
ETag, or a COMPOSITE ``x-amz-checksum-*``, ``<base64>-<parts>``) depends
on the part size the uploader chose (``multipart``): one that no part
size tried reproduces is recorded as unverified, never as corruption.

S3 refuses a presigned URL's request that carries an x-amz-* header its
signature does not cover (403, "There were headers present in the request
which were not signed"), so ``x-amz-checksum-mode`` is left off any
request, redirect hops included, to a URL signed in its query
(``before_hop``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import urllib.parse
from typing import TYPE_CHECKING, Any

from tornado.httputil import HTTPHeaders

from service.fetch.multipart import (
    PROBE_TIMEOUT,
    MultipartCheck,
    first_part_size,
    single_part,
)
from service.model.digests import (
    Checksum,
    DigestSpecError,
    ServerDigest,
    checksum_from_base64,
)

if TYPE_CHECKING:
    from service.fetch.hashing import DigestSink

# RFC 9530's registry names (and RFC 3230's, case-insensitive) -> ours.
_NAMES = {"sha-256": "sha256", "sha-512": "sha512", "md5": "md5", "sha": "sha1",
          "sha-1": "sha1"}
# Strongest first; among equals the one already being computed wins.
_PREFERENCE = ("sha512", "sha256", "sha1", "md5", "crc64nvme", "crc32c", "crc32")
_ETAG_MD5 = re.compile(r'"([0-9a-fA-F]{32})"')
_ETAG_MULTIPART = re.compile(r'"([0-9a-fA-F]{32})-([1-9][0-9]{0,4})"')
_COMPOSITE = re.compile(r"([A-Za-z0-9+/=]+)-([1-9][0-9]{0,4})")
# S3's x-amz-checksum-<name> headers, as S3 writes them.
_AMZ = ("crc64nvme", "crc32c", "crc32", "sha1", "sha256")
_GOOG = {"md5": "md5", "crc32c": "crc32c"}
# Sent with every request (RFC 9530 section 4: preferences 1-10; S3's
# GetObject answers its stored checksums only when asked).
WANT_REPR_DIGEST = "sha-256=10, sha-512=8, md5=1"
CHECKSUM_MODE = "x-amz-checksum-mode"
REQUEST_HEADERS = {"Want-Repr-Digest": WANT_REPR_DIGEST, CHECKSUM_MODE: "ENABLED"}
# Query parameters of URLs signed in their query: S3's SigV4 and SigV2,
# GCS's V4 (x-amz-* headers other than the signed ones are refused).
_SIGNED_QUERY = ("x-amz-signature", "x-amz-credential", "x-goog-signature", "signature")


@dataclasses.dataclass(frozen=True)
class Claim:
    checksum: Checksum
    header: str
    # Set for a multipart claim: the digest of this many parts' digests.
    parts: int | None = None

    @property
    def binding(self) -> bool:
        """Whether a difference means the transfer was corrupted."""
        return self.header != "ETag" and self.parts is None


def claims(headers: HTTPHeaders, partial: bool = False) -> list[Claim]:
    """Every usable claim; malformed ones are ignored (a server's bad header
    must not fail a good download). ``partial``: the body is a range, so
    only digests of the whole representation apply."""
    found: list[Claim] = []
    for header in ("Repr-Digest", "Content-Digest"):
        if partial and header == "Content-Digest":
            continue
        for name, value in _members(headers.get_list(header)):
            if value.startswith(":") and value.endswith(":") and len(value) > 1:
                found += _decoded(_NAMES.get(name), value[1:-1], header)
    if not found:
        for name, value in _members(headers.get_list("Digest")):
            found += _decoded(_NAMES.get(name), value, "Digest")
    if partial:
        return found
    md5 = headers.get("Content-MD5")
    if md5:
        found += _decoded("md5", md5.strip(), "Content-MD5")
    found += _object_stores(headers)
    etag = headers.get("ETag", "").strip()
    match = _ETAG_MD5.fullmatch(etag)
    if match:
        found.append(Claim(Checksum("md5", match.group(1).lower()), "ETag"))
    match = _ETAG_MULTIPART.fullmatch(etag)
    if match:
        found.append(Claim(Checksum("md5", match.group(1).lower()), "ETag",
                           int(match.group(2))))
    return found


def _object_stores(headers: HTTPHeaders) -> list[Claim]:
    found: list[Claim] = []
    kind = headers.get("x-amz-checksum-type", "").strip().upper()
    for name in _AMZ:
        header = f"x-amz-checksum-{name}"
        value = headers.get(header, "").strip()
        composite = _COMPOSITE.fullmatch(value)
        if composite:
            found += _decoded(name, composite.group(1), header, int(composite.group(2)))
        elif value and kind != "COMPOSITE":  # a COMPOSITE without its part count
            found += _decoded(name, value, header)
    # GCS hashes the stored bytes: an object stored gzip-compressed is
    # served decompressed (decompressive transcoding) to a request without
    # Accept-Encoding: gzip, and its x-goog-hash is not of what was sent.
    stored = headers.get("x-goog-stored-content-encoding", "").strip().lower()
    served = headers.get("Content-Encoding", "").strip().lower()
    if stored in ("", "identity") or stored == served:
        for name, value in _members(headers.get_list("x-goog-hash")):
            found += _decoded(_GOOG.get(name), value, "x-goog-hash")
    md5 = headers.get("x-ms-blob-content-md5", "").strip()
    if md5:
        found += _decoded("md5", md5, "x-ms-blob-content-md5")
    return found


def pick(found: list[Claim], computing: list[str]) -> Claim | None:
    """The claim to check: a binding one before a hint, a whole-file one
    before a multipart one (S3 answers a multipart ETag with most
    checksums), a COMPOSITE checksum before a multipart ETag, then one
    whose digest is computed anyway, then the strongest."""
    if not found:
        return None

    def rank(claim: Claim) -> tuple[bool, bool, bool, bool, int]:
        algorithm = claim.checksum.algorithm
        return (not claim.binding, claim.parts is not None, claim.header == "ETag",
                algorithm not in computing, _PREFERENCE.index(algorithm))

    return min(found, key=rank)


def prepare(claim: Claim, sink: DigestSink, length: int | None,
            headers: HTTPHeaders | None = None, download: Any = None) -> None:
    """Before the first byte: have ``sink`` compute what checking ``claim``
    takes (its algorithm over the whole file, or each candidate part
    size's part digests). For a multipart claim from an S3-like server
    (``probe_allowed``), the first part's size is asked first
    (``multipart.first_part_size``): the sink holds the body's first bytes
    until the answer, at most ``PROBE_TIMEOUT``."""
    if claim.parts is None or claim.parts == 1:
        sink.add(claim.checksum.algorithm)
        return
    if length is None:
        return
    check = MultipartCheck(claim.checksum.algorithm, claim.checksum.hex, claim.header,
                           claim.parts, length)
    sink.checks.append(check)
    url = str(getattr(download, "hop_url", None) or getattr(download, "url", ""))
    if download is None or headers is None or not probe_allowed(url, headers):
        for candidate in check.candidates:
            sink.watch(candidate)
        return

    async def probe() -> None:
        try:
            size = await asyncio.wait_for(
                first_part_size(download.config, url, check.parts), PROBE_TIMEOUT + 1)
        except Exception:  # noqa: BLE001 - a time-out included: guess instead
            size = None
        if size is not None:
            check.told(size)
        for candidate in check.candidates:
            sink.watch(candidate)

    sink.hold(asyncio.ensure_future(probe()))


def probe_allowed(url: str, headers: HTTPHeaders) -> bool:
    """Whether to ask ``?partNumber=1``: the answer came from an S3-like
    server (x-amz-* headers: S3 always sends x-amz-request-id; moto and
    other AWS services x-amzn-RequestId), and the URL is not signed in its
    query (an added parameter would break the signature)."""
    return any(name.lower().startswith(("x-amz-", "x-amzn-")) for name in headers) \
        and not signed_in_query(url)


def compare(claim: Claim, digests: dict[str, str],
            sink: DigestSink | None = None) -> ServerDigest:
    algorithm, value, header = claim.checksum.algorithm, claim.checksum.hex, claim.header
    if claim.parts == 1:
        return single_part(algorithm, value, header, digests[algorithm])
    if claim.parts is not None:
        for check in (sink.checks if sink is not None else []):
            if (check.algorithm, check.value, check.header) == (algorithm, value, header):
                return check.result()
        return MultipartCheck(algorithm, value, header, claim.parts, 0).unverified(
            "the server did not announce the file's length, so no part size could be "
            "tried" if sink is not None and not sink.checks else
            "a resumed download does not keep its parts' digests")
    actual = digests[algorithm]
    if actual == value:
        return ServerDigest(algorithm, value, header, True, True)
    if claim.binding:
        return ServerDigest(algorithm, value, header, False, False)
    return ServerDigest(algorithm, value, header, False, None, (
        "an ETag is not always the MD5 of the bytes (S3 objects under SSE-KMS or SSE-C "
        "have ETags that are not), so a different one is not taken as corruption"))


def before_hop(url: str, headers: HTTPHeaders) -> None:
    """Called with every request and redirect hop before it is sent: a
    URL signed in its query gets no ``x-amz-checksum-mode``, which S3
    would refuse as a header its signature does not cover."""
    if signed_in_query(url):
        for name in [n for n in headers if n.lower() == CHECKSUM_MODE]:
            del headers[name]


def signed_in_query(url: str) -> bool:
    try:
        query = urllib.parse.urlsplit(url).query
    except ValueError:
        return False
    names = {name.lower() for name, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)}
    return any(name in names for name in _SIGNED_QUERY)


def _members(values: list[str]) -> list[tuple[str, str]]:
    """``a=1, b=2;param`` -> [("a", "1"), ("b", "2")], names lowercased."""
    members = []
    for value in values:
        for item in value.split(","):
            name, found, rest = item.partition("=")
            if found:
                members.append((name.strip().lower(), rest.split(";")[0].strip()))
    return members


def _decoded(algorithm: str | None, value: str, header: str,
             parts: int | None = None) -> list[Claim]:
    if algorithm is None:
        return []
    try:
        return [Claim(checksum_from_base64(algorithm, value), header, parts)]
    except DigestSpecError:
        return []
