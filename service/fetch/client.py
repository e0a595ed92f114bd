"""The HTTP client a worker downloads with, and what the download reads
off a response's headers besides the body."""

from __future__ import annotations

import email.utils
import time
import urllib.parse

from tornado import httputil
from tornado.httpclient import AsyncHTTPClient

from service.config import Config
from service.fetch import server_claims
from service.fetch import tornado_hooks as hooks
from service.fetch.netpolicy import AddressPolicy, FilteringResolver, parse_overrides
from service.model.numbers import whole_number

MAX_HEADER_SIZE = 64 * 1024


def make_client(config: Config) -> AsyncHTTPClient:
    """One client per worker process, sized to its concurrency so that no
    request waits in Tornado's queue (where it would time out)."""
    resolver = FilteringResolver(
        policy=AddressPolicy(config.allow_private_urls, config.allow_networks),
        overrides=parse_overrides(config.resolve))
    # max_body_size is left unbounded: the Download enforces MAX_FILE_SIZE
    # itself, so that hitting it reads as "too large" and not as a dropped
    # connection, whatever the framing (length, chunked, until close).
    # Segmented downloads open more than one connection each.
    client = hooks.make_client(resolver, config.concurrency * config.max_connections,
                               MAX_HEADER_SIZE)
    # No x-amz-checksum-mode to a presigned URL, whichever hop it is.
    client.before_hop = server_claims.before_hop
    return client


def host_of(url: str) -> str:
    try:
        return urllib.parse.urlsplit(url).hostname or url
    except ValueError:
        return url


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    seconds = whole_number(value)
    if seconds is not None:
        return float(seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class ResponseHead:
    """A response's status and headers as ``header_callback`` hands them
    over, line by line, interim 1xx heads skipped."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers = httputil.HTTPHeaders()

    def feed(self, line: str) -> bool:
        """Take one line; True when it ends the final head."""
        if line.startswith("HTTP/"):
            self.status = httputil.parse_response_start_line(line.strip()).code
            self.headers = httputil.HTTPHeaders()
        elif line == "\r\n":
            if self.status is not None and 100 <= self.status < 200:
                self.status = None
            return self.status is not None
        elif self.status is not None:
            self.headers.parse_line(line)
        return False
