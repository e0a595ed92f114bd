"""The checksums object stores publish, against the real service: GCS's
and Azure's headers, and S3 shapes moto does not make, from the test file
server (tests/test_s3.py has the S3 server itself)."""

from __future__ import annotations

import hashlib

import pytest
import requests

from fileserver import StoreClaimsHandler, body, md5_of
from service.model.digests import new_hash

SIZE = 300_000
MIB = 1024 * 1024


def value(algorithm: str, data: bytes) -> str:
    h = new_hash(algorithm)
    h.update(data)
    return h.hexdigest()


def parts_value(algorithm: str, data: bytes, part: int) -> str:
    h = new_hash(algorithm)
    for i in range(0, len(data), part):
        h.update(bytes.fromhex(value(algorithm, data[i:i + part])))
    return h.hexdigest()


def submitted(svc, **data) -> str:
    r = requests.post(svc.base + "/submit", data=data, timeout=10)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def done(svc, url: str, **data) -> dict:
    task_id = submitted(svc, url=url, **data)
    r = svc.wait(task_id)
    assert r.status_code == 200, r.text
    assert r.json()["md5"] == md5_of(int(url.split("/store/")[1].split("?")[0]))
    return svc.task(task_id)


@pytest.mark.parametrize("query, algorithm, header", [
    ("goog=crc32c,md5", "md5", "x-goog-hash"),  # md5 is computed anyway
    ("goog=crc32c", "crc32c", "x-goog-hash"),   # a composite GCS object
    ("azure=1", "md5", "x-ms-blob-content-md5"),
    ("amz=crc64nvme", "crc64nvme", "x-amz-checksum-crc64nvme"),
    ("amz=crc32c", "crc32c", "x-amz-checksum-crc32c"),
    ("amz=crc32", "crc32", "x-amz-checksum-crc32"),
    ("amz=sha1", "sha1", "x-amz-checksum-sha1"),
    ("amz=sha256&etag=65536", "sha256", "x-amz-checksum-sha256"),  # before the ETag
])
def test_a_stores_whole_object_claim_is_verified(service, files, query, algorithm, header):
    task = done(service, files.url(f"/store/{SIZE}?{query}"))
    assert task["server_digest"] == {
        "algorithm": algorithm, "value": value(algorithm, body(SIZE)), "header": header,
        "match": True, "verified": True, "why": None, "parts": None, "part_size": None}
    assert task["digests"] == {"md5": md5_of(SIZE)}  # the claim's digest is not shown
    assert StoreClaimsHandler.seen_mode[-1] == "ENABLED"


@pytest.mark.parametrize("query, header", [
    ("goog=crc32c", "x-goog-hash"), ("azure=1", "x-ms-blob-content-md5"),
    ("amz=crc64nvme", "x-amz-checksum-crc64nvme"),
])
def test_a_stores_claim_that_never_matches_fails_as_corrupted(make_service, files, query,
                                                              header):
    svc = make_service(RETRY_BASE="0.1", MAX_ATTEMPTS="2", WORKERS="1")
    task_id = submitted(svc, url=files.url(f"/store/{SIZE}?{query}&wrong=1"))
    assert svc.wait(task_id).status_code == 502
    task = svc.task(task_id)
    assert task["error_code"] == "corrupted" and task["attempts"] == 2
    assert header in task["error"]
    server = task["server_digest"]
    assert server["header"] == header and server["verified"] is False
    assert server["value"] == value(server["algorithm"], body(SIZE) + b"!")
    assert server["value"] in task["error"]


SIZES = [(5 * MIB, "5 MiB"), (8 * MIB, "8 MiB"), (15 * MIB, "15 MiB")]


@pytest.mark.parametrize("part", [5 * MIB, 8 * MIB, 15 * MIB, 6 * MIB])
def test_a_multipart_etag_is_verified_with_the_part_size_found(service, files, part):
    size = 3 * part - 12345  # three parts, the last one short
    data = body(size)
    task = done(service, files.url(f"/store/{size}?etag={part}"))
    assert task["server_digest"] == {
        "algorithm": "md5", "value": parts_value("md5", data, part), "header": "ETag",
        "match": True, "verified": True, "why": None, "parts": 3, "part_size": part}


def test_a_multipart_etag_of_an_unusual_part_size_is_unverified_not_corrupted(service, files):
    part = 7 * MIB  # a size no uploader default gives, nor ceil(length/parts) in MiB
    size = 2 * part + 10
    task = done(service, files.url(f"/store/{size}?etag={part}"))
    server = task["server_digest"]
    assert server["verified"] is None and server["match"] is False and server["parts"] == 3
    assert server["part_size"] is None
    assert "no part size tried (5 MiB)" in server["why"] and "another size" in server["why"]
    assert task["status"] == "done" and task["attempts"] == 1


@pytest.mark.parametrize("algorithm", ["crc32c", "crc32", "sha256", "sha1"])
def test_a_composite_checksum_is_verified_with_the_part_size_found(service, files, algorithm):
    part = 8 * MIB
    size = 2 * part + 1
    data = body(size)
    task = done(service, files.url(f"/store/{size}?amz={algorithm}&type=COMPOSITE&part={part}"
                                   f"&etag={part}"))
    assert task["server_digest"] == {
        "algorithm": algorithm, "value": parts_value(algorithm, data, part),
        "header": f"x-amz-checksum-{algorithm}", "match": True, "verified": True, "why": None,
        "parts": 3, "part_size": part}


def test_a_wrong_composite_checksum_is_unverified(service, files):
    size = 2 * 8 * MIB + 1
    task = done(service, files.url(f"/store/{size}?amz=crc32c&type=COMPOSITE&part={8 * MIB}"
                                   "&wrong=1"))
    server = task["server_digest"]
    assert server["verified"] is None and server["parts"] == 3 and task["attempts"] == 1


def test_a_multipart_etag_of_one_part_is_the_md5_of_the_md5(service, files):
    task = done(service, files.url(f"/store/{SIZE}?etag={8 * MIB}"))
    expected = hashlib.md5(hashlib.md5(body(SIZE)).digest()).hexdigest()
    assert task["server_digest"]["value"] == expected
    assert task["server_digest"]["verified"] is True and task["server_digest"]["parts"] == 1


def test_no_checksum_mode_to_a_presigned_url_even_after_a_redirect(service, files):
    signed = files.url(f"/presigned/{SIZE}?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                       "&X-Amz-Signature=abc&X-Amz-SignedHeaders=host")
    for url in (signed, files.url("/redirect-to?to=" + requests.utils.quote(signed, safe=""))):
        task_id = submitted(service, url=url)
        r = service.wait(task_id)
        assert r.status_code == 200, r.text
        assert r.json()["md5"] == md5_of(SIZE)


def test_the_cli_says_which_claim_was_verified_and_how(service, files):
    import subprocess
    import sys

    from servicectl import ROOT
    part = 5 * MIB
    url = files.url(f"/store/{2 * part + 1}?etag={part}")
    out = subprocess.run([sys.executable, "run.py", "submit", url, "--wait",
                          "--server", service.base], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{md5_of(2 * part + 1)}  {url}"]
    assert ("server: verified against the server's ETag (md5 of 3 parts), with parts of "
            "5 MiB") in out.stderr
