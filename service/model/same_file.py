"""When two submits ask for the same work: the same file, the same digests;
and what is known of a file from its last download.

Coalescing (storage.coalescing) runs one download for all of them, so the
key must not tell apart URLs that every server treats alike (scheme and
host case, a default port, a fragment, which never reaches the server),
and must tell apart everything else: path and query stay byte for byte,
since servers may treat their case and order as meaningful. One exception,
because it is not one on the wire: an empty query (``g.bin?``) is no query,
as Tornado's client sends both as ``GET /g.bin`` (an empty path as ``/``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import urllib.parse
from typing import Any

_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21, "ftps": 990}


def normalized_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"
    if parts.username is not None or parts.password is not None:
        # Credentials pick what the server returns: never shared between
        # different ones (validation refuses them today; this stays safe).
        netloc = f"{parts.username or ''}:{parts.password or ''}@{netloc}"
    path = parts.path or "/"
    return urllib.parse.urlunsplit((scheme, netloc, path, parts.query, ""))


def file_key(url: str, algorithms: list[str]) -> str:
    """The coalescing key: a digest, so that a URL of any length fits in
    an ``_id``."""
    return _file_key(url, tuple(algorithms))


# A submit and its task's end ask for the key five times over, and parsing
# the URL was a few percent of the API's CPU in a burst of small files.
@functools.lru_cache(maxsize=4096)
def _file_key(url: str, algorithms: tuple[str, ...]) -> str:
    text = normalized_url(url) + "\n" + ",".join(sorted(set(algorithms)))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclasses.dataclass
class KnownFile:
    """The last complete download of a file (storage.known_files): enough
    to answer a submit that accepts a result ``max_age`` seconds old, or to
    ask the server whether the file changed since (ETag, Last-Modified)."""
    task: str
    at: dt.datetime
    digests: dict[str, str]
    etag: str | None = None
    last_modified: str | None = None
    bytes: int | None = None

    def age(self, now: dt.datetime) -> float:
        return (now - self.at).total_seconds()

    def conditional_headers(self) -> dict[str, str]:
        """The request headers that let the server answer 304 Not Modified.
        Strong validators only (records keep no others; older records may
        hold a weak ETag, which is not sent): a 304 then promises the same
        bytes, not merely the same meaning, and the digests still hold."""
        headers = {}
        if self.etag and not self.etag.startswith("W/"):
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers

    def confirmed_by(self, headers: Any) -> bool:
        """Whether a 304 names the version the digests are of: it must
        repeat the validator asked with (RFC 9110 15.4.5 has a 304 send the
        ETag a 200 would), compared strongly. In doubt, download again."""
        asked = self.conditional_headers()
        if "If-None-Match" in asked:
            return headers.get("ETag", "").strip() == self.etag
        modified = headers.get("Last-Modified", "").strip()
        return "If-Modified-Since" in asked and modified == self.last_modified

    def to_doc(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_doc(cls, doc: dict[str, Any] | None) -> KnownFile | None:
        if not doc:
            return None
        return cls(task=doc["task"], at=doc["at"], digests=dict(doc["digests"]),
                   etag=doc.get("etag"), last_modified=doc.get("last_modified"),
                   bytes=doc.get("bytes"))
