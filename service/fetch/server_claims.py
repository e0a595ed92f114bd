"""What a server says the body's digest is, read from its headers.

Checked against the bytes received, a claim tells a corrupted transfer
from a good one. The headers, newest first: ``Repr-Digest`` and
``Content-Digest`` (RFC 9530), ``Digest`` (RFC 3230), ``Content-MD5``
(RFC 1864), and an ``ETag`` that is a plain MD5 (S3 single-part objects).

An ETag is only a hint: S3 objects encrypted with SSE-KMS or SSE-C carry
32-hex-digit ETags that are not the MD5 of their bytes, so a differing
ETag is recorded, never taken as corruption.
"""

from __future__ import annotations

import dataclasses
import re

from tornado.httputil import HTTPHeaders

from service.model.digests import (
    Checksum,
    DigestSpecError,
    ServerDigest,
    checksum_from_base64,
)

# RFC 9530's registry names (and RFC 3230's, case-insensitive) -> ours.
_NAMES = {"sha-256": "sha256", "sha-512": "sha512", "md5": "md5", "sha": "sha1",
          "sha-1": "sha1"}
# Strongest first; among equals the one already being computed wins.
_PREFERENCE = ("sha512", "sha256", "sha1", "md5")
_ETAG_MD5 = re.compile(r'"([0-9a-fA-F]{32})"')
# Sent with every request (RFC 9530 section 4: preferences 1-10).
WANT_REPR_DIGEST = "sha-256=10, sha-512=8, md5=1"


@dataclasses.dataclass(frozen=True)
class Claim:
    checksum: Checksum
    header: str

    @property
    def binding(self) -> bool:
        """Whether a difference means the transfer was corrupted."""
        return self.header != "ETag"


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
                found += _decoded(name, value[1:-1], header)
    if not found:
        for name, value in _members(headers.get_list("Digest")):
            found += _decoded(name, value, "Digest")
    md5 = headers.get("Content-MD5")
    if md5 and not partial:
        found += _decoded("md5", md5.strip(), "Content-MD5")
    etag = headers.get("ETag", "").strip()
    match = _ETAG_MD5.fullmatch(etag)
    if match and not partial:
        found.append(Claim(Checksum("md5", match.group(1).lower()), "ETag"))
    return found


def pick(found: list[Claim], computing: list[str]) -> Claim | None:
    """The claim to check: a binding one before a hint, then one whose
    digest is computed anyway, then the strongest."""
    if not found:
        return None

    def rank(claim: Claim) -> tuple[bool, bool, int]:
        algorithm = claim.checksum.algorithm
        return (not claim.binding, algorithm not in computing,
                _PREFERENCE.index(algorithm))

    return min(found, key=rank)


def compare(claim: Claim, digests: dict[str, str]) -> ServerDigest:
    actual = digests[claim.checksum.algorithm]
    return ServerDigest(claim.checksum.algorithm, claim.checksum.hex, claim.header,
                        actual == claim.checksum.hex)


def _members(values: list[str]) -> list[tuple[str, str]]:
    """``a=1, b=2;param`` -> [("a", "1"), ("b", "2")], names lowercased."""
    members = []
    for value in values:
        for item in value.split(","):
            name, found, rest = item.partition("=")
            if found:
                members.append((name.strip().lower(), rest.split(";")[0].strip()))
    return members


def _decoded(name: str, value: str, header: str) -> list[Claim]:
    algorithm = _NAMES.get(name)
    if algorithm is None:
        return []
    try:
        return [Claim(checksum_from_base64(algorithm, value), header)]
    except DigestSpecError:
        return []
