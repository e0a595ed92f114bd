"""A retry resumes a long download from its checkpoint (Range + If-Range),
and starts over whenever the server's answer cannot continue it. Bytes are
counted on the server's side (fileserver.RangeHandler)."""

from __future__ import annotations

import hashlib
import os
import signal
import time
import uuid

import pytest
import requests

from fileserver import RangeHandler, body, md5_of, served

MiB = 1024 * 1024
SIZE = 40 * MiB
CUT = 22 * MiB
# Small thresholds so that a 40 MiB file is a "long" download here.
RESUMABLE = {"WORKERS": "1", "RESUMABLE_MIN_SIZE": "1MiB", "CHECKPOINT_INTERVAL": "1MiB"}


@pytest.fixture(scope="module")
def svc(mongo, logs):
    from servicectl import Service
    service = Service(mongo, logs, **RESUMABLE).start()
    yield service
    service.stop()


def fetch(svc, files, query: str, size: int = SIZE, seed: int = 11,
          **form) -> tuple[str, str, list[dict]]:
    """Submit /range/<new key>/<size>?<query>; wait for the task; return
    its id, key and the requests the server saw."""
    key = uuid.uuid4().hex[:12]
    url = files.url(f"/range/{key}/{size}?seed={seed}&{query}")
    r = requests.post(svc.base + "/submit", data={"url": url, **form}, timeout=10)
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]
    done = svc.wait(task_id, timeout=120)
    assert done.status_code == 200, (done.text, svc.task(task_id))
    return task_id, key, RangeHandler.requests[key]


def test_dropped_connection_resumes_where_it_stopped(svc, files):
    task_id, key, seen = fetch(svc, files, f"cut={CUT}", algorithms="sha256")
    assert len(seen) == 2, seen
    first, second = seen
    assert first["range"] is None and first["sent"] == CUT
    # Hashing is unbuffered while checkpointing: it resumes at the last
    # byte the first attempt received.
    offset = int(second["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < offset <= CUT and CUT - offset < MiB, offset
    assert second["if_range"] == f'"v0-{SIZE}"' and second["status"] == 206
    assert served(key) < 1.1 * SIZE
    result = svc.check(task_id).json()
    assert result["md5"] == md5_of(SIZE, 11)
    assert result["digests"]["sha256"] == hashlib.sha256(body(SIZE, 11)).hexdigest()
    task = svc.task(task_id)
    assert task["resumed_from"] == offset and task["bytes_done"] == SIZE
    assert task["bytes_fetched"] == CUT + SIZE - offset
    assert [h["resumed_from"] for h in task["history"]] == [None, offset]
    assert [h["bytes_fetched"] for h in task["history"]] == [CUT, SIZE - offset]
    assert task["checkpoint_offset"] is None  # done: nothing left to resume


def test_server_claim_is_checked_on_the_whole_resumed_file(svc, files):
    # md5 asked for; the server's sha-256 Repr-Digest joins the hashing,
    # its state rides in the checkpoint and is checked at the very end.
    task_id, key, seen = fetch(svc, files, f"cut={CUT}&repr=1")
    assert seen[1]["status"] == 206
    server = svc.task(task_id)["server_digest"]
    assert server["header"] == "Repr-Digest" and server["algorithm"] == "sha256"
    assert server["match"] is True


def test_range_ignored_starts_over_in_the_same_request(svc, files):
    task_id, key, seen = fetch(svc, files, f"cut={CUT}&mode=ignore")
    assert [r["status"] for r in seen] == [200, 200]
    assert seen[1]["range"] is not None and seen[1]["sent"] == SIZE
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 11)
    assert svc.task(task_id)["resumed_from"] is None


def test_416_starts_over_without_range(svc, files):
    task_id, key, seen = fetch(svc, files, f"cut={CUT}&mode=416")
    assert [r["status"] for r in seen] == [200, 416, 200]
    assert seen[2]["range"] is None and seen[2]["if_range"] is None
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 11)


def test_file_changed_between_attempts_gives_the_new_files_digest(svc, files):
    task_id, key, seen = fetch(svc, files, f"cut={CUT}&change=1")
    # If-Range names version 0; the server has version 1 and sends it whole.
    assert seen[1]["if_range"] == f'"v0-{SIZE}"' and seen[1]["status"] == 200
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 12)


@pytest.mark.parametrize("validator", ["etag", "lastmod"])
def test_206_of_another_version_starts_over(svc, files, validator):
    # The server ignores If-Range: the resume's 206 has the right
    # Content-Range but the next version's validator and bytes. Parts are
    # combined only under one strong validator (RFC 9110 15.3.7.3): the
    # attempt starts over and the digest is version 1's, whole.
    task_id, key, seen = fetch(svc, files, f"cut={CUT}&change=1&mode=noifrange"
                               f"&validator={validator}")
    assert [r["status"] for r in seen] == [200, 206, 200], seen
    assert seen[2]["range"] is None and seen[2]["if_range"] is None
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 12)
    task = svc.task(task_id)
    assert "another version of the file" in task["resume_note"], task
    assert task["resumed_from"] is None


def test_206_without_a_validator_starts_over(svc, files):
    # No validator on the 206 is no proof of the same version.
    task_id, key, seen = fetch(svc, files, f"cut={CUT}&mode=bare206")
    assert [r["status"] for r in seen] == [200, 206, 200], seen
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 11)
    assert "no ETag" in svc.task(task_id)["resume_note"]


def test_content_range_elsewhere_starts_over(svc, files):
    task_id, key, seen = fetch(svc, files, f"cut={CUT}&mode=elsewhere")
    assert [r["status"] for r in seen] == [200, 206, 200]
    assert seen[2]["range"] is None
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 11)
    # Dropped at its headers: not a byte of the 206 was taken in.
    assert svc.task(task_id)["bytes_fetched"] == CUT + SIZE


def test_last_modified_only_resumes(svc, files):
    task_id, key, seen = fetch(svc, files, f"cut={CUT}&validator=lastmod")
    assert seen[1]["if_range"] == "Mon, 01 Jan 2024 00:00:00 GMT"
    assert seen[1]["status"] == 206
    assert served(key) < 1.1 * SIZE
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 11)


def test_weak_etag_does_not_resume(svc, files):
    task_id, key, seen = fetch(svc, files, f"cut={CUT}&validator=weak")
    assert seen[1]["range"] is None and seen[1]["status"] == 200
    assert svc.check(task_id).json()["md5"] == md5_of(SIZE, 11)
    assert "no strong ETag" in svc.task(task_id)["resume_note"]


def test_blake2b_cannot_resume_and_says_so(svc, files):
    task_id, key, seen = fetch(svc, files, f"cut={CUT}", algorithms="blake2b")
    assert seen[1]["range"] is None
    assert svc.check(task_id).json()["digests"]["blake2b"] == \
        hashlib.blake2b(body(SIZE, 11)).hexdigest()
    assert "blake2b hash state cannot be saved" in svc.task(task_id)["resume_note"]


def test_small_file_is_not_checkpointed(svc, files):
    task_id, key, seen = fetch(svc, files, "cut=300000", size=MiB)
    assert seen[1]["range"] is None
    assert "RESUMABLE_MIN_SIZE" in svc.task(task_id)["resume_note"]


def _worker_pid(service) -> int:
    pids = [int(line.rsplit("pid ", 1)[1].rstrip(")")) for line in service.log().splitlines()
            if "worker process" in line and "started (pid" in line]
    return pids[-1]


def _wait_for(service, task_id: str, ready, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        task = service.task(task_id)
        if ready(task):
            return task
        assert time.monotonic() < deadline, task
        time.sleep(0.05)


def test_sigkilled_worker_resumes_from_the_last_checkpoint(make_service, files):
    # A renewal (and so a checkpoint) every half second.
    svc = make_service(**RESUMABLE, LEASE_SECONDS="1.5")
    size, key = 48 * MiB, uuid.uuid4().hex[:12]
    task_id = svc.submit(files.url(f"/range/{key}/{size}?seed=5&delay=0.05"))
    task = _wait_for(svc, task_id, lambda t: (t["checkpoint_offset"] or 0) > 0.6 * size)
    os.kill(_worker_pid(svc), signal.SIGKILL)
    r = svc.wait(task_id, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["md5"] == md5_of(size, 5)
    seen = RangeHandler.requests[key]
    assert len(seen) == 2 and seen[1]["status"] == 206
    assert int(seen[1]["range"][6:-1]) >= task["checkpoint_offset"]
    assert served(key) < 1.1 * size, served(key) / size
    history = svc.task(task_id)["history"]
    assert [h["outcome"] for h in history] == ["lease_lost", "done"]
    assert history[1]["resumed_from"] == int(seen[1]["range"][6:-1])


def test_sigterm_drain_checkpoints_before_returning_the_task(make_service, files, mongo, logs):
    from servicectl import Service
    svc = make_service(**RESUMABLE, DRAIN_SECONDS="0.5")
    size, key = 48 * MiB, uuid.uuid4().hex[:12]
    task_id = svc.submit(files.url(f"/range/{key}/{size}?seed=6&delay=0.05"))
    _wait_for(svc, task_id, lambda t: t["bytes_done"] > 0.4 * size)
    assert svc.stop() == 0
    stopped_at = served(key)
    again = Service(mongo, logs, db_name=svc.db_name, **RESUMABLE).start()
    try:
        r = again.wait(task_id, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["md5"] == md5_of(size, 6)
        seen = RangeHandler.requests[key]
        assert len(seen) == 2
        # The drain wrote the checkpoint at the last byte it received: the
        # restart re-fetches (almost) nothing.
        assert int(seen[1]["range"][6:-1]) > stopped_at - MiB
        assert served(key) < 1.05 * size, served(key) / size
        task = again.task(task_id)
        assert [h["outcome"] for h in task["history"]] == ["shutdown", "done"]
    finally:
        again.stop()
