"""A Metalink's piece hashes (RFC 5854 §4.2.9): the digest of every
``length`` bytes of the file, in order. They pin a corrupt mirror to the
piece it sent (fetch.segments), where the file's own digest could only
say that some byte somewhere was wrong."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any


@dataclasses.dataclass(frozen=True)
class PieceHashes:
    algorithm: str  # a hashlib name: md5, sha1, sha256, sha512
    length: int
    hashes: tuple[str, ...]  # lowercase hex, piece 0 first

    def fits(self, total: int) -> bool:
        """Whether the list describes a file of ``total`` bytes."""
        return len(self.hashes) == -(-total // self.length)

    def problem(self, start: int, data: bytes | bytearray) -> str | None:
        """Why ``data``, the file's bytes from ``start`` (a piece boundary),
        is not what the list says (None: every piece in it matches)."""
        view = memoryview(data)
        for offset in range(0, len(data), self.length):
            index = (start + offset) // self.length
            got = hashlib.new(self.algorithm, view[offset:offset + self.length]).hexdigest()
            if got != self.hashes[index]:
                return (f"piece {index} (bytes {start + offset}-"
                        f"{start + offset + min(self.length, len(data) - offset) - 1}) hashed "
                        f"to {self.algorithm} {got}, the Metalink says {self.hashes[index]}")
        return None

    def to_doc(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm, "length": self.length, "hashes": list(self.hashes)}

    @classmethod
    def from_doc(cls, doc: dict | None) -> PieceHashes | None:
        if not doc:
            return None
        return cls(doc["algorithm"], int(doc["length"]), tuple(doc["hashes"]))
