"""Checkpoints: how far a long download got, so that a retry resumes it.

A checkpoint is the byte offset reached, the hash state of every digest at
exactly that offset, the validator that names the version of the file (a
strong ETag, else Last-Modified) and the hashing library's version. A retry
asks for ``Range: bytes=<offset>-`` with ``If-Range: <validator>``: a 206
that starts at the offset continues the saved states; anything else means
the file changed or the server ignores ranges, and the download starts over
from byte 0 with fresh hashers, so a digest never mixes two versions.

``hashlib`` objects cannot be serialized; ``rehashes`` (Rust, RustCrypto)
can, for md5, sha1, sha256 and sha512, but it holds the GIL while hashing
and is slower, so only downloads larger than ``RESUMABLE_MIN_SIZE`` use it
(see ``why_not``). A saved state is only ever restored by the same library
version: the serialized form is that library's private layout.
"""

from __future__ import annotations

import dataclasses
import email.utils
import importlib.metadata
import re
from typing import Any

import rehashes
from tornado.httputil import HTTPHeaders

from service.fetch.server_claims import Claim
from service.model.digests import CRCS, Checksum, Crc

LIBRARY = f"rehashes {importlib.metadata.version('rehashes')}"
_CLASSES: dict[str, Any] = {"md5": rehashes.PyMd5, "sha1": rehashes.PySha1,
                            "sha256": rehashes.PySha256, "sha512": rehashes.PySha512}
# A CRC's state is its running value (model.digests.Crc): always resumable.
RESUMABLE_ALGORITHMS = tuple(_CLASSES) + CRCS
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.ASCII)


class ResumableHash:
    """A hashlib-like digest whose state can be saved and restored."""

    def __init__(self, algorithm: str, state: bytes | None = None):
        self._crc = Crc(algorithm, state) if algorithm in CRCS else None
        if self._crc is None:
            cls = _CLASSES[algorithm]
            self._hash = cls.deserialize(state) if state is not None else cls()

    def update(self, block: bytes | bytearray | memoryview) -> None:
        if self._crc is not None:
            self._crc.update(block)
            return
        # rehashes takes bytes only: a copy, cheap next to the hashing.
        self._hash.update(block if isinstance(block, bytes) else bytes(block))

    def hexdigest(self) -> str:
        if self._crc is not None:
            return self._crc.hexdigest()
        return str(self._hash.finalize())

    def state(self) -> bytes:
        if self._crc is not None:
            return self._crc.state()
        return bytes(self._hash.serialize())


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    offset: int
    states: dict[str, bytes]
    validator: str
    # The whole file's length, which a resumed 206 must announce again.
    total: int
    library: str = LIBRARY
    # The server's digest claim from the first response: it covers the
    # whole file, so it is checked at the end of a resumed download too.
    claim: Checksum | None = None
    claim_header: str | None = None

    def to_doc(self) -> dict[str, Any]:
        return {"offset": self.offset, "states": dict(self.states),
                "validator": self.validator, "total": self.total, "library": self.library,
                "claim": self.claim.to_doc() if self.claim else None,
                "claim_header": self.claim_header}

    @classmethod
    def from_doc(cls, doc: dict[str, Any] | None) -> Checkpoint | None:
        """The stored checkpoint, or None when there is none or it cannot
        be used by this process (another library version, a bad record)."""
        if not doc or doc.get("library") != LIBRARY:
            return None
        try:
            return cls(offset=int(doc["offset"]),
                       states={a: bytes(s) for a, s in doc["states"].items()},
                       validator=str(doc["validator"]), total=int(doc["total"]),
                       claim=Checksum.from_doc(doc.get("claim")),
                       claim_header=doc.get("claim_header"))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    def fits(self, algorithms: list[str]) -> bool:
        return 0 < self.offset < self.total and set(algorithms) <= set(self.states)

    def headers(self) -> dict[str, str]:
        return {"Range": f"bytes={self.offset}-", "If-Range": self.validator}

    def server_claim(self) -> Claim | None:
        if self.claim is None or self.claim_header is None:
            return None
        return Claim(self.claim, self.claim_header)

    def other_version(self, headers: HTTPHeaders) -> str | None:
        """Why a 206 cannot continue this checkpoint although its range
        fits: RFC 9110 (13.1.5, 15.3.7.3) lets parts be combined only under
        the same strong validator, so the answer must name the version the
        checkpoint was made from (None: it does). A missing validator is
        no proof of the same version either."""
        if self.validator.startswith('"'):
            header, theirs = "ETag", headers.get("ETag", "").strip()
        else:
            header, theirs = "Last-Modified", headers.get("Last-Modified", "").strip()
        if theirs == self.validator:
            return None
        said = f"{header} {theirs}" if theirs else f"no {header}"
        return (f"the server answered the resume with {said}, not {self.validator}: "
                "another version of the file, so the download started over from byte 0")

    def continues(self, status: int, headers: HTTPHeaders) -> bool:
        """Whether this response continues the checkpoint: a 206 for the
        same file from exactly its offset to the end."""
        if status != 206:
            return False
        match = _CONTENT_RANGE.fullmatch(headers.get("Content-Range", "").strip())
        if match is None:
            return False
        first, last, total = match.groups()
        return (int(first) == self.offset and total == str(self.total)
                and int(last) == self.total - 1)


def validator(headers: HTTPHeaders) -> str | None:
    """What If-Range may carry for this response: a strong ETag, else a
    Last-Modified date that is strong in RFC 9110's sense (at least a
    second older than the response's Date, so it changed no later than
    it says). A weak ETag (``W/``) cannot be used in If-Range."""
    etag = headers.get("ETag", "").strip()
    if etag.startswith('"') and etag.endswith('"') and len(etag) >= 2:
        return etag
    modified = headers.get("Last-Modified", "").strip()
    if not modified:
        return None
    try:
        when = email.utils.parsedate_to_datetime(modified)
        date = headers.get("Date")
        if date and (email.utils.parsedate_to_datetime(date) - when).total_seconds() < 1:
            return None
    except (TypeError, ValueError):
        return None
    return modified


def strong_validators(headers: HTTPHeaders) -> tuple[str | None, str | None]:
    """The response's ETag and Last-Modified, each only if it is strong:
    what a later revalidation may rely on to reuse this download's digests
    (a weak ETag, or a date within a second of the response, promises the
    same meaning, not the same bytes)."""
    etag = headers.get("ETag", "").strip()
    strong_etag = etag if etag.startswith('"') and etag.endswith('"') and len(etag) >= 2 \
        else None
    without_etag = HTTPHeaders({k: v for k, v in headers.get_all() if k.lower() != "etag"})
    return strong_etag, validator(without_etag)


def why_not(algorithms: list[str], length: int | None, headers: HTTPHeaders,
            min_size: int) -> str | None:
    """Why this download will not be checkpointed, as a sentence; None if
    it will be."""
    if length is None:
        return "the server did not announce the file's length"
    if length <= min_size:
        return "the file is not larger than RESUMABLE_MIN_SIZE; a retry fetches it again"
    cannot = [a for a in algorithms if a not in RESUMABLE_ALGORITHMS]
    if cannot:
        return (f"the {', '.join(cannot)} hash state cannot be saved; a retry fetches the "
                "file again (ask for md5, sha1, sha256 or sha512 only to resume)")
    if headers.get("Accept-Ranges", "").strip().lower() == "none":
        return "the server does not accept range requests"
    if validator(headers) is None:
        return ("the server sent no strong ETag nor Last-Modified, so a retry could not "
                "tell whether the file changed")
    return None
