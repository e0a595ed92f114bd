"""The object stores' checksums without a service: CRCs, the claims read
off headers, and multipart part sizes."""

from __future__ import annotations

import zlib

import pytest

from service.fetch.checkpoint import ResumableHash
from service.model.digests import Crc, new_hash, parse_algorithms, parse_expected

CHECK = b"123456789"


@pytest.mark.parametrize("algorithm, value", [
    # The catalogue's check values (CRC-32/ISO-HDLC, CRC-32/ISCSI, CRC-64/NVME).
    ("crc32", "cbf43926"), ("crc32c", "e3069283"), ("crc64nvme", "ae8b14860a799888"),
])
def test_crc_check_values_in_pieces_and_resumed(algorithm, value):
    h = new_hash(algorithm)
    h.update(CHECK[:4])
    h.update(bytearray(CHECK[4:]))
    assert h.hexdigest() == value
    half = ResumableHash(algorithm)
    half.update(CHECK[:5])
    rest = ResumableHash(algorithm, half.state())
    rest.update(CHECK[5:])
    assert rest.hexdigest() == value
    copied = Crc(algorithm)
    copied.update(CHECK)
    assert copied.copy().hexdigest() == value


def test_crc32_is_zlibs():
    data = bytes(range(256)) * 1000
    h = new_hash("crc32")
    h.update(memoryview(data))
    assert int(h.hexdigest(), 16) == zlib.crc32(data)


def test_crcs_are_requestable_and_expected():
    assert parse_algorithms(["CRC-32C,crc64nvme"]) == ["md5", "crc32c", "crc64nvme"]
    assert str(parse_expected("crc32c:E3069283")) == "crc32c:e3069283"
    assert str(parse_expected("crc32c=:4waSgw==:")) == "crc32c:e3069283"
