"""Several digests in one download, verification against an expected
checksum, and the digests servers announce in their headers: against the
real service and the test file server."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import time

import pytest
import requests

from fileserver import ClaimsHandler, body, md5_of
from servicectl import ROOT

SIZE = 300_000
ALL = ["md5", "sha1", "sha256", "sha512", "blake2b"]


def digest(algorithm: str, size: int = SIZE, seed: int = 0) -> str:
    return hashlib.new(algorithm, body(size, seed)).hexdigest()


def post(svc, **data) -> requests.Response:
    return requests.post(svc.base + "/submit", data=data, timeout=10)


def submitted(svc, **data) -> str:
    r = post(svc, **data)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_md5_alone_keeps_the_check_contract_byte_for_byte(service, files):
    url = files.url(f"/bytes/{SIZE}")
    r = service.wait(submitted(service, url=url, algorithms="md5"))
    assert r.status_code == 200
    assert r.text == f'{{"md5":"{md5_of(SIZE)}","status":"done","url":"{url}"}}'


def test_every_algorithm_from_one_download(service, files):
    url = files.url(f"/count/all-algos/{SIZE}")
    task_id = submitted(service, url=url, algorithms="sha512,SHA-256, blake2b,sha1")
    r = service.wait(task_id)
    assert r.status_code == 200
    check = r.json()
    assert check["md5"] == digest("md5")
    assert check["digests"] == {a: digest(a) for a in ALL if a != "md5"}
    task = service.task(task_id)
    assert task["algorithms"] == ALL
    assert task["digests"] == {a: digest(a) for a in ALL}
    from fileserver import CountingHandler
    assert CountingHandler.hits["all-algos"] == 1


def crc(algorithm: str, size: int = SIZE, seed: int = 0) -> str:
    from service.model.digests import new_hash
    h = new_hash(algorithm)
    h.update(body(size, seed))
    return h.hexdigest()


def test_the_object_stores_crcs_are_algorithms_too(service, files):
    url = files.url(f"/bytes/{SIZE}")
    task_id = submitted(service, url=url, algorithms="crc64nvme,CRC32C,crc-32",
                        expected=f"crc32c:{crc('crc32c')}")
    r = service.wait(task_id)
    assert r.status_code == 200, r.text
    assert r.json()["digests"] == {a: crc(a) for a in ("crc32", "crc32c", "crc64nvme")}
    assert r.json()["md5"] == digest("md5") and r.json()["verified"] is True
    # The stores' base64 is of the same big-endian bytes.
    b64 = base64.b64encode(bytes.fromhex(crc("crc64nvme"))).decode()
    task_id = submitted(service, url=url, expected=f"crc64nvme=:{b64}:")
    assert service.wait(task_id).json()["verified"] is True


def test_algorithms_as_a_json_list_and_as_repeated_form_fields(service, files):
    url = files.url(f"/bytes/{SIZE}")
    r = requests.post(service.base + "/submit", timeout=10,
                      json={"url": url, "algorithms": ["sha256", "sha1"]})
    assert r.status_code == 202, r.text
    as_json = service.wait(r.json()["id"]).json()
    r = requests.post(service.base + "/submit", timeout=10,
                      data=[("url", url), ("algorithms", "sha256"), ("algorithms", "sha1")])
    assert r.status_code == 202, r.text
    as_form = service.wait(r.json()["id"]).json()
    assert as_json == as_form
    assert as_json["digests"] == {"sha1": digest("sha1"), "sha256": digest("sha256")}


@pytest.mark.parametrize("spelling", [
    lambda: f"sha256:{digest('sha256')}",
    lambda: f"SHA256:{digest('sha256').upper()}",
    lambda: f"sha-256={digest('sha256')}",
    lambda: "sha256-" + base64.b64encode(bytes.fromhex(digest("sha256"))).decode(),
    lambda: "sha512-" + base64.b64encode(bytes.fromhex(digest("sha512"))).decode(),
    lambda: "sha-256=:" + base64.b64encode(bytes.fromhex(digest("sha256"))).decode() + ":",
    lambda: f"md5:{digest('md5')}",
    lambda: f"sha1:{digest('sha1')}",
    lambda: f"blake2b:{digest('blake2b')}",
], ids=["prefix", "upper", "aria2", "sri256", "sri512", "rfc9530", "md5", "sha1", "blake2b"])
def test_each_expected_spelling_verifies(service, files, spelling):
    expected = spelling()
    task_id = submitted(service, url=files.url(f"/bytes/{SIZE}"), expected=expected)
    r = service.wait(task_id)
    assert r.status_code == 200, r.text
    assert r.json()["verified"] is True
    task = service.task(task_id)
    algorithm = task["expected"].split(":")[0]
    assert algorithm in task["algorithms"] and task["digests"][algorithm] == digest(algorithm)
    assert task["expected"] == f"{algorithm}:{digest(algorithm)}"


def test_a_different_file_fails_as_a_mismatch_without_retrying(service, files):
    wrong = digest("sha256", seed=1)
    task_id = submitted(service, url=files.url(f"/bytes/{SIZE}"), expected=f"sha256:{wrong}")
    r = service.wait(task_id)
    assert r.status_code == 502
    check = r.json()
    assert check["status"] == "failed" and check["verified"] is False
    assert wrong in check["error"] and digest("sha256") in check["error"]
    task = service.task(task_id)
    assert task["error_code"] == "mismatch" and task["attempts"] == 1
    assert task["digests"]["sha256"] == digest("sha256") and task["md5"] is None


@pytest.mark.parametrize("expected, says", [
    ("sha256:xyz", "not hexadecimal"),
    ("sha256:abcd", "has 64 hex digits, not 4"),
    ("md5:" + "a" * 64, "has 32 hex digits, not 64"),
    ("crc16:deadbeef", "must look like sha256:<hex>"),
    ("crc32c:deadbe", "has 8 hex digits, not 6"),
    ("sha384-" + "A" * 64, "sha384 is not supported"),
    ("sha256-%%%notbase64", "not valid base64"),
    ("sha256-" + base64.b64encode(b"short").decode(), "decodes to 5 bytes"),
    ("deadbeef", "must look like sha256:<hex>"),
])
def test_a_malformed_expected_is_a_400_that_says_what_is_wrong(service, expected, says):
    r = post(service, url="http://example.com/f", expected=expected)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("expected: ") and says in r.json()["error"]


def test_an_unknown_algorithm_is_a_400_naming_it(service):
    r = post(service, url="http://example.com/f", algorithms="sha256,whirlpool,crc")
    assert r.status_code == 400
    error = r.json()["error"]
    assert "'whirlpool'" in error and "'crc'" in error and "sha256" in error


def test_a_list_of_numbers_is_a_400(service):
    r = requests.post(service.base + "/submit", json={"url": "http://e.com/", "algorithms": [1]},
                      timeout=10)
    assert r.status_code == 400 and "list of strings" in r.json()["error"]


def test_idempotency_key_covers_algorithms_and_expected(service, files):
    url = files.url(f"/bytes/{SIZE}")
    key = {"Idempotency-Key": f"digests-{time.time_ns()}"}
    first = requests.post(service.base + "/submit", data={"url": url, "algorithms": "sha256"},
                          headers=key, timeout=10)
    again = requests.post(service.base + "/submit", data={"url": url, "algorithms": "sha256"},
                          headers=key, timeout=10)
    other = requests.post(service.base + "/submit", data={"url": url, "algorithms": "sha1"},
                          headers=key, timeout=10)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    assert other.status_code == 422 and "algorithms" in other.json()["error"]


# -- what the server claims ---------------------------------------------------

@pytest.mark.parametrize("header, alg, shown, computed", [
    ("repr", "sha-256", "Repr-Digest", "sha256"),
    ("repr", "sha-512", "Repr-Digest", "sha512"),
    ("content", "sha-256", "Content-Digest", "sha256"),
    ("digest", "sha-256", "Digest", "sha256"),
    ("digest", "md5", "Digest", "md5"),
    ("content-md5", "md5", "Content-MD5", "md5"),
    ("etag", "md5", "ETag", "md5"),
])
def test_a_server_digest_that_matches_is_recorded(service, files, header, alg, shown, computed):
    url = files.url(f"/claims/{SIZE}?header={header}&alg={alg}")
    task_id = submitted(service, url=url)
    r = service.wait(task_id)
    assert r.status_code == 200, r.text
    # The claimed algorithm is hashed for the check, not shown unasked.
    assert "digests" not in r.json()
    task = service.task(task_id)
    assert task["server_digest"] == {"algorithm": computed, "value": digest(computed),
                                     "header": shown, "match": True, "verified": True,
                                     "why": None, "parts": None, "part_size": None}
    assert "sha-256=10" in ClaimsHandler.seen_want[-1]


def test_a_corrupted_transfer_is_retried_then_done(make_service, files):
    svc = make_service(RETRY_BASE="0.1", WORKERS="1")
    key = f"c{time.time_ns()}"
    task_id = submitted(svc, url=files.url(f"/claims/{SIZE}?header=repr&corrupt={key}:1"))
    r = svc.wait(task_id)
    assert r.status_code == 200 and r.json()["md5"] == digest("md5")
    task = svc.task(task_id)
    assert task["attempts"] == 2 and task["server_digest"]["match"] is True


def test_a_server_digest_that_never_matches_fails_with_both_values(make_service, files):
    svc = make_service(RETRY_BASE="0.1", MAX_ATTEMPTS="2", WORKERS="1")
    task_id = submitted(svc, url=files.url(f"/claims/{SIZE}?header=content-md5&wrong=1"))
    r = svc.wait(task_id)
    assert r.status_code == 502
    task = svc.task(task_id)
    claimed = hashlib.md5(body(SIZE) + b"!").hexdigest()
    assert task["error_code"] == "corrupted" and task["attempts"] == 2
    assert claimed in task["error"] and digest("md5") in task["error"]
    assert "Content-MD5" in task["error"]
    assert task["server_digest"] == {"algorithm": "md5", "value": claimed,
                                     "header": "Content-MD5", "match": False,
                                     "verified": False, "why": None, "parts": None,
                                     "part_size": None}


def test_an_etag_that_is_not_the_md5_is_only_noted(service, files):
    # S3 objects under SSE-KMS carry such ETags: not a sign of corruption.
    task_id = submitted(service, url=files.url(f"/claims/{SIZE}?header=etag&wrong=1"))
    r = service.wait(task_id)
    assert r.status_code == 200 and r.json()["md5"] == digest("md5")
    server = service.task(task_id)["server_digest"]
    assert server["match"] is False and server["verified"] is None
    assert "not taken as corruption" in server["why"]


def test_digests_in_the_database_for_the_mongo_shell(service, files):
    from pymongo import MongoClient
    task_id = submitted(service, url=files.url(f"/bytes/{SIZE}"), algorithms="sha256",
                        expected=f"sha256:{digest('sha256')}")
    service.wait(task_id)
    doc = MongoClient(service.env["MONGODB_URI"]).get_default_database().tasks.find_one(
        {"_id": task_id})
    assert doc["digests"] == {"md5": digest("md5"), "sha256": digest("sha256")}
    assert doc["expected"] == {"algorithm": "sha256", "hex": digest("sha256")}
    assert doc["verified"] is True and doc["algorithms"] == ["md5", "sha256"]


# -- the command-line client ----------------------------------------------------

def _cli(svc, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", "submit", *args, "--server", svc.base],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_cli_prints_tagged_lines_and_ok(service, files):
    url = files.url(f"/bytes/{SIZE}")
    done = _cli(service, url, "--sha256", "--expect", f"sha256:{digest('sha256')}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"MD5 ({url}) = {digest('md5')}",
                                        f"SHA256 ({url}) = {digest('sha256')}",
                                        f"{url}: OK"]


def test_cli_mismatch_exits_1_with_failed(service, files):
    url = files.url(f"/bytes/{SIZE}")
    out = _cli(service, url, "--expect", f"md5:{digest('md5', seed=2)}")
    assert out.returncode == 1
    assert out.stdout.splitlines()[-1] == f"{url}: FAILED"
    assert "checksum mismatch" in out.stderr


def test_cli_bad_expect_exits_2(service):
    out = _cli(service, "http://example.com/x", "--expect", "sha256:nothex")
    assert out.returncode == 2 and "not hexadecimal" in out.stderr
