"""The embedded database's fast WiredTiger packing (embedded_patches, patch
7) gives upstream's bytes and upstream's errors, for every format
SecantusDB uses and for random ones, on values of every type and on
damaged data."""

import random
import sys

import pytest
from secantus import storage
from wiredtiger import intpacking

from service.runtime import embedded_packing

binding = sys.modules[storage.wt.Cursor.__module__]
UPSTREAM_PACK, UPSTREAM_UNPACK = binding.pack, binding.unpack
pack, unpack = embedded_packing.make(UPSTREAM_PACK, UPSTREAM_UNPACK,
                                     intpacking.pack_int, intpacking.unpack_int)

# What secantus.storage creates its tables with, and others the fast path
# models or leaves to upstream (sizes, padding, bytes).
FORMATS = ["SSq", "SSSu", "SSu", "q", "u", "S", "SS", "SSS", "uu", "uq", "Su", "qS", "r",
           "QQ", "", "3S", "Sx", "SB", "5u", ".S", "<q", "t"]
INTS = [0, 1, 63, 64, 8255, 8256, 8257, 8258, -1, -64, -65, -8256, -8257, -8258,
        2**40, -2**40, 2**63 - 1, -2**63]


def _value(rnd: random.Random, column: str):
    if rnd.random() < 0.1:  # a type the column does not expect
        return rnd.choice([b"ab", "str", "é", 3, True, 1.5, None])
    if column == "S":
        return rnd.choice(["", "a", "md5light", "é€", "a\0b", "\0", "x" * 300])
    if column == "u":
        return rnd.choice([b"", b"\0\1", rnd.randbytes(rnd.randrange(300))])
    return rnd.choice(INTS)


def _outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except Exception as exc:  # the same exception type is part of the contract
        return "error", type(exc)


def _damaged(rnd: random.Random, data: bytes) -> bytes:
    roll = rnd.random()
    if roll < 0.1:
        return data[:rnd.randrange(len(data) + 1)]
    if roll < 0.15:
        return rnd.randbytes(rnd.randrange(12))
    return data


@pytest.mark.parametrize("seed", range(4))
def test_pack_and_unpack_agree_with_upstream(seed):
    rnd = random.Random(seed)
    checked = 0
    for _ in range(20000):
        fmt = (rnd.choice(FORMATS) if rnd.random() < 0.8
               else "".join(rnd.choice("SuqQr") for _ in range(rnd.randrange(1, 5))))
        values = [_value(rnd, column) for column in fmt if column.isalpha()]
        if values and rnd.random() < 0.02:
            values.pop()
        packed = _outcome(UPSTREAM_PACK, fmt, *values)
        assert _outcome(pack, fmt, *values) == packed, (fmt, values)
        if packed[0] == "ok" and isinstance(packed[1], bytes):
            data = _damaged(rnd, packed[1])
            assert _outcome(unpack, fmt, data) == _outcome(UPSTREAM_UNPACK, fmt, data), \
                (fmt, data)
            checked += 1
    assert checked > 10000


def test_a_value_of_none_unpacks_as_upstream():
    assert unpack("u", None) == UPSTREAM_UNPACK("u", None) == [b""]


def test_the_fast_path_takes_the_storage_formats():
    """Not a speed assertion: that the formats the storage uses are the
    ones modelled, so the patch is not a silent pass-through."""
    for fmt in ("SSq", "SSSu", "SSu", "q", "u", "S", "SS", "SSS"):
        assert embedded_packing._columns(fmt) is not None
    for fmt in ("3S", "Sx", "SB", ".S", "t", ""):
        assert embedded_packing._columns(fmt) is None
