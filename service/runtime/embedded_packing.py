"""WiredTiger's key and value packing, byte for byte, without parsing the
format string at every call (patch 7 of ``embedded_patches``).

SecantusDB reaches WiredTiger through its SWIG binding, whose
``Cursor.set_key``/``set_value``/``get_keys``/``get_values`` call the
pure-Python ``packing.pack``/``unpack``. Those re-parse the format (a
generator per call, a character at a time) for every key of every index
entry: about an eighth of the embedded database's CPU in a burst of small
tasks. Here each format SecantusDB uses is parsed once into a list of
column kinds, and the columns are packed by the same rules: ``S`` a
NUL-terminated UTF-8 string (cut at an embedded NUL), ``u`` raw bytes
(length-prefixed unless last), integers by WiredTiger's own
``intpacking.pack_int``/``unpack_int``.

Anything else (a size digit, another column type, a value of a type the
fast path does not model) goes to the upstream function, errors included,
so the bytes and the failures are upstream's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_INTEGERS = frozenset("bBhHiIlLqQr")
_STRING, _BYTES, _LAST_BYTES, _INT = range(4)


def _columns(fmt: str) -> tuple[int, ...] | None:
    """The fast path's reading of ``fmt``; None when it is not modelled."""
    if not fmt or fmt[0] in ".@<>":
        return None
    kinds = []
    for i, char in enumerate(fmt):
        if char == "S":
            kinds.append(_STRING)
        elif char == "u":
            kinds.append(_LAST_BYTES if i == len(fmt) - 1 else _BYTES)
        elif char in "qQr":
            kinds.append(_INT)
        else:  # sizes, padding, bytes and bit fields: upstream's
            return None
    return tuple(kinds)


def make(upstream_pack: Callable[..., Any], upstream_unpack: Callable[..., Any],
         pack_int: Callable[[int], bytes], unpack_int: Callable[[bytes], tuple[int, bytes]]
         ) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``pack`` and ``unpack`` over upstream's, for the binding's module."""
    parsed: dict[str, tuple[int, ...] | None] = {}

    def columns(fmt: str) -> tuple[int, ...] | None:
        try:
            return parsed[fmt]
        except KeyError:
            kinds = parsed[fmt] = _columns(fmt)
            return kinds

    def pack(fmt: str, *values: Any) -> Any:
        kinds = columns(fmt)
        if kinds is None or len(values) < len(kinds):
            return upstream_pack(fmt, *values)
        out = []
        # Values past the format are ignored, as upstream ignores them.
        for kind, value in zip(kinds, values, strict=False):
            if kind == _STRING:
                if type(value) is not str:
                    return upstream_pack(fmt, *values)
                nul = value.find("\0")
                out.append((value if nul < 0 else value[:nul]).encode())
                out.append(b"\0")
            elif kind == _INT:
                if type(value) is not int:
                    return upstream_pack(fmt, *values)
                out.append(pack_int(value))
            else:
                if type(value) is not bytes:
                    return upstream_pack(fmt, *values)
                if kind == _BYTES:
                    out.append(pack_int(len(value)))
                out.append(value)
        return b"".join(out)

    def unpack(fmt: str, data: Any) -> Any:
        kinds = columns(fmt)
        if kinds is None or type(data) is not bytes:
            return upstream_unpack(fmt, data)
        result: list[Any] = []
        pos = 0
        try:
            for kind in kinds:
                if kind == _STRING:
                    end = data.find(b"\0", pos)
                    if end < 0:  # upstream's own reading of a missing NUL
                        return upstream_unpack(fmt, data)
                    result.append(data[pos:end].decode())
                    pos = end + 1
                elif kind == _LAST_BYTES:
                    result.append(data[pos:])
                    pos = len(data)
                else:
                    value, rest = unpack_int(data[pos:])
                    pos = len(data) - len(rest)
                    if kind == _BYTES:
                        if value < 0:  # upstream slices from the end
                            return upstream_unpack(fmt, data)
                        result.append(data[pos:pos + value])
                        pos += value
                    else:
                        result.append(value)
        except (IndexError, UnicodeDecodeError):
            return upstream_unpack(fmt, data)
        return result

    return pack, unpack
