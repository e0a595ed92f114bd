"""Read a manifest: the lines ``sha256sum`` (or md5sum, sha1sum, sha512sum,
b2sum) prints, with URLs where it prints file names, or a JSON list.

Text lines are ``<hex>  <url>`` (``<hex> *<url>`` in binary mode) or the
BSD form ``--tag`` prints, ``SHA256 (<url>) = <hex>``; blank lines and
``#`` comments are skipped but counted, so line numbers are the ones an
editor shows. The algorithm comes from ``algorithm=``, else from the
digest's length. JSON is a list of ``{"url": ..., "expected": ...}``,
``expected`` in any form ``/submit`` takes, or bare hex.

Every line is checked before anything is stored: one bad line refuses
the manifest, with every bad line named.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from service.fetch.netpolicy import AddressPolicy
from service.intake.validation import InvalidInput, check_url
from service.model.digests import (
    Checksum,
    DigestSpecError,
    algorithm_for_hex_length,
    canonical,
    checksum_from_hex,
    parse_expected,
)
from service.model.manifest import MAX_LINES

_GNU = re.compile(r"^\\?([0-9a-fA-F]+) [ *](.+)$")
_BSD = re.compile(r"^([A-Za-z0-9-]+) \((.+)\) = ([0-9a-fA-F]+)$")
# Shown in a 400: enough to fix a file, not a second copy of it.
MAX_ERRORS_SHOWN = 1000


@dataclasses.dataclass(frozen=True)
class Line:
    number: int
    url: str
    expected: Checksum


class ManifestInvalid(Exception):
    def __init__(self, message: str, errors: list[tuple[int, str]] | None = None):
        super().__init__(message)
        self.errors = errors or []


def parse(body: bytes, json_body: bool, algorithm: str | None,
          policy: AddressPolicy) -> list[Line]:
    """The manifest's lines, or ManifestInvalid."""
    fixed = None
    if algorithm:
        fixed = canonical(algorithm)
        if fixed is None:
            raise ManifestInvalid(f"unknown algorithm {algorithm[:40]!r}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestInvalid("the manifest is not valid UTF-8") from None
    entries = _json_entries(text) if json_body else _text_entries(text)
    lines, errors = [], []
    for number, url, checksum in entries:
        try:
            expected = _checksum(checksum, fixed)  # first: says why a line is unreadable
            lines.append(Line(number, check_url(url, policy), expected))
        except (InvalidInput, DigestSpecError) as exc:
            errors.append((number, str(exc)))
    if errors:
        raise ManifestInvalid(f"{len(errors)} of {len(entries)} lines are not valid; "
                              "nothing was accepted", errors[:MAX_ERRORS_SHOWN])
    if not lines:
        raise ManifestInvalid("the manifest has no lines")
    if len(lines) > MAX_LINES:
        raise ManifestInvalid(f"the manifest has {len(lines)} lines; the limit is {MAX_LINES}")
    return lines


def _text_entries(text: str) -> list[tuple[int, Any, Any]]:
    entries: list[tuple[int, Any, Any]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        bsd = _BSD.match(line)
        gnu = _GNU.match(line)
        if bsd:
            entries.append((number, bsd.group(2), (bsd.group(1), bsd.group(3))))
        elif gnu:
            entries.append((number, gnu.group(2), (None, gnu.group(1))))
        else:
            entries.append((number, None, _Unreadable()))
    return entries


def _json_entries(text: str) -> list[tuple[int, Any, Any]]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise ManifestInvalid("the manifest is not valid JSON") from None
    if not isinstance(data, list):
        raise ManifestInvalid('a JSON manifest is a list: [{"url": ..., "expected": ...}]')
    entries: list[tuple[int, Any, Any]] = []
    for number, item in enumerate(data, start=1):
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            entries.append((number, None, _Unreadable("each entry must be an object with "
                                                      "a url and an expected checksum")))
        else:
            entries.append((number, item["url"], item.get("expected")))
    return entries


class _Unreadable:
    def __init__(self, why: str = "not a checksum line: expected '<hex>  <url>' or "
                                  "'SHA256 (<url>) = <hex>'"):
        self.why = why


def _checksum(value: Any, fixed: str | None) -> Checksum:
    if isinstance(value, _Unreadable):
        raise InvalidInput(value.why)
    if isinstance(value, tuple):  # from a text line: (tag or None, hex)
        tag, digits = value
        algorithm = canonical(tag) if tag else fixed or algorithm_for_hex_length(len(digits))
        if tag and algorithm is None:
            raise InvalidInput(f"unknown algorithm {tag[:40]!r}")
        if tag and fixed and algorithm != fixed:
            raise InvalidInput(f"the line says {algorithm}, the request algorithm={fixed}")
        if algorithm is None:
            raise InvalidInput(f"a checksum of {len(digits)} hex digits matches no "
                               "algorithm; say which with ?algorithm=")
        return checksum_from_hex(algorithm, digits)
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput("expected is missing: every line needs a checksum")
    if re.fullmatch(r"[0-9a-fA-F]+", value.strip()):
        return _checksum((None, value.strip()), fixed)
    checksum = parse_expected(value)
    if fixed and checksum.algorithm != fixed:
        raise InvalidInput(f"the line says {checksum.algorithm}, the request "
                           f"algorithm={fixed}")
    return checksum
