"""URLs as logs may show them.

A URL's query string, fragment and user info often carry secrets (signed
download tokens, API keys, email addresses). Logs keep the scheme, host,
port and path, enough to tell which download a line is about.
"""

from __future__ import annotations

import re

MAX_LOGGED_URL = 200

_SECRET_PART = re.compile(r"[?#;]")
# Any absolute URL in free text (exception messages, tracebacks, reprs).
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>`]+")
# A request target ("/submit?url=...&email=...") as Tornado's own request
# summaries print it.
_TARGET_IN_TEXT = re.compile(r"(?<![\w/:.])(/[^\s?#;\"'<>`]*)[?#;][^\s\"'<>`]*")


def safe_url(url: str, limit: int = MAX_LOGGED_URL) -> str:
    """scheme://host[:port]/path of a URL, cut to `limit` characters. Never
    raises: a URL too broken to parse is still cut at its query string."""
    url = _SECRET_PART.split(url, maxsplit=1)[0]
    scheme, sep, rest = url.partition("://")
    if sep:
        netloc, slash, path = rest.partition("/")
        url = f"{scheme}://{netloc.rpartition('@')[2]}{slash}{path}"
    return url if len(url) <= limit else url[:limit - 3] + "..."


def scrub_urls(text: str) -> str:
    """Text with every URL in it reduced to safe_url, and every request
    target to its path."""
    if "/" not in text:
        return text
    text = _URL_IN_TEXT.sub(lambda m: safe_url(m.group(0)), text)
    return _TARGET_IN_TEXT.sub(r"\1", text)


def redact_email(address: str | None) -> str:
    """u***@example.com: enough to tell mails apart in a log, no more."""
    if not address:
        return "-"
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}"
