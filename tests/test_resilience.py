"""Every accepted task ends as done or failed, whatever the remote server,
the worker processes or the database do."""

from __future__ import annotations

import os
import signal
import time
import uuid

import requests

from fileserver import RawUntilCloseServer, md5_of


def failed(service, url: str, timeout: float = 60) -> str:
    r = service.wait(service.submit(url), timeout=timeout)
    assert r.status_code == 502, r.text
    assert r.json()["status"] == "failed"
    return r.json()["error"]


def test_trickle_forever_fails_as_stalled(service, files):
    # IDLE_TIMEOUT=3 s in tests; MIN_SPEED 1 KiB per window.
    error = failed(service, files.url("/trickle"))
    assert error.startswith("download from 127.0.0.1 stalled")


def test_silent_server_fails_with_no_data(service, files):
    error = failed(service, files.url("/stall"))
    assert error == "no data from 127.0.0.1 for 3 s"


def test_endless_body_fails_at_size_limit(make_service, files):
    svc = make_service(MAX_FILE_SIZE="20MiB", WORKERS="1")
    error = failed(svc, files.url("/endless"))
    assert error == "file larger than 20 MiB limit"


def test_content_length_over_limit_fails_at_once(make_service, files):
    svc = make_service(MAX_FILE_SIZE="1MiB", WORKERS="1")
    task_id = svc.submit(files.url("/bytes/2000000"))
    r = svc.wait(task_id)
    assert r.json()["error"] == "file larger than 1 MiB limit"
    assert svc.task(task_id)["bytes_done"] == 0  # refused before any byte was hashed


def test_body_shorter_than_content_length_fails(service, files):
    task_id = service.submit(files.url("/short/100000"))
    r = service.wait(task_id)
    assert r.status_code == 502
    assert r.json()["error"].startswith("connection to 127.0.0.1 closed")
    assert service.task(task_id)["attempts"] == 3  # transient: retried MAX_ATTEMPTS times


def test_too_many_redirects(service, files):
    assert failed(service, files.url("/redirect/6/bytes/10")) == "more than 5 redirects"


def test_five_redirects_are_fine(service, files):
    r = service.wait(service.submit(files.url("/redirect/5/bytes/10?code=301")))
    assert r.json()["md5"] == md5_of(10)


def test_permanent_http_errors_fail_at_once(service, files):
    for code, text in ((404, "Not Found"), (403, "Forbidden"), (410, "Gone")):
        task_id = service.submit(files.url(f"/status/{code}"))
        r = service.wait(task_id)
        assert r.json()["error"] == f"HTTP {code} {text} from 127.0.0.1"
        assert service.task(task_id)["attempts"] == 1


def test_transient_errors_are_retried_then_succeed(service, files):
    key = uuid.uuid4().hex
    task_id = service.submit(files.url(f"/flaky/{key}/5000?fails=2&code=503"))
    r = service.wait(task_id)
    assert r.status_code == 200 and r.json()["md5"] == md5_of(5000)
    assert service.task(task_id)["attempts"] == 3


def test_retry_after_is_honoured(service, files):
    key = uuid.uuid4().hex
    start = time.monotonic()
    task_id = service.submit(files.url(f"/flaky/{key}/100?fails=1&code=429&retry_after=2"))
    r = service.wait(task_id)
    assert r.status_code == 200
    assert time.monotonic() - start >= 1.9
    assert service.task(task_id)["attempts"] == 2


def test_persistent_5xx_fails_after_max_attempts(service, files):
    task_id = service.submit(files.url("/status/500"))
    r = service.wait(task_id)
    assert r.json()["error"] == "HTTP 500 Internal Server Error from 127.0.0.1"
    assert service.task(task_id)["attempts"] == 3


def test_connection_refused_and_unknown_host(service):
    dead = f"http://127.0.0.1:{_closed_port()}/x"
    assert failed(service, dead).startswith("connection refused by 127.0.0.1")
    assert failed(service, "http://no-such-host.invalid/x") == \
        "could not resolve host no-such-host.invalid"


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_read_until_close_300mb_is_hashed_whole(service):
    server = RawUntilCloseServer(300_000_000)
    r = service.wait(service.submit(server.url()), timeout=180)
    assert r.status_code == 200, r.text
    assert r.json()["md5"] == md5_of(300_000_000, 3)


def test_idempotency_key_returns_same_task(service, files):
    key = uuid.uuid4().hex
    url = files.url("/bytes/123")
    first = requests.post(service.base + "/submit", data={"url": url},
                          headers={"Idempotency-Key": key})
    second = requests.post(service.base + "/submit", data={"url": url},
                           headers={"Idempotency-Key": key})
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    other = requests.post(service.base + "/submit", data={"url": url + "&x"},
                          headers={"Idempotency-Key": key})
    assert other.status_code == 422
    fresh = requests.post(service.base + "/submit", data={"url": url})
    assert fresh.json()["id"] != first.json()["id"]


def _worker_pids(svc) -> list[int]:
    out = []
    for line in svc.log().splitlines():
        if "worker process" in line and "started (pid" in line:
            out.append(int(line.rsplit("pid ", 1)[1].rstrip(")")))
    return out


def test_sigkill_worker_mid_download_task_completes(make_service, files):
    svc = make_service(WORKERS="1")
    task_id = svc.submit(files.url("/slow/2000000?parts=20&delay=0.25&seed=4"))
    deadline = time.monotonic() + 20
    while svc.task(task_id)["bytes_done"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    pid = _worker_pids(svc)[-1]
    os.kill(pid, signal.SIGKILL)
    r = svc.wait(task_id, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["md5"] == md5_of(2000000, 4)
    assert svc.task(task_id)["attempts"] == 2
    assert "restarting" in svc.log()  # the pool replaced the dead worker


def test_task_that_keeps_killing_workers_fails(make_service, files):
    """A task whose worker dies every time ends after MAX_ATTEMPTS."""
    svc = make_service(WORKERS="1")
    task_id = svc.submit(files.url("/stall"))
    for attempt in range(1, 4):
        deadline = time.monotonic() + 30
        while True:
            doc = svc.task(task_id)
            if doc["status"] == "running" and doc["attempts"] == attempt:
                break
            assert time.monotonic() < deadline, doc
            time.sleep(0.1)
        pids = _worker_pids(svc)
        os.kill(pids[-1], signal.SIGKILL)
        # wait for the replacement worker
        deadline = time.monotonic() + 30
        while len(_worker_pids(svc)) == len(pids):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    r = svc.wait(task_id, timeout=60)
    assert r.status_code == 502
    assert r.json()["error"] == "processing stopped unexpectedly 3 times; giving up"


def test_full_restart_with_50_tasks_in_flight(make_service, files, mongo, logs):
    from servicectl import Service
    svc = make_service(WORKERS="2", WORKER_CONCURRENCY="8", DRAIN_SECONDS="1")
    ids = [svc.submit(files.url(f"/slow/{200000 + i}?parts=10&delay=0.3&seed={i}"))
           for i in range(50)]
    time.sleep(1.0)
    assert svc.stop() == 0
    again = Service(mongo, logs, db_name=svc.db_name, WORKERS="2", WORKER_CONCURRENCY="8")
    again.port = svc.port
    again.env["PORT"] = str(svc.port)
    again.base = svc.base
    again.start()
    try:
        results = again.wait_all(ids, timeout=120)
        for i, task_id in enumerate(ids):
            assert results[task_id].status_code == 200, results[task_id].text
            assert results[task_id].json()["md5"] == md5_of(200000 + i, i)
    finally:
        again.stop()


def test_database_outage_under_load(tmp_path, logs, files):
    """Stop the database under load: the API answers 503 quickly, workers
    wait, and everything accepted finishes once the database is back."""
    from servicectl import Service
    from service.runtime.embedded_db import EmbeddedDatabase

    db = EmbeddedDatabase(str(tmp_path / "db"))
    db.start()
    svc = Service(f"mongodb://127.0.0.1:{db.port}", logs, WORKERS="2").start()
    try:
        ids = [svc.submit(files.url(f"/slow/{100000 + i}?parts=10&delay=0.3&seed={i}"))
               for i in range(30)]
        db.stop()
        t0 = time.monotonic()
        r = requests.post(svc.base + "/submit", data={"url": files.url("/bytes/1")}, timeout=15)
        assert r.status_code == 503 and "error" in r.json()
        assert time.monotonic() - t0 < 6
        assert requests.get(svc.base + "/check", params={"id": ids[0]}).status_code == 503
        assert requests.get(svc.base + "/health").status_code == 503
        time.sleep(3)
        db.start()
        results = svc.wait_all(ids, timeout=120)
        for i, task_id in enumerate(ids):
            assert results[task_id].status_code == 200, results[task_id].text
            assert results[task_id].json()["md5"] == md5_of(100000 + i, i)
    finally:
        svc.stop()
        db.stop()


def test_a_worker_stops_even_when_its_database_froze(tmp_path, logs, files):
    """SIGTERM to a worker whose database stopped answering (SIGSTOP: its
    writes hang rather than fail). Past its drain and grace it writes its
    threads' stacks to its log and exits; once the database answers again,
    another worker finishes the task."""
    from servicectl import Service

    from service.runtime.embedded_db import EmbeddedDatabase
    from service.runtime.worker_process import STOP_GRACE

    db = EmbeddedDatabase(str(tmp_path / "db"))
    db.start()
    base = f"mongodb://127.0.0.1:{db.port}"
    api = Service(base, logs, role="api", db_name="frozen")
    first = Service(base, logs, role="worker", db_name="frozen", DRAIN_SECONDS="1")
    second = Service(base, logs, role="worker", db_name="frozen")
    frozen = False
    try:
        first.start(wait=False)
        api.start()  # healthy once a worker reports in
        task_id = api.submit(files.url("/slow/200000?parts=40&delay=0.25&seed=5"))
        deadline = time.monotonic() + 30
        while api.task(task_id)["status"] != "running":
            assert time.monotonic() < deadline, "the worker did not take the task"
            time.sleep(0.1)
        os.kill(db.process.pid, signal.SIGSTOP)
        frozen = True
        t0 = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        first.proc.wait(timeout=1 + STOP_GRACE + 15)
        took = time.monotonic() - t0
        if first.proc.returncode != 0:  # the limit ended it: say what held it
            assert took >= 1 + STOP_GRACE - 1, took
            assert "most recent call first" in first.log()
        os.kill(db.process.pid, signal.SIGCONT)
        frozen = False
        second.start(wait=False)
        r = api.wait(task_id, timeout=90)
        assert r.status_code == 200 and r.json()["md5"] == md5_of(200000, 5)
    finally:
        if frozen:
            os.kill(db.process.pid, signal.SIGCONT)
        for svc in (api, first, second):
            if svc.proc is not None and svc.proc.poll() is None:
                svc.proc.kill()
                svc.proc.wait()
        db.stop()
