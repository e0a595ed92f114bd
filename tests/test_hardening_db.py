"""The database under stress: the embedded database killed under load comes
back by itself, and /metrics cannot add load to the database however many
scrape it. Real processes throughout: run.py, SecantusDB, HTTP servers."""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from pymongo import MongoClient

from fileserver import md5_of
from servicectl import Service
from test_ops import _metric

# A correctness bound with room for a loaded machine, not a speed target:
# the service answers within about one second during an outage.
OUTAGE_ANSWER_LIMIT = 2.0


def _database_pid(data_dir: Path) -> int | None:
    """The embedded database serving ``data_dir`` (secantusd-py, or the
    patched launcher running it), found in /proc by its command line."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith((b"secantusd-py", b"embedded_patches.py")) for a in argv) and any(
                str(data_dir).encode() in a for a in argv):
            return int(entry.name)
    return None


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _timed(method: str, url: str, **kwargs) -> tuple[requests.Response, float]:
    t0 = time.monotonic()
    r = requests.request(method, url, timeout=15, **kwargs)
    return r, time.monotonic() - t0


def test_embedded_database_killed_under_load_comes_back(tmp_path, logs, files):
    data_dir = (tmp_path / "data").resolve()
    svc = Service(None, logs, DATA_DIR=str(data_dir), WORKERS="2")
    svc.env.pop("MONGODB_URI", None)
    svc.start()
    try:
        expected = {}
        for i in range(20):
            size = 100000 + i
            expected[svc.submit(files.url(f"/slow/{size}?parts=10&delay=0.3&seed={i}"))] = \
                md5_of(size, i)
        probes = {
            "health": ("GET", svc.base + "/health", {}),
            # An id only the database can answer for (404 when it is up):
            # /check answers what it already knows from memory, outage or not.
            "check": ("GET", svc.base + "/check", {"params": {"id": str(uuid.uuid4())}}),
            "submit": ("POST", svc.base + "/submit", {"data": {"url": files.url("/bytes/4321?seed=7")}}),
        }
        seen_503: set[str] = set()
        kills = 0
        # The database comes back within about a second; kill it again until
        # every endpoint has been caught answering in an outage (each quick
        # death also lengthens the next outage: the back-off).
        while seen_503 != set(probes) and kills < 5:
            pid = _wait_for(lambda: _database_pid(data_dir), 60, "the database process")
            os.kill(pid, signal.SIGKILL)
            kills += 1
            while True:
                for name, (method, url, kwargs) in probes.items():
                    r, took = _timed(method, url, **kwargs)
                    assert took < OUTAGE_ANSWER_LIMIT, (name, r.status_code, took)
                    assert r.status_code in (503, 200, 202, 404), (name, r.status_code, r.text)
                    if r.status_code == 503:
                        seen_503.add(name)
                        assert "error" in r.json() or name == "health"
                    elif name == "submit":
                        # Accepted while the database was back: it must finish too.
                        expected[r.json()["id"]] = md5_of(4321, 7)
                if seen_503 == set(probes) or _healthy(svc):
                    break
        assert seen_503 == set(probes), f"no outage seen by {set(probes) - seen_503}"

        # Back by itself, on the same data: every accepted task ends done.
        _wait_for(lambda: _healthy(svc), 60, "/health to recover")
        results = svc.wait_all(list(expected), timeout=180)
        for task_id, md5 in expected.items():
            assert results[task_id].status_code == 200, results[task_id].text
            assert results[task_id].json()["md5"] == md5
        metrics = requests.get(svc.base + "/metrics", timeout=10).text
        # A kill that lands while the database is still starting fails that
        # launch, which is retried within the same restart: count restarts
        # as the log records them.
        restarts = svc.log().count("embedded database restarted")
        assert 1 <= restarts <= kills
        assert _metric(metrics, "md5light_database_restarts_total") == restarts
        assert svc.log().count("embedded database restarted") == kills
        assert "exited with -9; restarting in" in svc.log()
    finally:
        code = svc.stop()
    # Stopped cleanly: the database went down last and was not restarted.
    assert code == 0
    assert _database_pid(data_dir) is None
    assert not (data_dir / "mongodb.uri").exists()
    tail = svc.log().split("shutting down")[-1]
    assert "restart" not in tail, tail


def _healthy(svc: Service) -> bool:
    try:
        return requests.get(svc.base + "/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _top(client: MongoClient, namespace: str) -> dict[str, int]:
    """The database's own per-collection operation counts (mongod's `top`)."""
    totals = client.admin.command("top")["totals"].get(namespace, {})
    return {section: value["count"] for section, value in totals.items()}


def _queued_tasks(n: int, status: str = "queued") -> list[dict]:
    # Not runnable for a day (a retry back-off, or a lease held elsewhere):
    # the workers leave them alone, and they stay what they are.
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
    return [{"_id": str(uuid.uuid4()), "url": f"http://example.com/{i}", "email": None,
             "status": status, "md5": None, "error": None, "bytes_done": 0,
             "bytes_total": None, "attempts": 0 if status == "queued" else 1,
             "lease_until": later, "worker": None if status == "queued" else "elsewhere:1",
             "created_at": later, "started_at": None, "finished_at": None,
             "notification": {"status": "none", "attempts": 0, "error": None,
                              "sent_at": None, "next_at": None}}
            for i in range(n)]


def _scrape(svc: Service) -> str:
    r = requests.get(svc.base + "/metrics", timeout=30)
    assert r.status_code == 200
    return r.text


def _gauges(text: str) -> tuple[float, float, float]:
    return (_metric(text, "md5light_queue_depth"), _metric(text, 'md5light_tasks{status="running"}'),
            _metric(text, "md5light_tasks_stored"))


def test_concurrent_scrapes_share_one_database_read(mongo, logs, files):
    interval = 5.0
    db_name = f"scrape_{uuid.uuid4().hex[:8]}"
    client = MongoClient(mongo)
    tasks = client[db_name]["tasks"]
    for status, n in (("queued", 300), ("running", 5)):
        docs = _queued_tasks(n, status)
        for i in range(0, n, 1000):
            tasks.insert_many(docs[i:i + 1000])
    svc = Service(mongo, logs, db_name=db_name, WORKERS="1", WORKER_CONCURRENCY="2",
                  METRICS_DB_INTERVAL=str(interval)).start()
    try:
        # The first start recounts the tasks that are there (no counters yet).
        text = _wait_for(lambda: (lambda t: t if "md5light_queue_depth" in t else None)(
            _scrape(svc)), 60, "the first recount")
        assert _gauges(text) == (300, 5, 305)
        stats, task_ns = f"{db_name}.stats", f"{db_name}.tasks"

        def burst() -> tuple[list[str], float]:
            t0 = time.monotonic()
            with ThreadPoolExecutor(20) as pool:
                texts = list(pool.map(lambda _: _scrape(svc), range(20)))
            return texts, time.monotonic() - t0

        # Within the interval: all from the last read, no database work.
        before = _top(client, stats), _top(client, task_ns)
        texts, _ = burst()
        after = _top(client, stats), _top(client, task_ns)
        assert all(_gauges(t) == (300, 5, 305) for t in texts)
        assert after[0].get("queries") == before[0].get("queries")
        assert after[1].get("commands") == before[1].get("commands")

        # Past the interval: twenty concurrent scrapes, one read between them
        # (one more only if the burst itself outlasted an interval).
        time.sleep(interval + 0.5)
        before = _top(client, stats), _top(client, task_ns)
        texts, took = burst()
        after = _top(client, stats), _top(client, task_ns)
        reads = after[0]["queries"] - before[0]["queries"]  # one find_one per read
        assert 1 <= reads <= 1 + int(took / interval), (reads, took)
        # ... and that read did not count the queue: one count, of running tasks.
        assert after[1]["commands"] - before[1]["commands"] == reads
        assert all(_gauges(t) == (300, 5, 305) for t in texts)

        # New work shows within an interval: two downloads run (concurrency
        # 2), two wait, and the submits add to the tasks stored.
        for i in range(4):
            svc.submit(files.url(f"/slow/40000?parts=40&delay=0.5&seed={i}"))
        _wait_for(lambda: _gauges(_scrape(svc)) == (302, 7, 309), interval + 15,
                  "the new tasks in the gauges")
    finally:
        svc.stop()


def test_supervisor_leaves_a_data_dir_another_md5_light_took_alone(tmp_path, caplog):
    """Ours dies, another md5-light starts on the same DATA_DIR before the
    restart: the supervisor waits (and says why) instead of starting a rival
    daemon, and takes over once the other one is gone."""
    import asyncio
    import logging

    from service.runtime.embedded_db import DatabaseSupervisor, EmbeddedDatabase

    caplog.set_level(logging.INFO, logger="md5light.db")
    ours = EmbeddedDatabase(str(tmp_path / "data"))
    ours.start()
    theirs = EmbeddedDatabase(str(tmp_path / "data"))
    restarts = []

    async def scenario() -> None:
        supervisor = DatabaseSupervisor(ours, on_restart=lambda: restarts.append(1))
        ours.process.kill()
        ours.process.wait()
        theirs.start()
        supervisor.start()
        try:
            await asyncio.sleep(3)
            assert not restarts and ours.process.poll() is not None
            assert theirs.process.poll() is None
            assert MongoClient(theirs.uri, serverSelectionTimeoutMS=5000).admin.command("ping")
            theirs.stop()
            for _ in range(300):  # its back-off has grown meanwhile: up to 30 s
                if restarts:
                    break
                await asyncio.sleep(0.1)
            assert restarts == [1] and ours.process.poll() is None
        finally:
            await supervisor.stop()

    try:
        asyncio.run(scenario())
    finally:
        theirs.stop()
        ours.stop()
    assert f"{theirs.uri} now serves" in caplog.text
    assert (tmp_path / "data" / "mongodb.uri").exists() is False
