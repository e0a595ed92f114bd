"""Read a manifest: the lines ``sha256sum`` (or md5sum, sha1sum, sha512sum,
b2sum) prints, with URLs where it prints file names, or a JSON list.

Text lines are ``<hex>  <url>`` (``<hex> *<url>`` in binary mode) or the
BSD form ``--tag`` prints, ``SHA256 (<url>) = <hex>``; blank lines and
``#`` comments are skipped but counted, so line numbers are the ones an
editor shows: lines end at ``\n`` only (a ``\r`` before it is dropped, a
UTF-8 BOM before the first is skipped), never at the other characters
``str.splitlines`` breaks on (U+0085, U+2028, form feed...), which may sit
inside a URL. The algorithm comes from ``algorithm=``, else from the
digest's length. JSON is a list of ``{"url": ..., "expected": ...}``,
``expected`` in any form ``/submit`` takes, or bare hex.

The cost of a manifest is bounded before any work per line: a body is
refused when it holds more than MAX_TEXT_LINES lines, or (JSON) more than
MAX_JSON_VALUES values, counted in C over the bytes (``bytes.count``, one
regular expression); only then are lines split and checked, a slice at a
time with the IOLoop free in between. Every line is checked before
anything is stored: one bad line refuses the manifest, the first
MAX_ERRORS_SHOWN bad lines named and the rest counted.
"""

from __future__ import annotations

import asyncio
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
# Blank and comment lines are numbered too, but not without end.
MAX_TEXT_LINES = 2 * MAX_LINES
# A JSON entry is an object of two members, four strings. Strings and
# containers are bounded by their quotes and brackets before parsing,
# numbers while parsing: json.loads then builds a bounded number of objects.
MAX_JSON_VALUES = 8 * MAX_LINES
# Shown in a 400: enough to fix a file, not a second copy of it.
MAX_ERRORS_SHOWN = 20
# Lines checked between two returns to the IOLoop (about 5 ms of work).
SLICE = 250
_BOM = b"\xef\xbb\xbf"


@dataclasses.dataclass(frozen=True)
class Line:
    number: int
    url: str
    expected: Checksum


class ManifestInvalid(Exception):
    def __init__(self, message: str, errors: list[tuple[int, str]] | None = None):
        super().__init__(message)
        self.errors = errors or []


def text_lines(data: bytes | bytearray) -> int:
    """How many lines a text body holds, as an editor numbers them."""
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


async def parse(body: bytes, json_body: bool, algorithm: str | None,
                policy: AddressPolicy) -> list[Line]:
    """The manifest's lines, or ManifestInvalid. A coroutine: it returns to
    the IOLoop every SLICE lines, so a 10,000-line manifest does not hold
    up other requests."""
    fixed = None
    if algorithm:
        fixed = canonical(algorithm)
        if fixed is None:
            raise ManifestInvalid(f"unknown algorithm {algorithm[:40]!r}")
    entries = _json_entries(body) if json_body else _text_entries(body)
    if len(entries) > MAX_LINES:
        raise ManifestInvalid(f"the manifest has {len(entries)} lines; the limit is {MAX_LINES}")
    lines, errors = [], []
    for i, (number, url, checksum) in enumerate(entries):
        if i and i % SLICE == 0:
            await asyncio.sleep(0)
        try:
            expected = _checksum(checksum, fixed)  # first: says why a line is unreadable
            lines.append(Line(number, check_url(url, policy), expected))
        except (InvalidInput, DigestSpecError) as exc:
            errors.append((number, str(exc)))
    if errors:
        raise ManifestInvalid(_refused(len(errors), len(entries)), errors[:MAX_ERRORS_SHOWN])
    if not lines:
        raise ManifestInvalid("the manifest has no lines")
    return lines


def _refused(bad: int, total: int) -> str:
    message = f"{bad:,} of {total:,} lines are not valid; nothing was accepted"
    if bad > MAX_ERRORS_SHOWN:
        more = bad - MAX_ERRORS_SHOWN
        message += f" (the first {MAX_ERRORS_SHOWN} are listed, and {more:,} more)"
    return message


def _text_entries(body: bytes) -> list[tuple[int, Any, Any]]:
    count = text_lines(body)
    if count > MAX_TEXT_LINES:
        raise ManifestInvalid(f"the manifest has {count:,} lines; the limit is {MAX_LINES} "
                              f"checksum lines and {MAX_TEXT_LINES} lines in all")
    if body.startswith(_BOM):
        body = body[len(_BOM):]
    entries: list[tuple[int, Any, Any]] = []
    for number, raw in enumerate(body.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").removesuffix("\r").strip(" \t")
        except UnicodeDecodeError:
            raise ManifestInvalid(f"the manifest is not valid UTF-8 (line {number})") from None
        if not line or line.startswith("#"):
            continue
        if len(entries) == MAX_LINES:
            entries.append((number, None, None))  # one over: enough to refuse
            break
        bsd = _BSD.match(line)
        gnu = _GNU.match(line)
        if bsd:
            entries.append((number, bsd.group(2), (bsd.group(1), bsd.group(3))))
        elif gnu:
            entries.append((number, gnu.group(2), (None, gnu.group(1))))
        else:
            entries.append((number, None, _Unreadable()))
    if len(entries) > MAX_LINES:
        raise ManifestInvalid(f"the manifest has more than {MAX_LINES} checksum lines; "
                              f"the limit is {MAX_LINES}")
    return entries


def _json_entries(body: bytes) -> list[tuple[int, Any, Any]]:
    too_many = ManifestInvalid(f"the JSON manifest has more than {MAX_JSON_VALUES:,} values; "
                               f"it may list at most {MAX_LINES} files")
    # Upper bounds: a quote inside a string (escaped), a bracket or a comma
    # in a URL only makes the count larger. Commas bound null, true and
    # false, which no parser hook sees.
    if body.count(b'"') // 2 + body.count(b"[") + body.count(b"{") > MAX_JSON_VALUES \
            or body.count(b",") > MAX_JSON_VALUES:
        raise too_many
    counted = 0

    def scalar(text: str) -> str:
        nonlocal counted
        counted += 1
        if counted > MAX_JSON_VALUES:
            raise too_many
        return text  # never a checksum: the entry says why

    try:
        data = json.loads(body.decode("utf-8-sig"), parse_int=scalar, parse_float=scalar,
                          parse_constant=scalar)
    except UnicodeDecodeError:
        raise ManifestInvalid("the manifest is not valid UTF-8") from None
    except (ValueError, RecursionError):
        raise ManifestInvalid("the manifest is not valid JSON") from None
    if not isinstance(data, list):
        raise ManifestInvalid('a JSON manifest is a list: [{"url": ..., "expected": ...}]')
    if len(data) > MAX_LINES:
        raise ManifestInvalid(f"the manifest has {len(data)} lines; the limit is {MAX_LINES}")
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
