"""A Metalink 4 document (RFC 5854) submitted in place of a url: its
``<url>``s become the task's url (the most preferred) and mirrors, its
``<hash>`` the expected checksum, its ``<pieces>`` the piece hashes that
pin a corrupt mirror, its ``<size>`` the length the file must have.

The XML comes from a stranger, and the standard library's parser expands
internal entities (a "billion laughs" document costs gigabytes), so any
DOCTYPE is refused before the tree is built: expat reports the
declaration before it could define an entity, and RFC 5854 documents
have no use for one. One ``<file>`` only: a task is one file."""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET
from xml.parsers import expat

from service.intake.validation import InvalidInput
from service.model.digests import Checksum, canonical
from service.model.pieces import PieceHashes

MEDIA_TYPE = "application/metalink4+xml"
_NS = "{urn:ietf:params:xml:ns:metalink}"
# Strongest first: the one that becomes ``expected``.
_PREFERRED = ("sha512", "sha256", "sha1", "md5")
_HEX_LENGTH = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")
# RFC 5854 §4.1.2.3: 1 is the most preferred; a url without one is last.
_LAST = 999999


@dataclasses.dataclass
class Metalink:
    urls: list[str]  # most preferred first
    expected: Checksum | None
    size: int | None
    pieces: PieceHashes | None


class _Doctype(Exception):
    pass


def parse(text: str) -> Metalink:
    """The one file the document describes; InvalidInput says what is wrong."""
    _refuse_doctype(text)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise InvalidInput(f"metalink is not well-formed XML: {exc}") from None
    if root.tag != f"{_NS}metalink":
        raise InvalidInput("metalink is not a Metalink 4 document (RFC 5854): its root must "
                           "be <metalink xmlns=\"urn:ietf:params:xml:ns:metalink\">")
    files = root.findall(f"{_NS}file")
    if len(files) != 1:
        raise InvalidInput(f"metalink describes {len(files)} files; a task is one file, so "
                           "submit a Metalink with exactly one <file> (or a manifest)")
    file = files[0]
    return Metalink(urls=_urls(file), expected=_expected(file), size=_size(file),
                    pieces=_pieces(file))


def _refuse_doctype(text: str) -> None:
    parser = expat.ParserCreate()

    def refuse(*_: object) -> None:
        raise _Doctype

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    try:
        parser.Parse(text, True)
    except _Doctype:
        raise InvalidInput("metalink must not contain a DOCTYPE or entity declarations "
                           "(they are refused, not expanded)") from None
    except expat.ExpatError as exc:
        raise InvalidInput(f"metalink is not well-formed XML: {exc}") from None


def _urls(file: ET.Element) -> list[str]:
    ranked = []
    for order, element in enumerate(file.findall(f"{_NS}url")):
        text = (element.text or "").strip()
        if not text:
            continue
        priority = (element.get("priority") or "").strip()
        rank = int(priority) if priority.isdigit() and priority.isascii() else _LAST
        ranked.append((rank, order, text))
    if not ranked:
        raise InvalidInput("metalink has no <url> to download the file from")
    return [text for _, _, text in sorted(ranked)]


def _expected(file: ET.Element) -> Checksum | None:
    found = {}
    for element in file.findall(f"{_NS}hash"):
        algorithm = canonical(element.get("type") or "")
        if algorithm in _HEX_LENGTH:
            found[algorithm] = _hex(algorithm, element.text, "<hash>")
    for algorithm in _PREFERRED:
        if algorithm in found:
            return Checksum(algorithm, found[algorithm])
    return None


def _size(file: ET.Element) -> int | None:
    element = file.find(f"{_NS}size")
    if element is None:
        return None
    text = (element.text or "").strip()
    if not (text.isdigit() and text.isascii()) or len(text) > 20:
        raise InvalidInput("metalink's <size> must be a whole number of bytes")
    return int(text)


def _pieces(file: ET.Element) -> PieceHashes | None:
    lists = file.findall(f"{_NS}pieces")
    usable = [p for p in lists if canonical(p.get("type") or "") in _HEX_LENGTH]
    if not usable:
        return None
    # The strongest list a file offers, as for its whole-file hash.
    usable.sort(key=lambda p: _PREFERRED.index(canonical(p.get("type") or "") or "md5"))
    chosen = usable[0]
    algorithm = canonical(chosen.get("type") or "") or "md5"
    length = (chosen.get("length") or "").strip()
    if not (length.isdigit() and length.isascii()) or int(length) < 1:
        raise InvalidInput("metalink's <pieces> needs a length: a whole number of bytes")
    hashes = tuple(_hex(algorithm, h.text, "<pieces>")
                   for h in chosen.findall(f"{_NS}hash"))
    if not hashes:
        raise InvalidInput("metalink's <pieces> lists no <hash>")
    pieces = PieceHashes(algorithm, int(length), hashes)
    size = _size(file)
    if size is not None and not pieces.fits(size):
        raise InvalidInput(f"metalink's <pieces> lists {len(hashes)} hashes of {length} bytes, "
                           f"which does not fit its <size> of {size} bytes")
    return pieces


def _hex(algorithm: str, text: str | None, where: str) -> str:
    value = (text or "").strip().lower()
    if len(value) != _HEX_LENGTH[algorithm] or not _HEX.fullmatch(value):
        raise InvalidInput(f"metalink's {where} of type {algorithm} must be "
                           f"{_HEX_LENGTH[algorithm]} hex digits")
    return value
