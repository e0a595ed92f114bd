"""S3's own claims, from an S3-compatible server: moto's S3 in server mode,
a process of its own on 127.0.0.1 (tests/s3server.py), with objects put
by boto3, in one piece and in multipart uploads of several part sizes and
checksum algorithms. One object is rotted at the server (a stored byte
flipped, its ETag and checksum kept). What moto does not do (a
``x-amz-checksum-type`` on single PUTs, a part count on HEAD ?partNumber
of a GET) is noted where it matters; tests/test_store_claims.py serves
those shapes from the test file server."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import time

import pytest
import requests

from fileserver import body
from servicectl import ROOT, free_port

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")
from botocore.config import Config  # noqa: E402

MIB = 1024 * 1024
BUCKET = "claims"


@pytest.fixture(scope="module")
def s3():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "tests/s3server.py", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="test", aws_secret_access_key="test",
            config=Config(s3={"addressing_style": "path"}))
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        client.endpoint = endpoint
        yield client
    finally:
        proc.terminate()
        proc.wait(10)


def put(s3, key: str, data: bytes, algorithm: str | None = None) -> str:
    extra = {"ChecksumAlgorithm": algorithm} if algorithm else {}
    s3.put_object(Bucket=BUCKET, Key=key, Body=data, ACL="public-read", **extra)
    return f"{s3.endpoint}/{BUCKET}/{key}"


def put_multipart(s3, key: str, data: bytes, part: int, algorithm: str | None = None,
                  kind: str | None = None) -> str:
    extra = {"ChecksumAlgorithm": algorithm} if algorithm else {}
    if kind:
        extra["ChecksumType"] = kind
    upload = s3.create_multipart_upload(Bucket=BUCKET, Key=key, ACL="public-read",
                                        **extra)["UploadId"]
    parts = []
    for number, start in enumerate(range(0, len(data), part), 1):
        answer = s3.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=number,
                                Body=data[start:start + part],
                                **({"ChecksumAlgorithm": algorithm} if algorithm else {}))
        parts.append({"PartNumber": number, "ETag": answer["ETag"]})
    s3.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload,
                                 MultipartUpload={"Parts": parts})
    return f"{s3.endpoint}/{BUCKET}/{key}"


def digest(algorithm: str, data: bytes) -> bytes:
    from service.model.digests import new_hash
    h = new_hash(algorithm)
    h.update(data)
    return h.digest()


def of_parts(algorithm: str, data: bytes, part: int) -> str:
    return digest(algorithm, b"".join(digest(algorithm, data[i:i + part])
                                      for i in range(0, len(data), part))).hex()


def run(svc, url: str, status: int = 200) -> dict:
    r = requests.post(svc.base + "/submit", data={"url": url}, timeout=10)
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]
    answer = svc.wait(task_id, timeout=120)
    assert answer.status_code == status, answer.text
    return svc.task(task_id)


def headers_of(url: str) -> dict:
    r = requests.get(url, headers={"x-amz-checksum-mode": "ENABLED"}, timeout=10, stream=True)
    r.close()
    return {k.lower(): v for k, v in r.headers.items()}


@pytest.mark.parametrize("algorithm", ["CRC64NVME", "CRC32C", "CRC32", "SHA1", "SHA256"])
def test_a_single_put_objects_checksum_is_verified(service, s3, algorithm):
    data = body(300_000, seed=7)
    url = put(s3, f"single-{algorithm}", data, algorithm)
    name = algorithm.lower()
    # moto sends the checksum only when asked, and no x-amz-checksum-type for
    # a single PUT (S3 says FULL_OBJECT): without a part count it is whole.
    assert headers_of(url)[f"x-amz-checksum-{name}"] == base64.b64encode(
        digest(name, data)).decode()
    task = run(service, url)
    assert task["md5"] == hashlib.md5(data).hexdigest()
    assert task["server_digest"] == {
        "algorithm": name, "value": digest(name, data).hex(),
        "header": f"x-amz-checksum-{name}", "match": True, "verified": True, "why": None,
        "parts": None, "part_size": None}


@pytest.mark.parametrize("part", [5 * MIB, 8 * MIB])
def test_a_multipart_etag_is_verified_and_its_part_size_found(service, s3, part):
    data = body(2 * part + 4321, seed=8)
    url = put_multipart(s3, f"etag-{part}", data, part)
    assert headers_of(url)["etag"].endswith('-3"')
    task = run(service, url)
    assert task["md5"] == hashlib.md5(data).hexdigest()
    server = task["server_digest"]
    assert (server["header"], server["parts"], server["part_size"], server["verified"]) == \
        ("ETag", 3, part, True)
    assert server["value"] == of_parts("md5", data, part)


@pytest.mark.parametrize("algorithm, part", [("CRC32C", 5 * MIB), ("SHA256", 8 * MIB),
                                             ("CRC32", 5 * MIB), ("SHA1", 5 * MIB)])
def test_a_composite_checksum_is_verified_and_its_part_size_found(service, s3, algorithm,
                                                                  part):
    data = body(2 * part + 99, seed=9)
    url = put_multipart(s3, f"composite-{algorithm}", data, part, algorithm, "COMPOSITE")
    name = algorithm.lower()
    seen = headers_of(url)
    assert seen["x-amz-checksum-type"] == "COMPOSITE"
    assert seen[f"x-amz-checksum-{name}"].endswith("-3")
    task = run(service, url)
    assert task["server_digest"] == {
        "algorithm": name, "value": of_parts(name, data, part),
        "header": f"x-amz-checksum-{name}", "match": True, "verified": True, "why": None,
        "parts": 3, "part_size": part}


@pytest.mark.parametrize("algorithm", ["CRC64NVME", "CRC32C", "CRC32"])
def test_a_full_object_checksum_of_a_multipart_upload_is_verified(service, s3, algorithm):
    data = body(2 * 5 * MIB + 7, seed=10)
    url = put_multipart(s3, f"full-{algorithm}", data, 5 * MIB, algorithm, "FULL_OBJECT")
    name = algorithm.lower()
    assert headers_of(url)["x-amz-checksum-type"] == "FULL_OBJECT"
    task = run(service, url)
    server = task["server_digest"]
    # Before the multipart ETag the object has too: a whole-file claim binds.
    assert (server["header"], server["verified"], server["parts"]) == \
        (f"x-amz-checksum-{name}", True, None)
    assert server["value"] == digest(name, data).hex()


def test_parts_of_a_size_no_uploader_uses_are_found_by_asking_the_server(service, s3):
    # 6 MiB parts: of the uploaders' sizes only 5 MiB is consistent, and
    # wrong; HEAD ?partNumber=1 tells the first part's length.
    data = body(2 * 6 * MIB + 1, seed=11)
    url = put_multipart(s3, "odd-parts", data, 6 * MIB, "CRC32C", "COMPOSITE")
    head = requests.head(url + "?partNumber=1", timeout=10)
    assert (head.headers["Content-Length"], head.headers["x-amz-mp-parts-count"]) == \
        (str(6 * MIB), "3")
    task = run(service, url)
    server = task["server_digest"]
    assert (server["header"], server["verified"], server["parts"], server["part_size"]) == \
        ("x-amz-checksum-crc32c", True, 3, 6 * MIB)
    url = put_multipart(s3, "odd-etag", data, 6 * MIB)
    server = run(service, url)["server_digest"]
    assert (server["header"], server["verified"], server["part_size"]) == ("ETag", True, 6 * MIB)


def test_parts_of_unequal_sizes_are_unverified_not_corrupted(service, s3):
    data = body(13 * MIB, seed=14)
    key = "unequal"
    upload = s3.create_multipart_upload(Bucket=BUCKET, Key=key, ACL="public-read")["UploadId"]
    parts = []
    for number, (start, end) in enumerate([(0, 5 * MIB), (5 * MIB, 12 * MIB),
                                           (12 * MIB, 13 * MIB)], 1):
        answer = s3.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=number,
                                Body=data[start:end])
        parts.append({"PartNumber": number, "ETag": answer["ETag"]})
    s3.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload,
                                 MultipartUpload={"Parts": parts})
    task = run(service, f"{s3.endpoint}/{BUCKET}/{key}")
    server = task["server_digest"]
    assert task["status"] == "done" and task["attempts"] == 1
    assert (server["header"], server["verified"], server["parts"], server["part_size"]) == \
        ("ETag", None, 3, None)
    assert server["why"].startswith("the server's first part is 5 MiB, and parts of that size "
                                    "do not give this md5")


def test_an_object_rotten_at_the_server_fails_as_corrupted(make_service, s3):
    data = body(400_000, seed=12)
    url = put(s3, "rotten", data, "CRC64NVME")
    r = requests.post(f"{s3.endpoint}/_test/rot",
                      params={"bucket": BUCKET, "key": "rotten", "offset": "1000"}, timeout=10)
    assert r.status_code == 200, r.text
    svc = make_service(RETRY_BASE="0.1", MAX_ATTEMPTS="2", WORKERS="1")
    task = run(svc, url, status=502)
    claimed = digest("crc64nvme", data).hex()
    assert task["error_code"] == "corrupted" and task["attempts"] == 2
    assert claimed in task["error"] and "x-amz-checksum-crc64nvme" in task["error"]
    assert task["server_digest"]["verified"] is False
    assert task["server_digest"]["value"] == claimed


def test_a_multipart_object_rotten_at_the_server_is_unverified(service, s3):
    data = body(2 * 5 * MIB + 3, seed=13)
    put_multipart(s3, "rotten-parts", data, 5 * MIB)
    requests.post(f"{s3.endpoint}/_test/rot",
                  params={"bucket": BUCKET, "key": "rotten-parts", "offset": str(6 * MIB)},
                  timeout=10).raise_for_status()
    task = run(service, f"{s3.endpoint}/{BUCKET}/rotten-parts")
    # The ETag of another part size could be right: a multipart claim never
    # fails a download, and says why it could not be verified.
    assert task["server_digest"]["verified"] is None and task["server_digest"]["parts"] == 3
    assert task["md5"] != hashlib.md5(data).hexdigest()
