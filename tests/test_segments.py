"""#28: big files over several ranged connections, hashed in order. The
file server (fileserver.PiecesHandler) honours ranges the way the test
asks, counts every request and the most connections at once."""

from __future__ import annotations

import hashlib
import uuid

import pytest
import requests

from fileserver import PiecesHandler, body, md5_of

MiB = 1024 * 1024
SIZE = 24 * MiB
SEGMENTED = {"WORKERS": "1", "SEGMENT_MIN_SIZE": "4MiB", "SEGMENT_WINDOW": "4MiB",
             "CONNECTIONS_PER_DOWNLOAD": "4", "CHECKPOINT_INTERVAL": "1MiB"}


@pytest.fixture(scope="module")
def svc(mongo, logs):
    from servicectl import Service
    service = Service(mongo, logs, **SEGMENTED).start()
    yield service
    service.stop()


def fetch(svc, files, query: str = "", size: int = SIZE, expect: int = 200,
          **form) -> tuple[str, str, dict]:
    key = uuid.uuid4().hex[:12]
    url = files.url(f"/pieces/{key}/{size}?seed=5&{query}")
    r = requests.post(svc.base + "/submit", data={"url": url, **form}, timeout=10)
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]
    done = svc.wait(task_id, timeout=120)
    assert done.status_code == expect, (done.text, svc.task(task_id))
    return task_id, key, svc.task(task_id)


def ranges(key: str) -> list[str | None]:
    return [r["range"] for r in PiecesHandler.requests[key]]


def test_a_big_file_comes_over_four_connections_hashed_in_order(svc, files):
    task_id, key, task = fetch(svc, files, "rate=4000000", algorithms="sha256")
    result = svc.check(task_id).json()
    assert result["md5"] == md5_of(SIZE, 5)
    assert result["digests"]["sha256"] == hashlib.sha256(body(SIZE, 5)).hexdigest()
    assert PiecesHandler.busiest[key] == 4
    seen = PiecesHandler.requests[key]
    # The first answer's first quarter second measures the link (and is
    # hashed); pieces carry If-Range and fetch the rest, once each.
    start = min(int(r["range"][6:].split("-")[0]) for r in seen[1:])
    assert seen[0]["range"] is None and 0 < start <= seen[0]["sent"] < 4 * MiB
    assert all(r["if_range"] == f'"p0-{SIZE}"' and r["status"] == 206 for r in seen[1:])
    assert sum(r["sent"] for r in seen[1:]) == SIZE - start
    assert task["connections"] == {"used": 4, "asked": 4, "why_fewer": None}
    assert task["bytes_done"] == SIZE


def test_connections_parameter_lowers_it(svc, files):
    task_id, key, task = fetch(svc, files, "rate=8000000", connections="2")
    assert PiecesHandler.busiest[key] == 2 and task["connections"]["asked"] == 2
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 5)


@pytest.mark.parametrize("value", ["0", "17", "x", "²"])
def test_connections_out_of_range_is_a_400(svc, files, value):
    r = requests.post(svc.base + "/submit", data={"url": files.url("/bytes/10"),
                                                  "connections": value}, timeout=10)
    assert r.status_code == 400 and "connections must be" in r.json()["error"]


def test_a_server_that_refuses_extra_connections_gets_fewer(svc, files):
    task_id, key, task = fetch(svc, files, "rate=8000000&refuse=2")
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 5)
    assert "503" in task["connections"]["why_fewer"]
    assert PiecesHandler.busiest[key] <= 2


@pytest.mark.parametrize("query, why", [
    ("accept=0", "Accept-Ranges"), ("validator=weak", "no strong ETag"),
    ("validator=none", "no strong ETag")])
def test_servers_without_ranges_or_validators_get_one_connection(svc, files, query, why):
    task_id, key, task = fetch(svc, files, query)
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 5)
    assert ranges(key) == [None]
    assert task["connections"]["used"] == 1 and why in task["connections"]["why_fewer"]


def test_ranges_refused_after_all_falls_back_to_one_request(svc, files):
    task_id, key, task = fetch(svc, files, "noranges=1&rate=8000000")
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 5)
    assert "whole file" in task["connections"]["why_fewer"]


def test_a_file_that_changes_between_pieces_is_never_mixed(svc, files):
    # From the third request on the server has version 1 and ignores
    # If-Range: those pieces come back as 206 under ETag p1. The attempt
    # ends as changed; the retry starts over and hashes version 1 whole.
    task_id, key, task = fetch(svc, files, "rate=8000000&change=3")
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 6)
    assert [h["outcome"] for h in task["history"]] == ["retry", "done"]
    # The retry runs over one connection (pieces that never agree, as
    # behind a load balancer whose backends differ, would fail it again).
    assert task["connections"]["asked"] == 1


def test_a_fast_first_connection_keeps_one_connection_and_hashlib(svc, files):
    # Unthrottled on loopback: one connection already beats SEGMENT_MAX_RATE,
    # and pieces hashed inline would be slower than hashlib on threads.
    task_id, key, task = fetch(svc, files)
    assert ranges(key) == [None] and svc.check(task_id).json()["md5"] == md5_of(SIZE, 5)
    assert "SEGMENT_MAX_RATE" in task["connections"]["why_fewer"]
    assert "RESUMABLE_MIN_SIZE" in task["resume_note"]


def test_a_slow_single_connection_resumes_at_any_size(svc, files):
    # connections=1: no pieces, but a slow link still gets resumable hashers.
    task_id, key, task = fetch(svc, files, "rate=8000000", connections="1")
    assert ranges(key) == [None] and task["resume_note"] is None
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 5)


def test_small_files_keep_one_connection(svc, files):
    task_id, key, task = fetch(svc, files, size=3 * MiB)
    assert ranges(key) == [None] and svc.check(task_id).json()["md5"] == md5_of(3 * MiB, 5)
    assert "SEGMENT_MIN_SIZE" in task["connections"]["why_fewer"]


def test_a_killed_worker_resumes_a_segmented_download_at_any_size(make_service, files):
    # RESUMABLE_MIN_SIZE stays at its 1 GiB default: a segmented download
    # is checkpointed at its hashing front whatever its size.
    import os
    import signal

    from test_resume import _wait_for, _worker_pid
    svc = make_service(**SEGMENTED, LEASE_SECONDS="1.5")
    size, key = 48 * MiB, uuid.uuid4().hex[:12]
    task_id = svc.submit(files.url(f"/pieces/{key}/{size}?seed=7&rate=3000000"))
    task = _wait_for(svc, task_id, lambda t: (t["checkpoint_offset"] or 0) > 0.6 * size)
    os.kill(_worker_pid(svc), signal.SIGKILL)
    r = svc.wait(task_id, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["md5"] == md5_of(size, 7)
    served = sum(x["sent"] for x in PiecesHandler.requests[key])
    assert served < 1.15 * size, served / size
    done = svc.task(task_id)
    assert [h["outcome"] for h in done["history"]] == ["lease_lost", "done"]
    assert done["history"][1]["resumed_from"] >= task["checkpoint_offset"]


def test_cancel_stops_every_connection_within_a_second(svc, files):
    import time
    key = uuid.uuid4().hex[:12]
    task_id = svc.submit(files.url(f"/pieces/{key}/{SIZE}?seed=8&rate=500000"))
    deadline = time.monotonic() + 30
    while PiecesHandler.running.get(key, 0) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert requests.delete(f"{svc.base}/tasks/{task_id}", timeout=10).status_code == 200
    time.sleep(1.5)
    assert PiecesHandler.running.get(key, 0) == 0


def test_nginx_with_a_per_connection_rate_limit(svc):
    # Debian's nginx (make test installs it), limit_rate per connection,
    # ranges on: pieces over four connections, each logged by nginx.
    import shutil
    import tempfile
    from pathlib import Path

    from bench.resume import ThrottledNginx
    root = Path(tempfile.mkdtemp(prefix="md5seg-"))  # nginx's workers must read it
    root.chmod(0o755)
    (root / "f.bin").write_bytes(body(SIZE, 9))
    nginx = ThrottledNginx(root, "3m")
    try:
        r = requests.post(svc.base + "/submit", data={"url": nginx.url("f.bin")}, timeout=10)
        task_id = r.json()["id"]
        done = svc.wait(task_id, timeout=120)
        assert done.json().get("md5") == md5_of(SIZE, 9), (done.text, svc.task(task_id))
        task = svc.task(task_id)
        assert task["connections"]["used"] == 4, task["connections"]
        logged = nginx.requests_for("/f.bin")
        assert [s for s, _, _ in logged].count(206) >= 4
        assert sum(sent for status, sent, _ in logged if status == 206) < 1.1 * SIZE
    finally:
        nginx.stop()
        shutil.rmtree(root, ignore_errors=True)
