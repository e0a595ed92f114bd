"""When two submits ask for the same work: the same file, the same digests.

Coalescing (storage.coalescing) runs one download for all of them, so the
key must not tell apart URLs that every server treats alike (scheme and
host case, a default port, a fragment, which never reaches the server),
and must tell apart everything else: path and query stay byte for byte,
since servers may treat their case and order as meaningful.
"""

from __future__ import annotations

import hashlib
import urllib.parse

_DEFAULT_PORTS = {"http": 80, "https": 443}


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
    text = normalized_url(url) + "\n" + ",".join(sorted(set(algorithms)))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
