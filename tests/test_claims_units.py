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


# -- claims read off headers -----------------------------------------------------

MIB = 1024 * 1024


def test_candidate_part_sizes_are_the_consistent_ones():
    from service.fetch.multipart import candidate_sizes
    assert candidate_sizes(100 * MIB, 13) == [8 * MIB]
    assert candidate_sizes(20 * MIB, 2) == [15 * MIB, 16 * MIB, 10 * MIB]
    # ceil(length/parts) rounded up to MiB when no uploader's size fits.
    assert candidate_sizes(1000 * MIB + 5, 7) == [143 * MIB]
    assert candidate_sizes(3 * MIB, 1) == [] and candidate_sizes(2, 3) == []
    # The first part's size, when the server told it, is tried first.
    assert candidate_sizes(30 * MIB, 3, first_part=12 * MIB) == [12 * MIB, 10 * MIB]


def test_part_digests_split_at_boundaries_whatever_the_blocks():
    import hashlib

    from service.fetch.multipart import PartDigests
    data = bytes(range(256)) * 41  # 10,496 bytes: parts of 4,000, 4,000, 2,496
    parts = [hashlib.md5(data[i:i + 4000]).digest() for i in range(0, len(data), 4000)]
    for step in (1, 999, 4000, 7000, len(data)):
        p = PartDigests("md5", 4000)
        for i in range(0, len(data), step):
            p.update(data[i:i + step])
        assert p.combined() == (hashlib.md5(b"".join(parts)).hexdigest(), 3)


def _headers(**fields):
    from tornado.httputil import HTTPHeaders
    h = HTTPHeaders()
    for name, value in fields.items():
        for v in value if isinstance(value, list) else [value]:
            h.add(name.replace("_", "-"), v)
    return h


def test_the_stores_headers_become_claims():
    from service.fetch.server_claims import claims, pick
    found = claims(_headers(
        x_amz_checksum_crc64nvme="rosUhgp5mIg=", x_amz_checksum_type="FULL_OBJECT",
        ETag='"' + "a" * 32 + '-12"', x_goog_hash=["crc32c=4waSgw==", "md5=JdVa0Vw7.."]))
    shown = [(c.header, c.checksum.algorithm, c.checksum.hex, c.parts, c.binding) for c in found]
    assert shown == [
        ("x-amz-checksum-crc64nvme", "crc64nvme", "ae8b14860a799888", None, True),
        ("x-goog-hash", "crc32c", "e3069283", None, True),  # the bad md5 is ignored
        ("ETag", "md5", "a" * 32, 12, False)]
    assert pick(found, ["md5"]).header == "x-amz-checksum-crc64nvme"
    composite = claims(_headers(x_amz_checksum_crc32c="4waSgw==-3",
                                x_amz_checksum_type="COMPOSITE", ETag='"' + "b" * 32 + '-3"'))
    assert [(c.header, c.parts) for c in composite] == [("x-amz-checksum-crc32c", 3),
                                                          ("ETag", 3)]
    assert pick(composite, ["md5"]).header == "x-amz-checksum-crc32c"
    # A COMPOSITE value without its part count cannot be checked.
    assert claims(_headers(x_amz_checksum_crc32c="4waSgw==",
                           x_amz_checksum_type="COMPOSITE")) == []
    # GCS's hash of a gzip-stored object served decompressed is not of the bytes.
    assert claims(_headers(x_goog_hash="crc32c=4waSgw==",
                           x_goog_stored_content_encoding="gzip")) == []
    assert len(claims(_headers(x_goog_hash="crc32c=4waSgw==", Content_Encoding="gzip",
                               x_goog_stored_content_encoding="gzip"))) == 1
    # A range's answer: only whole-representation digests.
    assert claims(_headers(x_amz_checksum_crc32c="4waSgw=="), partial=True) == []


def test_presigned_urls_get_no_checksum_mode():
    from tornado.httputil import HTTPHeaders

    from service.fetch.server_claims import REQUEST_HEADERS, before_hop
    for url, kept in [
        ("https://b.s3.amazonaws.com/k", True),
        ("https://b.s3.amazonaws.com/k?X-Amz-Signature=ab&X-Amz-Credential=c", False),
        ("https://b.s3.amazonaws.com/k?AWSAccessKeyId=a&Expires=1&Signature=x", False),
        ("https://storage.googleapis.com/b/k?x-goog-signature=ab", False),
    ]:
        for headers in (dict(REQUEST_HEADERS), HTTPHeaders(REQUEST_HEADERS)):
            before_hop(url, headers)
            assert ("x-amz-checksum-mode" in headers) is kept, url
            assert "Want-Repr-Digest" in headers


def test_a_server_digest_recorded_before_26_reads():
    from service.model.digests import ServerDigest
    etag = ServerDigest.from_doc({"algorithm": "md5", "value": "a" * 32, "header": "ETag",
                                  "match": False})
    assert etag.verified is None and etag.parts is None
    assert ServerDigest.from_doc({"algorithm": "md5", "value": "a" * 32,
                                  "header": "Content-MD5", "match": False}).verified is False


# -- how the check reads: mail, CLI ------------------------------------------------

def test_the_mail_says_which_claim_was_verified_and_how():
    from service import config as config_mod
    from service.model.digests import ServerDigest
    from service.model.task import Status, Task
    from service.notify.mailer import build_message
    task = Task.new("http://h.test/f", "u@example.com", mail_enabled=True)
    task.status, task.md5 = Status.DONE, "d41d8cd98f00b204e9800998ecf8427e"
    task.digests = {"md5": task.md5}
    task.server_digest = ServerDigest("md5", "ab" * 16, "ETag", True, True, parts=13,
                                      part_size=8 * MIB)
    text = build_message(config_mod.load(None, {}), task).get_content()
    assert task.md5 in text
    assert ("The server's own checksum: verified against the server's ETag (md5 of 13 "
            "parts), with parts of 8 MiB.") in text
    task.server_digest = ServerDigest("md5", "ab" * 16, "ETag", False, None, "no size fits",
                                      parts=3)
    text = build_message(config_mod.load(None, {}), task).get_content()
    assert "the server's ETag (md5 of 3 parts) is unverified: no size fits" in text


def test_a_held_sink_hashes_nothing_until_the_gate_and_feeds_watchers_from_byte_0():
    import asyncio
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    from service.fetch.hashing import BLOCK, DigestSink
    from service.fetch.multipart import PartDigests
    data = bytes(range(256)) * (3 * BLOCK // 256) + b"tail"

    async def run(pool):
        sink = DigestSink(["md5"], pool)
        gate = asyncio.get_running_loop().create_future()
        sink.hold(gate)
        part = PartDigests("md5", BLOCK)
        first = sink.feed(data[:1000])
        assert first is not None  # the reader waits for the gate
        waiting = asyncio.ensure_future(first)
        await asyncio.sleep(0.05)
        assert not waiting.done()
        sink.watch(part)  # what the gate's answer decided
        gate.set_result(None)
        await waiting
        for i in range(1000, len(data), 70_000):
            waiter = sink.feed(data[i:i + 70_000])
            if waiter is not None:
                await waiter
        return await sink.hexdigests(), part.combined()

    parts = b"".join(hashlib.md5(data[i:i + BLOCK]).digest() for i in range(0, len(data), BLOCK))
    with ThreadPoolExecutor(2) as pool:
        for executor in (None, pool):
            digests, combined = asyncio.run(run(executor))
            assert digests == {"md5": hashlib.md5(data).hexdigest()}
            assert combined == (hashlib.md5(parts).hexdigest(), 4)
