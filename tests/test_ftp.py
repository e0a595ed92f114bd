"""ftp:// and ftps:// against a real FTP server (pyftpdlib, tests/ftpserver.py)
on 127.0.0.1: the digests, SIZE progress, EPSV and PASV, the bounce refused,
the address policy, REST resumes under SIZE+MDTM, a file changed between
attempts or during one, errors, cancel, implicit TLS, FTP_PREFER_HTTPS."""

from __future__ import annotations

import hashlib
import time
import uuid

import pytest
import requests
from fileserver import body, md5_of
from ftpserver import ABORTED, COMMANDS, TRICKS, Bounce, Busy, FtpServer, ImplicitTLS, NoEpsv
from servicectl import Service, wait_for
from smtpserver import self_signed

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ftproot")


@pytest.fixture(scope="module")
def ftp(root):
    server = FtpServer(root).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def slow_ftp(root):
    server = FtpServer(root, write_limit=256 * 1024).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return self_signed(tmp_path_factory.mktemp("ftpcerts"))


@pytest.fixture(scope="module")
def svc(mongo, logs, ftp, files, certs):
    service = Service(
        mongo, logs, WORKERS="1", RESUMABLE_MIN_SIZE="1MiB", CHECKPOINT_INTERVAL="1MiB",
        MAX_FILE_SIZE="50MiB", SSL_CERT_FILE=str(certs[0]), RESOLVE="mirror.test=127.0.0.1",
        FTP_PREFER_HTTPS=f"mirror.test:{ftp.port}=http://127.0.0.1:{files.port}").start()
    yield service
    service.stop()


def name() -> str:
    return f"f-{uuid.uuid4().hex[:10]}.bin"


def submit(svc, url: str, **form) -> str:
    r = requests.post(svc.base + "/submit", data={"url": url, **form}, timeout=10)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def done(svc, task_id: str, timeout: float = 60) -> dict:
    r = svc.wait(task_id, timeout)
    assert r.status_code == 200, (r.text, svc.task(task_id))
    return r.json()


def sent(path: str, command: str) -> list[str]:
    return [arg for _, cmd, arg in COMMANDS if cmd == command and arg.endswith(path)]


def test_ftp_file_hashes_like_http(svc, ftp):
    file = name()
    ftp.put(file, 3 * MiB + 17, seed=4)
    task_id = submit(svc, ftp.url(file), algorithms="sha256")
    result = done(svc, task_id)
    assert result["md5"] == md5_of(3 * MiB + 17, 4)
    assert result["digests"]["sha256"] == hashlib.sha256(body(3 * MiB + 17, 4)).hexdigest()
    task = svc.task(task_id)
    assert task["bytes_done"] == task["bytes_total"] == 3 * MiB + 17
    assert task["fetched_url"] is None
    # Passive mode, EPSV first, binary; the path relative to the login directory.
    commands = [cmd for handler, cmd, arg in COMMANDS if handler == "Recording"]
    assert "EPSV" in commands and "PORT" not in commands and "EPRT" not in commands
    assert sent(file, "RETR") == [file] and ("Recording", "TYPE", "I") in COMMANDS


def test_pasv_to_the_same_address_is_used(svc, root):
    server = FtpServer(root, handler=NoEpsv).start()
    try:
        file = name()
        server.put(file, 5000, seed=2)
        assert done(svc, submit(svc, server.url(file)))["md5"] == md5_of(5000, 2)
        assert any(h == "NoEpsv" and c == "PASV" for h, c, _ in COMMANDS)
    finally:
        server.stop()


def test_pasv_naming_another_address_is_refused(svc, root):
    server = FtpServer(root, handler=Bounce).start()
    try:
        file = name()
        server.put(file, 5000)
        task_id = submit(svc, server.url(file))
        r = svc.wait(task_id)
        assert r.status_code == 502
        task = svc.task(task_id)
        assert task["error_code"] == "blocked" and task["attempts"] == 1
        assert "10.1.2.3" in task["error"] and "127.0.0.1" in task["error"]
        assert "bounce" in task["error"]
        # Never connected to the named address, nor asked for the file.
        assert not [c for h, c, _ in COMMANDS if h == "Bounce" and c == "RETR"]
    finally:
        server.stop()


def test_missing_file_fails_at_once_and_busy_server_is_retried(svc, ftp, root):
    task_id = submit(svc, ftp.url("no/such/file.gz"))
    assert svc.wait(task_id).status_code == 502
    task = svc.task(task_id)
    assert task["error_code"] == "ftp_status" and task["attempts"] == 1
    assert task["error"].startswith("FTP 550") and "127.0.0.1" in task["error"]
    busy = FtpServer(root, handler=Busy).start()
    try:
        file = name()
        busy.put(file, 100)
        task_id = submit(svc, busy.url(file))
        assert svc.wait(task_id, timeout=60).status_code == 502
        task = svc.task(task_id)
        assert task["error_code"] == "ftp_status" and task["attempts"] == 3
        assert task["error"].startswith("FTP 425")
    finally:
        busy.stop()


def test_too_large_is_refused_from_size_before_the_transfer(svc, ftp, root):
    file = name()
    with open(root / file, "wb") as f:
        f.truncate(60 * MiB)  # sparse: SIZE says 60 MiB
    task_id = submit(svc, ftp.url(file))
    assert svc.wait(task_id).status_code == 502
    task = svc.task(task_id)
    assert task["error_code"] == "too_large" and task["bytes_done"] == 0
    assert not sent(file, "RETR")


def test_cut_transfer_resumes_with_rest(svc, ftp):
    file, size, cut = name(), 8 * MiB, 3 * MiB + 5
    ftp.put(file, size, seed=7)
    TRICKS[file] = ("cut", cut)
    task_id = submit(svc, ftp.url(file), algorithms="sha512")
    result = done(svc, task_id)
    assert result["md5"] == md5_of(size, 7)
    assert result["digests"]["sha512"] == hashlib.sha512(body(size, 7)).hexdigest()
    assert sent(file, "RETR") == [file, file]
    rests = [arg for h, c, arg in COMMANDS if c == "REST" and h == "Recording"]
    assert str(cut) in rests
    task = svc.task(task_id)
    assert task["resumed_from"] == cut and task["bytes_done"] == size
    assert task["bytes_fetched"] == size  # nothing fetched twice
    assert [h["outcome"] for h in task["history"]] == ["retry", "done"]


def test_file_changed_between_attempts_starts_over(svc, ftp):
    file, size, cut = name(), 6 * MiB, 2 * MiB
    ftp.put(file, size, seed=8)
    TRICKS[file] = ("cut_change", cut)  # cut, then a new version (same size)
    task_id = submit(svc, ftp.url(file))
    result = done(svc, task_id)
    assert result["md5"] == md5_of(size, 99)  # the new version, whole
    task = svc.task(task_id)
    assert task["resumed_from"] is None and "MDTM changed" in task["resume_note"]
    assert task["bytes_fetched"] == cut + size


def test_file_changed_during_the_transfer_is_fetched_again(svc, ftp):
    file, size = name(), 4 * MiB
    ftp.put(file, size, seed=9)
    TRICKS[file] = ("change_at", MiB)  # the old bytes go on; the file is new
    task_id = submit(svc, ftp.url(file))
    result = done(svc, task_id)
    assert result["md5"] == md5_of(size, 99)
    task = svc.task(task_id)
    assert [h["outcome"] for h in task["history"]] == ["retry", "done"]
    assert task["resumed_from"] is None


def test_progress_and_cancel_within_a_second(svc, slow_ftp):
    file, size = name(), 40 * MiB
    slow_ftp.put(file, size)
    task_id = submit(svc, slow_ftp.url(file))
    wait_for(lambda: (svc.task(task_id)["bytes_done"] or 0) > 300_000, 30, "progress")
    assert svc.task(task_id)["bytes_total"] == size
    cancelled = time.monotonic()
    r = requests.delete(f"{svc.base}/tasks/{task_id}", timeout=10)
    assert r.status_code == 200
    aborted = wait_for(lambda: [t for f, t in ABORTED if f == file], 10, "the abort")
    assert aborted[0] - cancelled < 2.0, aborted[0] - cancelled


def test_implicit_ftps(svc, root, certs):
    server = FtpServer(root, handler=ImplicitTLS, certfile=certs[0], keyfile=certs[1]).start()
    try:
        file = name()
        server.put(file, 2 * MiB + 3, seed=5)
        url = server.url(file, host="localhost", scheme="ftps")
        assert done(svc, submit(svc, url))["md5"] == md5_of(2 * MiB + 3, 5)
        seen = [c for h, c, _ in COMMANDS if h == "ImplicitTLS"]
        assert "PROT" in seen and "RETR" in seen and "AUTH" not in seen
        # The certificate names localhost and 127.0.0.1, not this name.
        task_id = submit(svc, server.url(file, host="mirror.test", scheme="ftps"))
        assert svc.wait(task_id).status_code == 502
        assert svc.task(task_id)["error_code"] == "tls"
    finally:
        server.stop()


def test_prefer_https_fetches_the_mirror_and_records_it(svc, ftp, files):
    url = f"ftp://mirror.test:{ftp.port}/bytes/4096"
    task_id = submit(svc, url)
    assert done(svc, task_id)["md5"] == md5_of(4096)
    task = svc.task(task_id)
    assert task["url"] == url and task["fetched_url"] == files.url("/bytes/4096")
    assert not sent("bytes/4096", "RETR")


def test_prefer_https_falls_back_to_ftp(svc, ftp):
    file = name()
    ftp.put(file, 9999, seed=3)
    task_id = submit(svc, f"ftp://mirror.test:{ftp.port}/{file}")
    assert done(svc, task_id)["md5"] == md5_of(9999, 3)
    task = svc.task(task_id)
    assert task["fetched_url"].startswith("ftp://mirror.test")
    assert "HTTP 404" in task["resume_note"] and "over FTP" in task["resume_note"]


def test_submit_rules_for_ftp_urls(svc, ftp):
    ok = requests.post(svc.base + "/submit", data={
        "url": "ftp.sra.ebi.ac.uk/vol1/fastq/SRR000/SRR000001/SRR000001_1.fastq.gz"},
        timeout=10)
    assert ok.status_code == 202
    task = svc.task(ok.json()["id"])
    assert task["url"].startswith("ftp://ftp.sra.ebi.ac.uk/vol1/")
    requests.delete(f"{svc.base}/tasks/{task['id']}", timeout=10)
    for url, error in [
        ("ftp://example.com/pub/", "url: an FTP path must name a file, not a directory"),
        ("ftp://example.com/a%0d%0aDELE%20b", "url: an FTP path must not contain encoded "
                                             "control characters (%0D, %0A, %00...)"),
        ("ftp://user:pw@example.com/a", "url must not contain a user name or password"),
        ("gopher://example.com/a", "url must start with http://, https://, ftp:// or "
                                   "ftps://"),
    ]:
        r = requests.post(svc.base + "/submit", data={"url": url}, timeout=10)
        assert (r.status_code, r.json()["error"]) == (400, error)


def test_address_policy_applies_to_ftp(make_service, ftp):
    strict = make_service(ALLOW_PRIVATE_URLS="0", RESOLVE="inside.test=127.0.0.1")
    r = requests.post(strict.base + "/submit", data={"url": ftp.url("x.bin")}, timeout=10)
    assert r.status_code == 400 and "private or reserved" in r.json()["error"]
    task_id = submit(strict, ftp.url("x.bin", host="inside.test"))
    assert strict.wait(task_id).status_code == 502
    task = strict.task(task_id)
    assert task["error_code"] == "blocked" and "127.0.0.1" in task["error"]


def test_manifest_lines_may_be_ftp(svc, ftp):
    file = name()
    ftp.put(file, 12345, seed=6)
    text = f"{md5_of(12345, 6)}  {ftp.url(file)}\n"
    r = requests.post(svc.base + "/manifests", data=text, timeout=10,
                      headers={"Content-Type": "text/plain"})
    assert r.status_code == 202, r.text
    manifest_id = r.json()["id"]
    doc = wait_for(lambda: (d := requests.get(f"{svc.base}/manifests/{manifest_id}",
                                              timeout=10).json())["status"] == "done" and d,
                   60, "the manifest")
    assert doc["totals"]["ok"] == 1 and doc["results"][0]["url"] == ftp.url(file)
