"""#28 part 3: mirrors. Pieces of one file spread over several servers
(tests/fileserver.py's PiecesHandler, one key per "server"), each probed
first; only copies proven to be the same file are hashed with the
primary's bytes. Every test checks the md5 against the served bytes and
the servers' request logs against what the task says it did."""

from __future__ import annotations

import hashlib
import socket
import urllib.parse
import uuid

import pytest
import requests

from fileserver import PiecesHandler, body, md5_of

MiB = 1024 * 1024
SIZE = 24 * MiB
SEGMENTED = {"WORKERS": "1", "SEGMENT_MIN_SIZE": "4MiB", "SEGMENT_WINDOW": "4MiB",
             "CONNECTIONS_PER_DOWNLOAD": "4", "CHECKPOINT_INTERVAL": "1MiB"}
ETAG = f'"p0-{SIZE}"'
METALINK_TYPE = "application/metalink4+xml"


@pytest.fixture(scope="module")
def svc(mongo, logs):
    from servicectl import Service
    service = Service(mongo, logs, **SEGMENTED).start()
    yield service
    service.stop()


def server(files, seed: int = 5, size: int = SIZE, **params) -> tuple[str, str]:
    """A URL of its own key (a "server" whose requests are logged apart)."""
    key = uuid.uuid4().hex[:12]
    query = urllib.parse.urlencode({"seed": seed, "rate": 4000000, **params}, doseq=True)
    return key, files.url(f"/pieces/{key}/{size}?{query}")


def run(svc, expect: int = 200, **submit) -> tuple[str, dict]:
    r = requests.post(svc.base + "/submit", timeout=10, **submit)
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]
    done = svc.wait(task_id, timeout=120)
    assert done.status_code == expect, (done.text, svc.task(task_id))
    return task_id, svc.task(task_id)


def log(key: str) -> list[dict]:
    return PiecesHandler.requests.get(key, [])


def pieces(key: str) -> list[dict]:
    """The piece requests a server answered with bytes (not the probe)."""
    return [r for r in log(key) if r["range"] not in (None, "bytes=0-0")
            and r["status"] == 206 and r["sent"] > 0]


def test_pieces_come_from_the_primary_and_two_mirrors(svc, files):
    primary_key, primary = server(files)
    a_key, a = server(files)
    b_key, b = server(files)
    task_id, task = run(svc, json={"url": primary, "mirrors": [a, b]})
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 5)
    for key in (a_key, b_key):
        # Probed first (one byte, no If-Range), then pieces under the ETag.
        assert log(key)[0]["range"] == "bytes=0-0" and log(key)[0]["if_range"] is None
        assert pieces(key), log(key)
        assert all(r["if_range"] == ETAG for r in log(key)[1:])
    assert pieces(primary_key)
    served = sum(r["sent"] for k in (primary_key, a_key, b_key) for r in log(k))
    assert SIZE <= served < 1.1 * SIZE
    assert task["mirrors"] == [a, b]
    assert [(s["url"], s["from"], s["dropped"]) for s in task["sources"]] == [
        (a, "submit", None), (b, "submit", None)]
    assert [s["bytes"] for s in task["sources"]] == [
        sum(r["sent"] for r in pieces(k)) for k in (a_key, b_key)]


def test_a_mirror_with_another_etag_and_nothing_to_check_is_dropped(svc, files):
    key, mirror = server(files, seed=6, etag="elsewhere")  # another file, same length
    _, primary = server(files)
    task_id, task = run(svc, data={"url": primary, "mirrors": mirror})
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 5)
    assert [r["range"] for r in log(key)] == ["bytes=0-0"]  # the probe, nothing more
    [source] = task["sources"]
    assert "nothing to check the bytes against" in source["dropped"]
    assert source["bytes"] == 0


def test_a_mirror_with_another_etag_is_used_when_expected_proves_the_bytes(svc, files):
    key, mirror = server(files, etag="elsewhere")
    _, primary = server(files)
    right = md5_of(SIZE, 5)
    task_id, task = run(svc, data={"url": primary, "mirrors": mirror,
                                   "expected": f"md5:{right}"})
    assert svc.check(task_id).json() == {"md5": right, "status": "done", "url": primary,
                                         "verified": True}
    assert pieces(key) and all(r["if_range"] == '"elsewhere"' for r in log(key)[1:])
    [source] = task["sources"]
    assert source["dropped"] is None and source["checked_by"] == "the expected md5"


def test_a_lying_mirror_makes_the_primary_fetch_it_alone_not_a_mismatch(svc, files):
    # Same ETag, other bytes: the end md5 differs from expected, and the
    # mirror, not the file, is suspect.
    key, mirror = server(files, seed=6)
    primary_key, primary = server(files)
    right = md5_of(SIZE, 5)
    task_id, task = run(svc, data={"url": primary, "mirrors": mirror,
                                   "expected": f"md5:{right}"})
    result = svc.check(task_id).json()
    assert result["md5"] == right and result["verified"] is True
    assert pieces(key)
    assert "fetched again" in task["sources_note"] and "not the expected" in task["sources_note"]
    assert "did not match" in task["sources"][0]["dropped"]
    # One attempt; the primary's whole file was asked for twice.
    assert [h["outcome"] for h in task["history"]] == ["done"]
    assert [r["range"] for r in log(primary_key)].count(None) == 2


def test_a_mirror_that_fails_midway_hands_its_pieces_back(svc, files):
    key, mirror = server(files, fail=2)  # the probe and one piece, then 500s
    _, primary = server(files)
    task_id, task = run(svc, data={"url": primary, "mirrors": mirror})
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 5)
    assert len(pieces(key)) == 1 and any(r["status"] == 500 for r in log(key))
    [source] = task["sources"]
    assert "status 500" in source["dropped"] and source["bytes"] == pieces(key)[0]["sent"]


def test_a_mirror_that_drops_connections_midway_hands_its_pieces_back(svc, files):
    key, mirror = server(files, cut=2)  # the probe and one piece, then closed unanswered
    _, primary = server(files)
    task_id, task = run(svc, data={"url": primary, "mirrors": mirror})
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 5)
    assert len(pieces(key)) == 1 and any(r["status"] is None for r in log(key))
    [source] = task["sources"]
    assert source["dropped"] and "closed" in source["dropped"], source
    assert source["bytes"] == pieces(key)[0]["sent"]


def test_cancel_stops_the_mirrors_connections_too(svc, files):
    import time
    key, mirror = server(files, rate=500000)
    primary_key, primary = server(files, rate=500000)
    r = requests.post(svc.base + "/submit", data={"url": primary, "mirrors": mirror},
                      timeout=10)
    task_id = r.json()["id"]
    deadline = time.monotonic() + 30
    while PiecesHandler.running.get(key, 0) < 2 or PiecesHandler.running.get(primary_key, 0) < 2:
        assert time.monotonic() < deadline, (PiecesHandler.running.get(key),
                                             PiecesHandler.running.get(primary_key))
        time.sleep(0.05)
    assert requests.delete(f"{svc.base}/tasks/{task_id}", timeout=10).status_code == 200
    time.sleep(1.5)
    assert PiecesHandler.running.get(key, 0) == 0 == PiecesHandler.running.get(primary_key, 0)


def test_cancel_while_a_mirror_is_probed_stops_the_probe_and_starts_no_piece(svc, files):
    # A mirror that accepts the connection and never answers: the probe
    # would wait its 10 s; a cancel closes it within about a second.
    import time
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(30)
        primary_key, primary = server(files)
        r = requests.post(svc.base + "/submit", timeout=10, data={
            "url": primary, "mirrors": f"http://127.0.0.1:{silent.getsockname()[1]}/f"})
        task_id = r.json()["id"]
        probe, _ = silent.accept()
        with probe:
            probe.settimeout(5)
            assert probe.recv(65536).startswith(b"GET /f ")
            assert requests.delete(f"{svc.base}/tasks/{task_id}", timeout=10).status_code == 200
            cancelled = time.monotonic()
            assert probe.recv(65536) == b""  # closed by the worker
            assert time.monotonic() - cancelled < 2.5
    time.sleep(0.5)
    assert [x["range"] for x in log(primary_key)] == [None]  # no piece was asked for


def test_a_mirror_that_refuses_connections_is_dropped_at_its_probe(svc, files):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, primary = server(files)
    task_id, task = run(svc, data={"url": primary,
                                   "mirrors": f"http://127.0.0.1:{port}/gone.bin"})
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 5)
    [source] = task["sources"]
    assert source["dropped"].startswith("the probe failed")


def test_link_rel_duplicate_adds_a_mirror(svc, files):
    key, mirror = server(files)
    _, primary = server(files, link=mirror)
    task_id, task = run(svc, data={"url": primary})
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 5)
    assert pieces(key)
    assert [(s["url"], s["from"], s["dropped"]) for s in task["sources"]] == [
        (mirror, "link", None)]


def metalink(urls: list[str], size: int | None = SIZE, seed: int = 5, piece: int = MiB,
             files_: int = 1, doctype: str = "") -> str:
    data = body(SIZE, seed)
    hashes = "".join(f"<hash>{hashlib.sha1(data[i:i + piece]).hexdigest()}</hash>"
                     for i in range(0, SIZE, piece))
    entry = (f'<file name="f.bin">{f"<size>{size}</size>" if size is not None else ""}'
             f'<hash type="sha-256">{hashlib.sha256(data).hexdigest()}</hash>'
             f'<pieces length="{piece}" type="sha-1">{hashes}</pieces>'
             + "".join(f'<url priority="{i + 1}">{u.replace("&", "&amp;")}</url>'
                       for i, u in enumerate(urls))
             + "</file>")
    return (f'<?xml version="1.0" encoding="UTF-8"?>{doctype}'
            f'<metalink xmlns="urn:ietf:params:xml:ns:metalink">{entry * files_}</metalink>')


def test_a_metalink_gives_expected_and_mirrors(svc, files):
    # The mirror has another ETag: the piece hashes prove its bytes.
    key, mirror = server(files, etag="elsewhere")
    _, primary = server(files)
    document = metalink([mirror, primary][::-1])
    task_id, task = run(svc, data=document.encode(),
                        headers={"Content-Type": METALINK_TYPE})
    sha256 = hashlib.sha256(body(SIZE, 5)).hexdigest()
    assert svc.check(task_id).json() == {
        "md5": md5_of(SIZE, 5), "status": "done", "url": primary,
        "digests": {"sha256": sha256}, "verified": True}
    assert task["expected"] == f"sha256:{sha256}" and task["mirrors"] == [mirror]
    assert task["size"] == SIZE
    assert task["pieces"] == {"algorithm": "sha1", "length": MiB, "count": 24}
    assert pieces(key)
    # Pieces a mirror sends are whole Metalink pieces, so each is checked.
    assert all(int(r["range"][6:].split("-")[0]) % MiB == 0 for r in pieces(key))
    [source] = task["sources"]
    assert source["dropped"] is None and source["checked_by"] == "the Metalink's piece hashes"


def test_piece_hashes_pin_a_corrupt_mirror_to_its_piece(svc, files):
    # Same ETag, other bytes: the first piece it sends fails its hash; the
    # mirror is dropped and the piece fetched from the primary, with no
    # start over (nothing of it was hashed).
    key, mirror = server(files, seed=6)
    primary_key, primary = server(files)
    task_id, task = run(svc, data={"metalink": metalink([primary, mirror])})
    result = svc.check(task_id).json()
    assert result["md5"] == md5_of(SIZE, 5) and result["verified"] is True
    [source] = task["sources"]
    assert "the Metalink says" in source["dropped"] and "corrupt" in source["dropped"]
    assert task["sources_note"] is None
    assert [r["range"] for r in log(primary_key)].count(None) == 1
    # Nothing the mirror sent was kept: the primary sent the file once.
    assert sum(r["sent"] for r in log(primary_key)) < 1.1 * SIZE
    assert sum(r["sent"] for r in log(primary_key)) >= SIZE - sum(
        r["sent"] for r in pieces(key)) - MiB


def test_a_file_of_another_size_than_the_metalinks_fails(svc, files):
    url = files.url("/bytes/1000?seed=2")
    document = (f'<metalink xmlns="urn:ietf:params:xml:ns:metalink"><file name="f">'
                f"<size>1001</size><url>{url}</url></file></metalink>")
    task_id, task = run(svc, expect=502, data={"metalink": document})
    assert task["error_code"] == "mismatch" and "says 1001" in task["error"]


def test_a_small_file_leaves_its_mirrors_unused_and_says_why(svc, files):
    key, mirror = server(files, size=MiB)
    _, primary = server(files, size=MiB)
    task_id, task = run(svc, data={"url": primary, "mirrors": mirror})
    assert svc.check(task_id).json()["md5"] == md5_of(MiB, 5)
    assert log(key) == [] and task["sources"] is None
    assert "not used" in task["sources_note"] and "SEGMENT_MIN_SIZE" in task["sources_note"]


@pytest.mark.parametrize("form, why", [
    ({"url": "http://example.com/a", "mirrors": [f"http://m{i}.example/a" for i in range(9)]},
     "at most 8 mirrors"),
    ({"url": "http://example.com/a", "mirrors": "ftp://m.example/a"},
     "mirror 1 must start with http:// or https://"),
    ({"url": "http://example.com/a", "mirrors": ["http://m.example/a", "http://"]},
     "mirror 2 has no host"),
    ({"url": "http://example.com/a", "mirrors": "http://u:p@m.example/a"},
     "mirror 1 must not contain a user name"),
    ({"metalink": metalink(["http://a.example/f"], files_=2)}, "describes 2 files"),
    ({"metalink": metalink(["http://a.example/f"],
                           doctype='<!DOCTYPE m [<!ENTITY a "aaaa">]>')}, "DOCTYPE"),
    ({"metalink": metalink(["http://a.example/f"], size=SIZE + 1)}, "does not fit"),
    ({"metalink": "<metalink>not namespaced</metalink>"}, "not a Metalink 4 document"),
    ({"metalink": "<metalink"}, "not well-formed"),
    ({"metalink": metalink(["http://a.example/f"]), "url": "http://a.example/f"},
     "give url or metalink, not both"),
])
def test_bad_mirrors_and_metalinks_are_400s(svc, form, why):
    r = requests.post(svc.base + "/submit", json=form, timeout=10)
    assert r.status_code == 400, r.text
    assert why in r.json()["error"], r.json()


def test_a_resumed_mix_that_misses_expected_starts_over_from_the_primary(make_service, files):
    # The first attempt hashes a lying mirror's pieces (same ETag, other
    # bytes) and is checkpointed; its worker is killed. The next attempt
    # cannot reach the mirror, resumes from that checkpoint over the
    # primary alone, and its end misses expected: the checkpoint, not the
    # file, is suspect, so the file is fetched again from the primary.
    import os
    import signal

    from test_resume import _wait_for, _worker_pid
    svc = make_service(**SEGMENTED, LEASE_SECONDS="1.5")
    size = 48 * MiB
    key, mirror = server(files, seed=8, size=size, rate=3000000)
    primary_key, primary = server(files, seed=7, size=size, rate=3000000)
    right = md5_of(size, 7)
    r = requests.post(svc.base + "/submit", timeout=10, data={
        "url": primary, "mirrors": mirror, "expected": f"md5:{right}"})
    task_id = r.json()["id"]
    _wait_for(svc, task_id, lambda t: (t["checkpoint_offset"] or 0) > 0.3 * size
              and any(s["bytes"] for s in t["sources"] or []))
    assert pieces(key)
    os.kill(_worker_pid(svc), signal.SIGKILL)
    PiecesHandler.down.add(key)
    done = svc.wait(task_id, timeout=120)
    assert done.status_code == 200, (done.text, svc.task(task_id))
    assert done.json()["md5"] == right and done.json()["verified"] is True
    task = svc.task(task_id)
    assert [h["outcome"] for h in task["history"]] == ["lease_lost", "done"]
    assert task["history"][1]["resumed_from"] > 0
    assert "fetched again" in task["sources_note"]
    # Whole-file requests: the first attempt's, the resume (a range) and
    # the start over from the primary alone.
    assert [r["range"] for r in log(primary_key)].count(None) == 2


def test_link_headers_and_metalink_urls_are_ranked_by_preference():
    # Pure functions: no service. RFC 6249's pri and RFC 5854's priority,
    # lowest first; a url without one last, in document order; only
    # http(s) links, relative ones resolved against the answer's URL.
    from tornado.httputil import HTTPHeaders

    from service.fetch.mirrors import duplicates
    from service.intake.metalink import parse
    headers = HTTPHeaders()
    headers.add("Link", '<http://a/x>; rel=duplicate; pri=2, <http://b/y>; rel="duplicate"; '
                        "pri=1, </rel>; rel=duplicate")
    headers.add("Link", '<http://c/z>; rel=next, <ftp://d/>; rel=duplicate, '
                        '<http://e/q?a=1,2>; rel="describedby duplicate"')
    assert duplicates(headers, "http://host/base/file") == [
        "http://b/y", "http://a/x", "http://host/rel", "http://e/q?a=1,2"]
    document = ('<metalink xmlns="urn:ietf:params:xml:ns:metalink"><file name="f">'
                '<url>http://last/f</url><url priority="2">http://second/f</url>'
                '<url priority="1">http://first/f</url>'
                '<hash type="md5">' + "a" * 32 + '</hash>'
                '<hash type="sha-256">' + "b" * 64 + '</hash></file></metalink>')
    described = parse(document)
    assert described.urls == ["http://first/f", "http://second/f", "http://last/f"]
    assert str(described.expected) == "sha256:" + "b" * 64
    assert described.size is None and described.pieces is None


def test_the_cli_submits_mirrors(svc, files):
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    _, primary = server(files, size=MiB)
    _, a = server(files, size=MiB)
    _, b = server(files, size=MiB)
    out = subprocess.run([sys.executable, str(root / "run.py"), "submit", primary,
                          "--mirror", a, "--mirror", b],
                         env=dict(os.environ, MD5LIGHT_URL=svc.base),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    task_id = out.stdout.strip()
    assert svc.wait(task_id).json()["md5"] == md5_of(MiB, 5)
    assert svc.task(task_id)["mirrors"] == [a, b]
