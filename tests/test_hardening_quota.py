"""One client cannot crowd out the others: a cap on its unfinished tasks, a
cap on the queue, fair claiming across clients, and a cap on its
connections (slowloris), with an accept loop that stays quiet when file
descriptors run out."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time

import requests

from fileserver import md5_of
from servicectl import ROOT, Service

A, B = "203.0.113.1", "203.0.113.2"  # documentation addresses, never dialled
PROXY = {"CLIENT_IP_HEADER": "X-Forwarded-For"}


def post(svc, url: str, client: str | None = None, key: str | None = None):
    headers = {}
    if client:
        headers["X-Forwarded-For"] = client
    if key:
        headers["Idempotency-Key"] = key
    return requests.post(svc.base + "/submit", data={"url": url}, headers=headers, timeout=10)


def test_per_client_cap_429_with_headers_other_client_still_served(make_service, files):
    # IDLE_TIMEOUT 60: the stalling tasks stay unfinished for the whole test.
    svc = make_service(MAX_PENDING_PER_CLIENT="5", WORKERS="1", WORKER_CONCURRENCY="1",
                       IDLE_TIMEOUT="60", **PROXY)
    stall = files.url("/stall")
    accepted = [post(svc, stall, A) for _ in range(4)] + [post(svc, stall, A, key="a-1")]
    assert [r.status_code for r in accepted] == [202] * 5
    for left, r in zip((4, 3, 2, 1, 0), accepted):
        assert r.headers["RateLimit-Policy"] == '"pending";q=5;qu="concurrent-requests"'
        assert r.headers["RateLimit"] == f'"pending";r={left}'

    # A proxy appends the address it saw: the right-most entry counts, the
    # ones the client wrote itself do not.
    over = post(svc, stall, f"{B}, {A}")
    assert over.status_code == 429, over.text
    assert over.json()["error"] == ("too many unfinished tasks from your address: 5 are "
                                    "queued or running and the limit is 5; submit more "
                                    "when some have finished")
    assert over.headers["Retry-After"] == "5"
    assert over.headers["RateLimit-Policy"] == '"pending";q=5;qu="concurrent-requests"'
    assert over.headers["RateLimit"] == '"pending";r=0;t=5'

    # An idempotent retry of an accepted task is not refused...
    again = post(svc, stall, A, key="a-1")
    assert again.status_code == 202 and again.json() == accepted[4].json()
    # ...a new key is, and the refusal leaves the key unused.
    assert post(svc, stall, A, key="a-2").status_code == 429
    other = post(svc, stall, B, key="a-2")
    assert other.status_code == 202
    assert other.headers["RateLimit"] == '"pending";r=4'
    assert svc.check(other.json()["id"]).status_code == 202  # a real task, queued

    # The client's address is stored for the quota, never shown.
    view = requests.get(f"{svc.base}/tasks/{accepted[0].json()['id']}", timeout=10)
    assert "client" not in view.json() and A not in view.text


def test_new_client_is_not_starved_by_a_backlog(make_service, files):
    # Two download slots; A's stalling tasks hold a slot for IDLE_TIMEOUT
    # (3 s) per attempt, so in submission order B would wait about 45 s.
    svc = make_service(MAX_PENDING_PER_CLIENT="100", WORKERS="1", WORKER_CONCURRENCY="2",
                       **PROXY)
    backlog = []
    for _ in range(30):
        r = post(svc, files.url("/stall"), A)
        assert r.status_code == 202, r.text
        backlog.append(r.json()["id"])
    r = post(svc, files.url("/bytes/2000"), B)
    assert r.status_code == 202, r.text
    assert svc.wait(r.json()["id"], timeout=30).json()["md5"] == md5_of(2000)
    untouched = sum(1 for task_id in backlog if svc.task(task_id)["attempts"] == 0)
    assert untouched >= 20, f"only {untouched} of A's 30 tasks still waited when B's finished"


def test_queue_cap_answers_503(make_service, files):
    svc = make_service(MAX_QUEUED="3", WORKERS="1", WORKER_CONCURRENCY="1",
                       IDLE_TIMEOUT="60")
    codes = []
    for i in range(8):
        # Different clients: the per-client cap is not what refuses here.
        r = post(svc, files.url("/stall"), f"198.51.100.{i}")
        codes.append(r.status_code)
        if r.status_code == 503:
            break
    # The cached count is an upper bound (a count racing a submit may see
    # it twice), so the cap may bite a little early, never late: at most
    # three queued plus the one the worker runs.
    assert codes[-1] == 503 and 2 <= codes.count(202) <= 4, codes
    assert r.json()["error"].startswith("the service is at capacity with ")
    assert r.json()["error"].endswith(" tasks waiting (limit 3); try again in a minute")
    assert r.headers["Retry-After"] == "30"
    assert svc.check("no-such-task").status_code == 404  # reads still work


def open_partial(port: int, source: str, n: int) -> list[socket.socket]:
    """Slowloris: connections that send half a request and then nothing.
    Once the server's accept backlog is full, connecting waits for SYN
    retries (seconds): those are given up on quickly."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        socks.append(s)
        s.bind((source, 0))
        s.settimeout(0.5)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Ty")
        except OSError:
            pass
    return socks


def still_open(socks: list[socket.socket]) -> int:
    n = 0
    for s in socks:
        s.settimeout(0.5)
        try:
            n += s.recv(1) != b""
        except socket.timeout:
            n += 1
        except OSError:
            pass
    return n


def test_slowloris_is_capped_per_address_and_others_are_served(make_service, files):
    svc = make_service(MAX_CONNECTIONS_PER_CLIENT="8")
    socks = open_partial(svc.port, "127.0.0.2", 40)
    try:
        assert requests.get(svc.base + "/check", params={"id": "x"}, timeout=10).status_code == 404
        assert post(svc, files.url("/bytes/100")).status_code == 202
        assert still_open(socks) == 8
    finally:
        for s in socks:
            s.close()
    log = svc.log()
    refusals = log.count("closing new connections from 127.0.0.2: it holds 8 "
                         "(MAX_CONNECTIONS_PER_CLIENT)")
    assert 1 <= refusals <= 5, refusals
    assert "Traceback" not in log


class LowFdService(Service):
    """The service under a hard limit of a few hundred descriptors."""

    def start(self, wait: bool = True) -> "LowFdService":
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), self.role],
                                     cwd=ROOT, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=limit)
        log.close()
        if wait:
            self.wait_healthy()
        return self


def test_out_of_descriptors_is_logged_once_a_second_and_recovers(mongo, logs):
    svc = LowFdService(mongo, logs, WORKERS="1", WORKER_CONCURRENCY="2",
                       MAX_CONNECTIONS_PER_CLIENT="0").start()
    try:
        socks = open_partial(svc.port, "127.0.0.3", 300)  # the backlog takes the rest
        try:
            time.sleep(3)
            assert svc.proc.poll() is None
        finally:
            for s in socks:
                s.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                r = requests.get(svc.base + "/check", params={"id": "x"}, timeout=5)
                if r.status_code == 404:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the API did not recover"
            time.sleep(0.2)
    finally:
        svc.stop()
    log = svc.log()
    storms = log.count("cannot accept connections: Too many open files")
    assert 1 <= storms <= 8, storms
    assert "more like this in the last second" in log
    assert "Traceback" not in log
