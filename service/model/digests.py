"""Digest algorithms, and the checksums people write down for files.

Users name algorithms as hashlib does (``sha256``), as aria2 and RFC 9530
do (``sha-256``) or as Subresource Integrity does; every spelling ends as
one canonical name here. An expected checksum comes in the forms people
copy from download pages: ``sha256:<hex>`` (Nix, Docker, PyPI's JSON),
``sha-256=<hex>`` (aria2's ``--checksum``) and SRI's ``sha256-<base64>``.

The CRCs object stores publish (S3's crc32, crc32c and crc64nvme, GCS's
crc32c) are digests here too, written as the hex of their big-endian
bytes (what the stores' base64 decodes to: crc32c of ``123456789`` is
``e3069283``). crc32c and crc64nvme come from AWS's ``awscrt`` (its C
library, with the CPU's CRC instructions: about 12 GB/s here), crc32 from
zlib (3.7 GB/s; awscrt's is slower).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import re
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from awscrt import checksums

from service.model import claim_text

# Canonical names, in the order they are shown, and their digest sizes.
DIGEST_BYTES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64, "blake2b": 64,
                "crc32": 4, "crc32c": 4, "crc64nvme": 8}
ALGORITHMS = tuple(DIGEST_BYTES)
# /check's contract has an md5 field, so md5 is always computed: a second
# digest costs little on another core (hashing runs in parallel).
ALWAYS = "md5"

_ALIASES = {
    "md5": "md5", "sha1": "sha1", "sha-1": "sha1", "sha": "sha1",
    "sha256": "sha256", "sha-256": "sha256", "sha512": "sha512", "sha-512": "sha512",
    "blake2b": "blake2b", "blake2b-512": "blake2b", "blake2b512": "blake2b", "b2": "blake2b",
    "crc32": "crc32", "crc-32": "crc32", "crc32c": "crc32c", "crc-32c": "crc32c",
    "crc64nvme": "crc64nvme", "crc64-nvme": "crc64nvme", "crc-64-nvme": "crc64nvme",
}
# update(data, previous) -> running value, for each CRC.
_CRC_FUNCTIONS: dict[str, Callable[[Any, int], int]] = {
    "crc32": zlib.crc32, "crc32c": checksums.crc32c, "crc64nvme": checksums.crc64nvme}
CRCS = tuple(_CRC_FUNCTIONS)
_HEX = re.compile(r"[0-9a-fA-F]+")


class DigestSpecError(ValueError):
    """An algorithm list or a checksum that cannot be used, with a sentence
    saying what is wrong."""


def canonical(name: str) -> str | None:
    return _ALIASES.get(name.strip().lower())


class Crc:
    """A CRC with hashlib's face (``update``, ``digest``, ``hexdigest``,
    ``copy``); its whole state is the running value, so ``state`` and
    ``Crc(name, state)`` save and restore it (checkpoints)."""

    def __init__(self, algorithm: str, state: bytes | None = None):
        self.name = algorithm
        self._function = _CRC_FUNCTIONS[algorithm]
        self.digest_size = DIGEST_BYTES[algorithm]
        self.value = int.from_bytes(state, "big") if state else 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self.value = self._function(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(self.digest_size, "big")

    def hexdigest(self) -> str:
        return self.digest().hex()

    def copy(self) -> Crc:
        other = Crc(self.name)
        other.value = self.value
        return other

    def state(self) -> bytes:
        return self.digest()


def new_hash(algorithm: str) -> Any:
    if algorithm in _CRC_FUNCTIONS:
        return Crc(algorithm)
    return hashlib.new(algorithm)


def parse_algorithms(values: Iterable[str]) -> list[str]:
    """``["sha256,sha512"]`` or ``["sha256", "sha512"]`` -> md5 plus those,
    in canonical order. Unknown names are refused, all of them named."""
    wanted = {ALWAYS}
    unknown = []
    for value in values:
        for name in value.split(","):
            if not name.strip():
                continue
            algorithm = canonical(name)
            if algorithm is None:
                unknown.append(name.strip()[:40])
            else:
                wanted.add(algorithm)
    if unknown:
        raise DigestSpecError(f"unknown algorithm {', '.join(repr(u) for u in unknown)}; "
                              f"choose from {', '.join(ALGORITHMS)}")
    return [a for a in ALGORITHMS if a in wanted]


@dataclasses.dataclass(frozen=True)
class Checksum:
    """One digest of one algorithm, as lowercase hex."""
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def to_doc(self) -> dict[str, str]:
        return {"algorithm": self.algorithm, "hex": self.hex}

    @classmethod
    def from_doc(cls, doc: dict | None) -> Checksum | None:
        return cls(doc["algorithm"], doc["hex"]) if doc else None


@dataclasses.dataclass(frozen=True)
class ServerDigest:
    """The digest a server claimed in a header, compared with the bytes.

    ``verified``: true when the bytes match it; false when a claim that
    binds the server (not an ETag, not a multipart one) does not (the
    transfer was corrupted); null when a difference proves nothing (an
    ETag that is not an MD5, a multipart claim none of the part sizes
    tried reproduces), ``why`` saying so. A multipart claim (S3's
    ``"<md5>-<parts>"`` ETag, a COMPOSITE ``x-amz-checksum-*``) has its
    ``parts`` count and, when verified, the ``part_size`` that matched."""
    algorithm: str
    value: str
    header: str
    match: bool
    verified: bool | None = None
    why: str | None = None
    parts: int | None = None
    part_size: int | None = None

    def to_doc(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_doc(cls, doc: dict | None) -> ServerDigest | None:
        if not doc:
            return None
        doc = dict(doc)
        if "verified" not in doc:  # recorded before #26: an ETag was a hint
            doc["verified"] = True if doc["match"] else (
                None if doc["header"] == "ETag" else False)
        fields: dict[str, Any] = {f.name: doc.get(f.name) for f in dataclasses.fields(cls)}
        return cls(**fields)

    def describe(self) -> str:
        """One line for people (mail, CLI): which claim, and how it went."""
        return claim_text.describe(self.to_doc())


def parse_expected(text: str) -> Checksum:
    """``sha256:<hex>``, ``sha-256=<hex>`` or SRI ``sha256-<base64>``."""
    text = text.strip()
    if not text:
        raise DigestSpecError("expected is empty; give it as sha256:<hex>")
    for separator in (":", "="):
        name, found, value = text.partition(separator)
        algorithm = canonical(name) if found else None
        if algorithm:
            value = value.strip()
            if len(value) > 1 and value[0] == value[-1] == ":":
                # RFC 9530's structured-field form: sha-256=:<base64>:
                return checksum_from_base64(algorithm, value[1:-1])
            return checksum_from_hex(algorithm, value)
    name, found, value = text.partition("-")
    if found and canonical(name) in ("sha256", "sha512"):
        return checksum_from_base64(canonical(name) or "", value, "SRI")
    name = re.split(r"[:=-]", text, maxsplit=1)[0]
    if name.lower() in ("sha384", "sha-384", "sha224", "sha-224"):
        raise DigestSpecError(f"{name} is not supported; use one of {', '.join(ALGORITHMS)}")
    raise DigestSpecError(
        "expected must look like sha256:<hex>, sha-256=<hex> (aria2) or sha256-<base64> "
        f"(SRI), with an algorithm from {', '.join(ALGORITHMS)}")


def checksum_from_hex(algorithm: str, value: str) -> Checksum:
    size = DIGEST_BYTES[algorithm]
    if not _HEX.fullmatch(value):
        raise DigestSpecError(f"the {algorithm} checksum is not hexadecimal")
    if len(value) != 2 * size:
        raise DigestSpecError(f"a {algorithm} checksum has {2 * size} hex digits, "
                              f"not {len(value)}")
    return Checksum(algorithm, value.lower())


def checksum_from_base64(algorithm: str, value: str, form: str = "base64") -> Checksum:
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise DigestSpecError(f"the {form} {algorithm} checksum is not valid base64") from None
    size = DIGEST_BYTES[algorithm]
    if len(raw) != size:
        raise DigestSpecError(f"the {form} {algorithm} checksum decodes to {len(raw)} "
                              f"bytes; a {algorithm} digest has {size}")
    return Checksum(algorithm, raw.hex())


def algorithm_for_hex_length(digits: int) -> str | None:
    """What ``*sum -c`` infers from a bare hex digest: 128 digits read as
    sha512 (b2sum's are the same length: say ``algorithm=blake2b``)."""
    return {32: "md5", 40: "sha1", 64: "sha256", 128: "sha512"}.get(digits)


def mismatch(expected: Checksum, digests: dict[str, str]) -> str | None:
    """Why the file is not the expected one, or None if it is."""
    actual = digests.get(expected.algorithm)
    if actual == expected.hex:
        return None
    return (f"checksum mismatch: expected {expected.algorithm} {expected.hex}, "
            f"got {actual}")
