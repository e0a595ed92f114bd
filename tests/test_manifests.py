"""Manifests: a checksum list verified like ``sha256sum -c``, against the
real service, the test file server and the real coreutils tools."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import time

import pytest
import requests
from pymongo import MongoClient

from fileserver import body
from servicectl import ROOT, free_port
from smtpserver import SMTPServer
from test_mail import wait_for

SIZES = (70_000, 90_001, 120_003, 5)


def sha256(size: int, seed: int = 0) -> str:
    return hashlib.sha256(body(size, seed)).hexdigest()


def post_manifest(svc, text: str | bytes, ctype: str = "text/plain", **query):
    data = text.encode() if isinstance(text, str) else text
    return requests.post(svc.base + "/manifests", data=data, params=query,
                         headers={"Content-Type": ctype}, timeout=30)


def wait_manifest(svc, manifest_id: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        doc = requests.get(f"{svc.base}/manifests/{manifest_id}", timeout=10).json()
        if doc["status"] == "done":
            return doc
        assert time.monotonic() < deadline, doc
        time.sleep(0.2)


@pytest.fixture
def mixed(files, tmp_path):
    """Two good lines, one mismatch, one unreadable: the same as URLs for
    the service and as local files for sha256sum."""
    names, urls = [], []
    lines_local, lines_remote = [], []
    for i, size in enumerate(SIZES[:3]):
        name = tmp_path / f"f{i}.bin"
        name.write_bytes(body(size))
        url = files.url(f"/bytes/{size}")
        digest = sha256(size) if i != 1 else sha256(size, seed=9)  # line 2: mismatch
        names.append(name.name)
        urls.append(url)
        lines_local.append(f"{digest}  {name.name}")
        lines_remote.append(f"{digest}  {url}")
    names.append("missing.bin")
    urls.append(files.url("/status/404"))
    lines_local.append(f"{sha256(1)}  missing.bin")
    lines_remote.append(f"{sha256(1)}  {urls[-1]}")
    (tmp_path / "SHA256SUMS").write_text("\n".join(lines_local) + "\n")
    return {"text": "\n".join(lines_remote) + "\n", "names": names, "urls": urls,
            "dir": tmp_path}


def test_text_output_is_what_sha256sum_c_prints(service, mixed):
    r = post_manifest(service, mixed["text"])
    assert r.status_code == 202, r.text
    assert r.json()["lines"] == 4
    manifest_id = r.json()["id"]
    wait_manifest(service, manifest_id)
    ours = requests.get(f"{service.base}/manifests/{manifest_id}",
                        params={"format": "text"}, timeout=10)
    assert ours.status_code == 200 and ours.headers["Content-Type"].startswith("text/plain")
    real = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=mixed["dir"],
                          capture_output=True, text=True)
    assert real.returncode == 1
    expected = real.stdout
    for name, url in zip(mixed["names"], mixed["urls"]):
        expected = expected.replace(f"{name}:", f"{url}:")
    warnings = [line.removeprefix("sha256sum: ") for line in real.stderr.splitlines()
                if "WARNING" in line]
    assert ours.text.splitlines() == expected.splitlines() + warnings
    assert "WARNING: 1 computed checksum did NOT match" in ours.text


def test_totals_and_paginated_lines(service, mixed):
    manifest_id = post_manifest(service, mixed["text"]).json()["id"]
    doc = wait_manifest(service, manifest_id)
    assert {k: doc["totals"][k] for k in ("queued", "running", "ok", "mismatch", "failed")} \
        == {"queued": 0, "running": 0, "ok": 2, "mismatch": 1, "failed": 1}
    assert doc["totals"]["bytes_done"] == sum(SIZES[:3])
    # What a running manifest's totals are read from, kept as lines ended.
    # A line's count is added after its end is written, best effort: the
    # design lets a count be lost (a worker dying, or a write failing under
    # load, in between; CI lost one in two of three full runs), and the final
    # totals are counted from the tasks. So: never more than the truth,
    # and at most one line short.
    manifests = MongoClient(service.env["MONGODB_URI"]).get_default_database()["manifests"]
    wanted = {"ok": 2, "mismatch": 1, "failed": 1}
    time.sleep(0.5)
    counts = manifests.find_one({"_id": manifest_id})["counts"]
    assert all(counts.get(k, 0) <= n for k, n in wanted.items()), counts
    assert sum(counts.get(k, 0) for k in wanted) >= 3, counts
    first = requests.get(f"{service.base}/manifests/{manifest_id}", params={"limit": 3},
                         timeout=10).json()
    assert [line["line"] for line in first["results"]] == [1, 2, 3]
    assert [line["outcome"] for line in first["results"]] == ["ok", "mismatch", "ok"]
    assert first["results"][1]["digests"]["sha256"] == sha256(SIZES[1])
    rest = requests.get(service.base + first["next"], timeout=10).json()
    assert [line["line"] for line in rest["results"]] == [4] and rest["next"] is None
    assert rest["results"][0]["outcome"] == "failed"
    assert "HTTP 404" in rest["results"][0]["error"]
    task = service.task(rest["results"][0]["task"])
    assert task["manifest"] == manifest_id and task["line"] == 4


def test_every_line_form_and_algorithm(service, files):
    url = files.url(f"/bytes/{SIZES[0]}")
    data = body(SIZES[0])
    hexes = {a: hashlib.new(a, data).hexdigest() for a in ("md5", "sha1", "sha512")}
    text = "\n".join([
        "# a comment, and a blank line below",
        "",
        f"{hexes['md5']}  {url}",
        f"{hexes['sha1']} *{url}",
        f"SHA256 ({url}) = {sha256(SIZES[0])}",
        f"{hexes['sha512']}  {url}",
        f"BLAKE2b ({url}) = {hashlib.blake2b(data).hexdigest()}",
    ])
    r = post_manifest(service, text)
    assert r.status_code == 202, r.text
    doc = wait_manifest(service, r.json()["id"])
    assert doc["totals"]["ok"] == 5, doc
    lines = requests.get(f"{service.base}/manifests/{r.json()['id']}", timeout=10).json()
    assert [(x["line"], x["expected"].split(":")[0]) for x in lines["results"]] == [
        (3, "md5"), (4, "sha1"), (5, "sha256"), (6, "sha512"), (7, "blake2b")]


def test_blake2b_needs_the_algorithm_parameter(service, files):
    url = files.url(f"/bytes/{SIZES[3]}")
    line = f"{hashlib.blake2b(body(SIZES[3])).hexdigest()}  {url}\n"
    as_sha512 = wait_manifest(service, post_manifest(service, line).json()["id"])
    assert as_sha512["totals"]["mismatch"] == 1
    r = post_manifest(service, line, algorithm="blake2b")
    assert wait_manifest(service, r.json()["id"])["totals"]["ok"] == 1


def test_json_manifest_with_each_spelling(service, files):
    url = files.url(f"/bytes/{SIZES[2]}")
    raw = bytes.fromhex(sha256(SIZES[2]))
    entries = [{"url": url, "expected": f"sha256:{sha256(SIZES[2])}"},
               {"url": url, "expected": f"sha-256={sha256(SIZES[2])}"},
               {"url": url, "expected": "sha256-" + base64.b64encode(raw).decode()},
               {"url": url, "expected": sha256(SIZES[2])}]
    r = post_manifest(service, json.dumps(entries), "application/json")
    assert r.status_code == 202, r.text
    assert wait_manifest(service, r.json()["id"])["totals"]["ok"] == 4


def test_a_multipart_upload_is_read_as_the_manifest(service, files):
    url = files.url(f"/bytes/{SIZES[3]}")
    r = requests.post(service.base + "/manifests", timeout=10,
                      files={"manifest": ("SHA256SUMS", f"{sha256(SIZES[3])}  {url}\n")})
    assert r.status_code == 202, r.text
    assert wait_manifest(service, r.json()["id"])["totals"]["ok"] == 1


def test_bad_lines_are_all_listed_and_nothing_is_stored(make_service):
    svc = make_service(ALLOW_PRIVATE_URLS="0")
    good = f"{'a' * 64}  http://example.com/ok"
    text = "\n".join([good, "not a line", good, f"{'b' * 63}  http://example.com/x",
                      f"{'c' * 64}  gopher://example.com/y", "", f"{'d' * 64}  http://10.0.0.1/z"])
    r = post_manifest(svc, text)
    assert r.status_code == 400
    doc = r.json()
    assert doc["error"] == "4 of 6 lines are not valid; nothing was accepted"
    assert [bad["line"] for bad in doc["lines"]] == [2, 4, 5, 7]
    assert "63 hex digits matches no algorithm" in doc["lines"][1]["error"]
    assert "http://" in doc["lines"][2]["error"]
    tasks = MongoClient(svc.env["MONGODB_URI"]).get_default_database()["tasks"]
    assert tasks.count_documents({}) == 0


@pytest.mark.parametrize("text, says", [
    ("", "no lines"),
    ("# only a comment\n", "no lines"),
    (b"\xff\xfe", "not valid UTF-8"),
    ("[1, 2", "not valid JSON"),
])
def test_empty_or_unreadable_manifests_are_400(service, text, says):
    ctype = "application/json" if str(text).startswith("[") else "text/plain"
    r = post_manifest(service, text, ctype)
    assert r.status_code == 400 and says in r.json()["error"]


def test_more_than_10000_lines_is_a_400(service):
    text = "".join(f"{'a' * 64}  http://example.com/{i}\n" for i in range(10_001))
    r = post_manifest(service, text)
    assert r.status_code == 400 and "limit is 10000" in r.json()["error"]


def test_unknown_manifest_and_bad_paging(service, mixed):
    assert requests.get(f"{service.base}/manifests/nope", timeout=10).status_code == 404
    manifest_id = post_manifest(service, mixed["text"]).json()["id"]
    for params in ({"limit": "0"}, {"limit": "1001"}, {"after": "x"}, {"format": "xml"}):
        r = requests.get(f"{service.base}/manifests/{manifest_id}", params=params, timeout=10)
        assert r.status_code == 400, params


def test_one_mail_with_the_summary_when_the_manifest_ends(make_service, mixed):
    smtp = SMTPServer(free_port()).start()
    try:
        svc = make_service(SMTP_HOST="127.0.0.1", SMTP_PORT=str(smtp.controller.port),
                           SMTP_TLS="none")
        r = post_manifest(svc, mixed["text"], email="lists@example.com")
        manifest_id = r.json()["id"]
        wait_manifest(svc, manifest_id)
        wait_for(lambda: smtp.messages, what="manifest mail")
        time.sleep(1.0)
        assert len(smtp.messages) == 1  # one for the manifest, none per line
        msg = smtp.messages[0]
        assert msg["Subject"] == "Manifest: 2 of 4 files FAILED"
        assert msg["X-md5-light-Manifest"] == manifest_id
        text = msg.get_content()
        assert f"line 2: {mixed['urls'][1]}: MISMATCH" in text
        assert f"line 4: {mixed['urls'][3]}: FAILED" in text
        wait_for(lambda: requests.get(f"{svc.base}/manifests/{manifest_id}", timeout=10)
                 .json()["notification"]["status"] == "sent", what="sent status")
    finally:
        smtp.stop()


def _check_cli(svc, *args, stdin: str | None = None):
    return subprocess.run([sys.executable, "run.py", "check", *args, "--server", svc.base],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, input=stdin)


def test_cli_check_behaves_like_sha256sum_c(service, mixed):
    out = _check_cli(service, "-", stdin=mixed["text"])
    real = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=mixed["dir"],
                          capture_output=True, text=True)
    assert out.returncode == real.returncode == 1
    expected = real.stdout
    for name, url in zip(mixed["names"], mixed["urls"]):
        expected = expected.replace(f"{name}:", f"{url}:")
    assert out.stdout == expected
    assert "WARNING: 1 computed checksum did NOT match" in out.stderr
    assert " 4/4 files" in out.stderr  # the progress line, not a TTY: one per poll


def test_cli_check_all_ok_exits_0(service, files, tmp_path):
    url = files.url(f"/bytes/{SIZES[0]}")
    path = tmp_path / "SUMS"
    path.write_text(f"{sha256(SIZES[0])}  {url}\n")
    out = _check_cli(service, str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{url}: OK\n"


def test_cli_check_bad_manifest_exits_2(service, tmp_path):
    path = tmp_path / "SUMS"
    path.write_text("nonsense\n")
    out = _check_cli(service, str(path))
    assert out.returncode == 2 and "line 1: not a checksum line" in out.stderr


def test_a_multipart_body_without_boundary_is_a_400(service):
    r = requests.post(service.base + "/manifests", data=b"x",
                      headers={"Content-Type": "multipart/form-data"}, timeout=10)
    assert r.status_code == 400 and "form is not valid" in r.json()["error"]
