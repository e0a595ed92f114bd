"""GET /tasks (history, filters, cursor pages) and DELETE /tasks/<id>
(cancel), against a real service, a real SecantusDB and real file servers:
races with claims, a running download closed on cancel, the counters, the
CLI's Ctrl-C and the README's query."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import pty
import random
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from pymongo import MongoClient
from servicectl import ROOT, Service, free_port, wait_for
from slowfiles import SlowFiles
from smtpserver import SMTPServer

from service.model.task import Status, Task


@pytest.fixture(scope="module")
def slow():
    return SlowFiles()


def api_only(make_service, **env) -> Service:
    """An API without workers: what it stores stays queued. /health wants
    a worker, so readiness is the API answering."""
    svc = make_service(role="api", start=False, **env)
    svc.start(wait=False)
    wait_for(lambda: _answers(svc), what="the API to answer")
    return svc


def _answers(svc: Service) -> bool:
    try:
        return requests.get(svc.base + "/tasks?limit=1", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def tasks_of(svc: Service):
    return MongoClient(svc.env["MONGODB_URI"], tz_aware=True).get_default_database()


def stored(url: str, created_at: dt.datetime, status: Status = Status.DONE,
           email: str | None = "secret.person@example.org") -> dict:
    task = Task.new(url, email, mail_enabled=False, client="203.0.113.9")
    task.created_at = created_at
    task.status = status
    if status == Status.DONE:
        task.md5 = "0" * 32
    if status.finished:
        task.finished_at, task.lease_until = created_at, None
    return task.to_doc()


def page(svc: Service, **params) -> requests.Response:
    return requests.get(svc.base + "/tasks", params=params, timeout=10)


def follow(svc: Service, first: requests.Response) -> list[dict]:
    out, r = [], first
    while True:
        assert r.status_code == 200, r.text
        out += r.json()["tasks"]
        nxt = r.json()["next"]
        if nxt is None:
            assert r.json()["after"] is None and "Link" not in r.headers
            return out
        assert r.headers["Link"] == f'<{nxt}>; rel="next"'
        r = requests.get(svc.base + nxt, timeout=10)


# -- listing ------------------------------------------------------------------


def test_list_newest_first_in_pages_never_shows_email_or_client(make_service):
    svc = api_only(make_service)
    base = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)
    # 5 share one millisecond: the id breaks the tie, across page ends too.
    docs = [stored(f"http://files.test/{i}", base + dt.timedelta(seconds=i // 5))
            for i in range(253)]
    tasks_of(svc)["tasks"].insert_many(docs)
    submitted = [svc.submit(f"http://files.test/new{i}", email="secret.person@example.org")
                 for i in range(3)]
    want = [d["_id"] for d in sorted(docs, key=lambda d: (d["created_at"], d["_id"]),
                                     reverse=True)]
    first = page(svc, limit=100)
    assert len(first.json()["tasks"]) == 100
    listed = follow(svc, first)
    ids = [t["id"] for t in listed]
    assert ids == list(reversed(submitted)) + want
    assert all(t["status"] == "queued" for t in listed[:3])
    for body in (first.text, json.dumps(listed)):
        assert "secret.person" not in body and "203.0.113.9" not in body
    assert all("email" not in t and "client" not in t for t in listed)
    default = page(svc).json()
    assert [t["id"] for t in default["tasks"]] == ids[:100]  # limit defaults to 100
    assert [t["id"] for t in page(svc, limit=1000).json()["tasks"]] == ids
    assert re.fullmatch(r"/tasks\?limit=100&after=[\w-]+", first.json()["next"])


def test_pages_are_stable_while_tasks_are_inserted(make_service):
    svc = api_only(make_service)
    col = tasks_of(svc)["tasks"]
    now = dt.datetime.now(dt.UTC)
    old = [stored(f"http://files.test/{i}", now - dt.timedelta(seconds=300 - i))
           for i in range(120)]
    col.insert_many(old)
    r = page(svc, limit=25)
    seen = [t["id"] for t in r.json()["tasks"]]
    added = []
    while r.json()["next"]:
        # New tasks between pages: through the API, and straight into the
        # database stamped now.
        added.append(svc.submit(f"http://files.test/late{len(added)}"))
        doc = stored("http://files.test/late-db", dt.datetime.now(dt.UTC))
        col.insert_one(doc)
        added.append(doc["_id"])
        r = requests.get(svc.base + r.json()["next"], timeout=10)
        assert r.status_code == 200
        seen += [t["id"] for t in r.json()["tasks"]]
    assert len(seen) == len(set(seen)) == 120  # none twice, none skipped
    assert set(seen) == {d["_id"] for d in old}
    assert set(added) <= {t["id"] for t in page(svc, limit=1000).json()["tasks"]}


def test_filters_status_url_since(make_service):
    svc = api_only(make_service)
    col = tasks_of(svc)["tasks"]
    day = dt.datetime(2025, 5, 10, tzinfo=dt.UTC)
    docs = []
    for i in range(60):
        status = [Status.DONE, Status.FAILED, Status.CANCELLED][i % 3]
        url = "http://files.test/a" if i % 2 else "http://files.test/b"
        docs.append(stored(url, day + dt.timedelta(hours=i), status))
    col.insert_many(docs)

    def ids(**params):
        listed = follow(svc, page(svc, limit=7, **params))
        return [t["id"] for t in listed]

    def want(pred):
        return [d["_id"] for d in sorted(docs, key=lambda d: d["created_at"], reverse=True)
                if pred(d)]

    assert ids(status="failed") == want(lambda d: d["status"] == "failed")
    assert ids(status="cancelled") == want(lambda d: d["status"] == "cancelled")
    assert ids(url="http://files.test/a") == want(lambda d: d["url"].endswith("/a"))
    since = day + dt.timedelta(hours=30)
    assert ids(since="2025-05-11T06:00:00Z") == want(lambda d: d["created_at"] >= since)
    assert ids(since="2025-05-11T08:00:00+02:00") == want(lambda d: d["created_at"] >= since)
    assert ids(since="2025-05-12") == want(lambda d: d["created_at"] >= day +
                                           dt.timedelta(days=2))
    both = ids(status="done", url="http://files.test/b", since="2025-05-11")
    assert both == want(lambda d: d["status"] == "done" and d["url"].endswith("/b")
                        and d["created_at"] >= day + dt.timedelta(days=1))
    assert both and ids(status="queued") == [] and ids(url="http://elsewhere.test/") == []
    # The next link keeps the filters.
    first = page(svc, status="failed", limit=3).json()["next"]
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(first).query)["status"] == ["failed"]


@pytest.mark.parametrize("params, needle", [
    ({"limit": "0"}, "limit must be a whole number from 1 to 1000"),
    ({"limit": "1001"}, "limit must be"),
    ({"limit": "abc"}, "limit must be"),
    ({"limit": "-5"}, "limit must be"),
    ({"limit": "2.5"}, "limit must be"),
    ({"limit": "١٠"}, "limit must be"),  # Arabic-Indic digits are digits to str.isdigit
    ({"status": "finished"}, "status must be one of queued, running, done, failed, cancelled"),
    ({"since": "yesterday"}, "since must be a date or time in ISO 8601"),
    ({"since": "9999-12-31T23:59:59-05:00"}, "since must be a date or time"),  # past 9999
    ({"after": "not-a-cursor"}, "after is not a cursor from this service"),
    ({"after": "MTIzLg"}, "after is not a cursor"),            # "123." : no id
    ({"after": "LTEyMy5hYmM"}, "after is not a cursor"),       # "-123.abc"
    ({"after": "x" * 300}, "after is not a cursor"),
    ({"url": "http://x.test/" + "a" * 2100}, "url is longer than 2048"),
])
def test_bad_list_parameters_get_400_with_a_sentence(service, params, needle):
    r = page(service, **params)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


def test_repeated_list_parameter_is_400_and_limit_1000_is_fine(service):
    r = requests.get(service.base + "/tasks?limit=5&limit=6", timeout=10)
    assert r.status_code == 400 and "limit given more than once" in r.json()["error"]
    assert page(service, limit=1000).status_code == 200
    assert page(service, limit=1).status_code == 200
    # Well-formed cursors at the ends of time: an answer, not a 500.
    for raw in (b"253402300799999.x", b"0.x", b"946684800000.x"):
        token = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        assert page(service, after=token, since="2000-01-01").status_code == 200


# -- cancelling ---------------------------------------------------------------


def test_cancel_queued_task_never_starts(make_service, slow):
    svc = api_only(make_service)
    key = uuid.uuid4().hex
    task_id = svc.submit(slow.url(key), email="secret.person@example.org")
    r = requests.delete(f"{svc.base}/tasks/{task_id}", timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "cancelled" and body["started_at"] is None
    assert body["finished_at"] and body["notification"]["status"] == "skipped"
    again = requests.delete(f"{svc.base}/tasks/{task_id}", timeout=10)
    assert again.status_code == 200 and again.json() == body  # idempotent
    check = svc.check(task_id)
    assert check.status_code == 410
    assert check.text == json.dumps({"status": "cancelled", "url": slow.url(key)},
                                    separators=(",", ":"))
    # Workers arrive: they run a later task, never the cancelled one.
    worker = make_service(role="worker", start=False, db_name=svc.db_name)
    worker.start(wait=False)
    other = svc.submit(slow.url(key + "-after"))
    assert svc.wait(other).status_code == 200
    assert slow.hits.get(key) is None
    assert svc.task(task_id)["status"] == "cancelled"


def test_cancel_running_download_closes_its_connection(make_service, slow):
    svc = make_service(WORKERS="1", METRICS_DB_INTERVAL="0")
    key = uuid.uuid4().hex
    # 60 s of trickle: only a cancel can end it early.
    task_id = svc.submit(slow.url(key, size=10_000_000, seconds=60))
    wait_for(lambda: key in slow.opened, what="the download to start")
    wait_for(lambda: svc.task(task_id)["bytes_done"] > 0, what="progress")
    asked = time.monotonic()
    r = requests.delete(f"{svc.base}/tasks/{task_id}", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert r.json()["started_at"] is not None
    wait_for(lambda: key in slow.closed, timeout=20, what="the connection to close")
    took = slow.closed[key] - asked
    print(f"connection closed {took:.2f} s after the cancel was asked")
    # Generous: the design's bound is a renewal (1 s) plus its round trip;
    # without the cancel the download would run on for a minute.
    assert took < 10
    # Not retried, not taken over, not overwritten, even after a lease.
    time.sleep(4)
    task = svc.task(task_id)
    assert task["status"] == "cancelled" and task["md5"] is None and task["attempts"] == 1
    assert slow.hits[key] == 1
    assert svc.check(task_id).status_code == 410
    assert "cancelled while running" in svc.log()
    metrics = wait_for(lambda: _cancelled_metric(svc), what="the cancel in /metrics")
    assert metrics == 1.0
    wait_for(lambda: re.search(r'md5light_tasks\{status="running"\} 0', requests.get(
        svc.base + "/metrics", timeout=10).text), what="no task left running")


def _cancelled_metric(svc: Service) -> float | None:
    text = requests.get(svc.base + "/metrics", timeout=10).text
    m = re.search(r'md5light_tasks_finished_total\{outcome="cancelled"\} (\S+)', text)
    return float(m.group(1)) if m else None


def test_delete_done_or_failed_is_409_and_unknown_is_404(service, files):
    done = service.submit(files.url("/bytes/100"))
    failed = service.submit(files.url("/status/404"))
    service.wait(done), service.wait(failed)
    for task_id, status in ((done, "done"), (failed, "failed")):
        r = requests.delete(f"{service.base}/tasks/{task_id}", timeout=10)
        assert r.status_code == 409, r.text
        assert r.json() == {"error": f"the task already ended as {status}; only a queued "
                                     "or running task can be cancelled"}
        assert service.task(task_id)["status"] == status
    for unknown in (str(uuid.uuid4()), "x" * 101):
        r = requests.delete(f"{service.base}/tasks/{unknown}", timeout=10)
        assert r.status_code == 404 and r.json() == {"status": "not_found"}
    r = requests.delete(f"{service.base}/tasks/{done}?notify=maybe", timeout=10)
    assert r.status_code == 400 and r.json() == {"error": "notify must be true or false"}


def test_cancels_racing_claims_end_each_task_once(make_service, slow):
    """Many cancels while two workers claim: each task ends once, as
    cancelled (before or while running) or as done when the cancel came too
    late (409), never done after a 200, and the queue counter comes back
    to zero."""
    svc = make_service(WORKERS="2", WORKER_CONCURRENCY="8")
    keys = [uuid.uuid4().hex for _ in range(120)]

    def submit_then_cancel(i: int) -> tuple[str, requests.Response]:
        # Two thirds take a second (the 16 slots fill, the queue grows),
        # one third is instant (claims race the cancel's read and write).
        task_id = svc.submit(slow.url(keys[i], size=20_000, seconds=1.0 if i % 3 else 0))
        # Every tenth waits long enough to find its task running even on a
        # loaded machine; the rest race the claim.
        time.sleep(random.uniform(0.3, 0.9) if i % 10 == 1 else random.uniform(0, 0.05))
        return task_id, requests.delete(f"{svc.base}/tasks/{task_id}", timeout=30)

    with ThreadPoolExecutor(8) as pool:
        ids, answers = zip(*pool.map(submit_then_cancel, range(len(keys))), strict=True)
    assert {a.status_code for a in answers} <= {200, 409}
    final = svc.wait_all(ids, timeout=120)
    before_start = while_running = too_late = 0
    for key, task_id, answer in zip(keys, ids, answers, strict=True):
        task = svc.task(task_id)
        if answer.status_code == 200:
            assert task["status"] == "cancelled" and final[task_id].status_code == 410
            assert answer.json()["status"] == "cancelled"
            if task["started_at"] is None:
                before_start += 1
                assert key not in slow.hits  # never downloaded
            else:
                while_running += 1
        else:
            assert task["status"] == "done" and final[task_id].status_code == 200
            too_late += 1
        assert slow.hits.get(key, 0) <= 1  # never retried
    print(f"cancelled before start {before_start}, while running {while_running}, "
          f"too late {too_late}")
    assert before_start + while_running + too_late == len(ids)
    assert before_start > 0 and while_running > 0
    stats = tasks_of(svc)["stats"]
    wait_for(lambda: (stats.find_one({"_id": "tasks"}) or {}).get("queued") == 0,
             timeout=15, what="the queued counter to come back to 0")


def test_cancel_with_notify_sends_a_mail_and_without_sends_none(make_service, slow):
    smtp = SMTPServer(free_port()).start()
    try:
        svc = api_only(make_service, SMTP_HOST="127.0.0.1",
                       SMTP_PORT=str(smtp.controller.port), SMTP_TLS="none")
        quiet = svc.submit(slow.url("quiet"), email="a@example.com")
        loud = svc.submit(slow.url("loud"), email="b@example.com")
        r = requests.delete(f"{svc.base}/tasks/{quiet}", timeout=10)
        assert r.json()["notification"]["status"] == "cancelled"
        r = requests.delete(f"{svc.base}/tasks/{loud}", params={"notify": "true"}, timeout=10)
        assert r.json()["notification"]["status"] == "pending"
        worker = make_service(role="worker", start=False, db_name=svc.db_name,
                              SMTP_HOST="127.0.0.1", SMTP_PORT=str(smtp.controller.port),
                              SMTP_TLS="none")
        worker.start(wait=False)
        wait_for(lambda: smtp.messages, what="the mail asked for")
        wait_for(lambda: svc.task(loud)["notification"]["status"] == "sent", what="sent")
        time.sleep(1)
        assert [m["To"] for m in smtp.messages] == ["b@example.com"]
        assert "cancelled" in smtp.messages[0]["Subject"]
        assert "was not computed: the task was cancelled" in smtp.messages[0].get_content()
        assert svc.task(quiet)["notification"]["status"] == "cancelled"
    finally:
        smtp.stop()


# -- the command line ---------------------------------------------------------


def _default_sigint() -> None:
    # A shell's background job inherits SIGINT ignored, and Python then
    # raises no KeyboardInterrupt: the test must not depend on how it was started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(svc: Service, url: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, MD5LIGHT_URL=svc.base)
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), "submit", url, "--wait"],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            preexec_fn=_default_sigint, **popen)


def _task_id_from(proc: subprocess.Popen) -> str:
    line = proc.stderr.readline().decode()
    assert line.startswith("task "), line
    return line.split()[1]


def test_cli_ctrl_c_without_a_terminal_exits_130_and_does_not_cancel(make_service, slow):
    svc = api_only(make_service)
    proc = _cli(svc, slow.url(uuid.uuid4().hex), stdin=subprocess.DEVNULL)
    task_id = _task_id_from(proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert "was not cancelled (no terminal to ask on)" in err.decode()
    assert svc.task(task_id)["status"] == "queued"


@pytest.mark.parametrize("answer, status", [(b"y\n", "cancelled"), (b"n\n", "queued")])
def test_cli_ctrl_c_on_a_terminal_asks_whether_to_cancel(make_service, slow, answer, status):
    svc = api_only(make_service)
    leader, follower = pty.openpty()
    try:
        proc = _cli(svc, slow.url(uuid.uuid4().hex), stdin=follower)
        task_id = _task_id_from(proc)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        prompt = b""
        while b"[y/N]" not in prompt:
            chunk = proc.stderr.read1(1024)
            assert chunk, f"the command ended without asking: {prompt!r}"
            prompt += chunk
        assert f"Cancel task {task_id}?".encode() in prompt
        os.write(leader, answer)
        _, err = proc.communicate(timeout=20)
    finally:
        os.close(leader)
        os.close(follower)
    assert proc.returncode == 130
    assert svc.task(task_id)["status"] == status
    said = f"task {task_id} cancelled" if status == "cancelled" else "keeps running"
    assert said in err.decode()


# -- the README ---------------------------------------------------------------


def test_readme_cancelled_today_query_through_mongosh(make_service):
    mongosh = os.environ.get("MONGOSH") or str(ROOT / ".tools/node_modules/.bin/mongosh")
    assert Path(mongosh).exists(), "make test installs mongosh from npm"
    text = (ROOT / "README.md").read_text()
    section = text.split("## Task history in the Mongo shell", 1)[1]
    query = re.findall(r"```js\n(.*?)```", section, re.S)[1].strip()
    svc = api_only(make_service)
    today = [svc.submit(f"http://files.test/{i}") for i in range(3)]
    for task_id in today[:2]:
        assert requests.delete(f"{svc.base}/tasks/{task_id}", timeout=10).status_code == 200
    yesterday = stored("http://files.test/old", dt.datetime.now(dt.UTC) - dt.timedelta(days=2),
                       Status.CANCELLED)
    tasks_of(svc)["tasks"].insert_one(yesterday)
    out = subprocess.run([mongosh, svc.env["MONGODB_URI"], "--quiet", "--json=relaxed",
                          "--eval", query], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    rows = json.loads(out.stdout)
    assert sorted(r["_id"] for r in rows) == sorted(today[:2])
