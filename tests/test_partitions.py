"""Many hosts, one database (#18): fencing, partitions, flapping links and
clock skew.

The first tests run in-process against the real embedded database: two
claimers, and the writes of a stale claim refused. The rest build hosts in
network namespaces (tests/netns.py): the database and the API on one, a
worker on each of two more, the file and mail servers on the bridge; and
they cut, flap and restore the links between them. They skip, saying why,
where ``ip netns`` is not permitted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pymongo
import pytest
import requests
from aiosmtpd.controller import Controller
from fileserver import ThreadedServer, ThrottleHandler, make_app, md5_of
from netns import Network, why_not_permitted
from servicectl import ROOT, TEST_ENV, free_port
from smtpserver import Inbox
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from service import config as config_mod
from service.model.task import HISTORY_LIMIT, Status, Task, TaskError
from service.model.views import task_view
from service.runtime.embedded_db import daemon_path
from service.storage.queue import Lease
from service.storage.store import open_store

# -- fencing, in-process ------------------------------------------------------


def _stores(mongo: str, lease: float = 0.5):
    config = config_mod.load(None, {"LEASE_SECONDS": str(lease), "MAX_ATTEMPTS": "20"})
    uri = f"{mongo}/t_fence_{uuid.uuid4().hex[:8]}"
    return open_store(config, uri), open_store(config, uri)


async def _expire(store, task_id: str) -> None:
    """Wait until the task's lease ran out on the database's clock."""
    for _ in range(100):
        doc = await store.cols.tasks.find_one({"_id": task_id})
        if doc["lease_until"] < store.clock.now():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"lease never expired: {doc}")


def test_a_stale_claim_writes_nothing(mongo):
    """A claims, goes silent past its lease, B takes the task over: A's
    renew, result and retry are all refused, B's result is the one kept,
    and the history tells who did what."""

    async def main():
        a, b = _stores(mongo)
        try:
            await a.ensure_indexes()
            await a.clock.sync()
            await b.clock.sync()
            created = Task.new("http://h.test/big", None, False)
            await a.records.create(created)
            [held_by_a] = await a.queue.claim("A", 1)
            assert held_by_a.claim and held_by_a.attempts == 1
            assert await a.queue.renew(held_by_a, "A", 10, 100) is Lease.HELD
            await _expire(a, created.id)
            [held_by_b] = await b.queue.claim("B", 1)
            assert held_by_b.id == created.id and held_by_b.attempts == 2
            assert held_by_b.claim not in (None, held_by_a.claim)

            assert await a.queue.renew(held_by_a, "A", 99, 100) is Lease.LOST
            assert await a.queue.finish(held_by_a, "A", digests={"md5": "a" * 32}) is None
            assert not await a.queue.retry_later(held_by_a, "A", 0, TaskError("timeout", "x"))
            doc = await a.cols.tasks.find_one({"_id": created.id})
            assert (doc["status"], doc["worker"], doc["bytes_done"]) == ("running", "B", 10)

            assert await b.queue.renew(held_by_b, "B", 50, 100) is Lease.HELD
            assert await b.queue.finish(held_by_b, "B", digests={"md5": "b" * 32}, bytes_done=100,
                                        bytes_total=100) == []
            done = await a.records.get(created.id)
            assert done.status == Status.DONE and done.md5 == "b" * 32
            view = task_view(done)
            assert [(h["worker"], h["outcome"]) for h in view["history"]] == \
                [("A", "lease_lost"), ("B", "done")]
            assert view["finished_by"] == "B" and view["attempts"] == 2
            assert all(h["started_at"] and h["ended_at"] for h in view["history"])
            assert "claim" not in str(view["history"])
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_the_same_worker_name_does_not_pass_the_fence(mongo):
    """Worker names can repeat (a restarted process on a host that reuses
    pids, two namespaces with one hostname): the claim token, not the
    name, decides. A worker that takes its own expired task over again
    cannot be written to by the old attempt."""

    async def main():
        a, _ = _stores(mongo)
        try:
            await a.ensure_indexes()
            created = Task.new("http://h.test/f", None, False)
            await a.records.create(created)
            [first] = await a.queue.claim("W", 1)
            await _expire(a, created.id)
            [second] = await a.queue.claim("W", 1)
            assert second.claim != first.claim
            assert await a.queue.renew(first, "W", 1, None) is Lease.LOST
            assert await a.queue.finish(first, "W", digests={"md5": "1" * 32}) is None
            assert await a.queue.finish(second, "W", digests={"md5": "2" * 32}) == []
            assert (await a.records.get(created.id)).md5 == "2" * 32
        finally:
            await a.close()

    asyncio.run(main())


def test_retries_get_fresh_tokens_and_a_bounded_history(mongo):
    """Every claim of a retried task sets a new token; the history keeps
    the last HISTORY_LIMIT attempts; a retried task is left to other
    workers for a moment, then taken by the same one if nobody came."""

    async def main():
        a, b = _stores(mongo)
        try:
            await a.ensure_indexes()
            created = Task.new("http://h.test/f", None, False)
            await a.records.create(created)
            tokens = set()
            for _ in range(HISTORY_LIMIT + 3):
                [held] = await a.queue.claim("A", 1)
                tokens.add(held.claim)
                assert await a.queue.retry_later(held, "A", 0, TaskError("timeout", "slow"))
                # A just failed it: another worker gets it first ...
                assert await a.queue.claim("A", 1) == []
                [held] = await b.queue.claim("B", 1)
                tokens.add(held.claim)
                assert await b.queue.retry_later(held, "B", 0, TaskError("timeout", "slow"))
            assert len(tokens) == 2 * (HISTORY_LIMIT + 3)
            doc = await a.cols.tasks.find_one({"_id": created.id})
            assert len(doc["history"]) == HISTORY_LIMIT
            assert {h["outcome"] for h in doc["history"]} == {"retry"}
            assert doc["history"][-1]["worker"] == "B"
            # ... and after a while, with nobody else, the same worker does.
            assert await b.queue.claim("B", 1) == []
            await asyncio.sleep(2.2)
            [held] = await b.queue.claim("B", 1)
            assert held.worker == "B"
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_leases_are_set_on_the_database_clock(mongo):
    """lease_until comes from the server's $$NOW, whatever the worker's
    clock says: it lies LEASE_SECONDS after the server's time."""

    async def main():
        a, _ = _stores(mongo, lease=30)
        try:
            await a.ensure_indexes()
            created = Task.new("http://h.test/f", None, False)
            await a.records.create(created)
            [held] = await a.queue.claim("A", 1)
            reply = await a.cols.db.command("hello")
            doc = await a.cols.tasks.find_one({"_id": created.id})
            server_now = reply["localTime"].replace(tzinfo=doc["lease_until"].tzinfo)
            lease_left = (doc["lease_until"] - server_now).total_seconds()
            assert 25 < lease_left <= 30, lease_left
            assert doc["claimed_at"] <= server_now
        finally:
            await a.close()

    asyncio.run(main())


def test_clock_offset_is_measured(mongo):
    async def main():
        a, _ = _stores(mongo)
        try:
            await a.clock.sync()
            # Same host, same clock: the offset is the measurement's error.
            assert abs(a.clock.offset.total_seconds()) < 1.0
        finally:
            await a.close()

    asyncio.run(main())


# -- hosts in network namespaces ----------------------------------------------

LEASE = 3.0
MAX_ATTEMPTS = 3


class BridgeFiles(ThreadedServer):
    """The test file server, on the bridge's address, with /throttle."""

    def _run(self) -> None:
        async def main() -> None:
            app = make_app()
            app.add_handlers(r".*", [(r"/throttle/([\w-]+)/(\d+)", ThrottleHandler)])
            sockets = bind_sockets(0, self.host, family=socket.AF_INET)
            self.port = sockets[0].getsockname()[1]
            HTTPServer(app).add_sockets(sockets)
            self._ready.set()
            await asyncio.Event().wait()

        asyncio.run(main())


class Cluster:
    """Host db runs SecantusDB and the API; hosts A and B run a worker
    each; the test's process serves files and mail on the bridge."""

    def __init__(self, net: Network, workdir: Path):
        self.net, self.workdir = net, workdir
        self.db_host = net.add_host("db")
        self.hosts = {"A": net.add_host("A"), "B": net.add_host("B")}
        self.files = BridgeFiles(net.gateway).start()
        self.inbox = Inbox()
        self.smtp = Controller(self.inbox, hostname=net.gateway, port=free_port())
        self.smtp.start()
        self.db_name = f"t_parts_{uuid.uuid4().hex[:8]}"
        self.uri = f"mongodb://{self.db_host.address}:27017/{self.db_name}"
        self.api = f"http://{self.db_host.address}:8000"
        self.workers: dict[str, subprocess.Popen] = {}
        self.db = pymongo.MongoClient(self.uri, tz_aware=True, serverSelectionTimeoutMS=5000)
        self.tasks = self.db.get_default_database()["tasks"]

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(TEST_ENV)
        env.update({"ALLOW_PRIVATE_URLS": "0", "ALLOW_NETWORKS": self.net.subnet,
                    "LEASE_SECONDS": str(LEASE), "MAX_ATTEMPTS": str(MAX_ATTEMPTS),
                    "MONGODB_URI": self.uri, "SMTP_HOST": self.net.gateway,
                    "SMTP_PORT": str(self.smtp.port), "SMTP_TLS": "none",
                    "HOST": self.db_host.address, "PORT": "8000"})
        env.update(extra)
        return env

    def start(self) -> None:
        data = self.workdir / "db"
        data.mkdir()
        (data / "secantusd.toml").write_text("")
        self.db_host.spawn(
            [daemon_path(), "--config", str(data / "secantusd.toml"),
             "--host", self.db_host.address, "--port", "27017",
             "--storage-path", str(data / "db"), "--sync-on-commit", "--standalone",
             "--log-level", "WARNING"], dict(os.environ), self.workdir / "db.log", cwd=data)
        self.db.admin.command("ping")  # waits for it (server selection)
        self.db_host.spawn([sys.executable, str(ROOT / "run.py"), "api"], self.env(),
                           self.workdir / "api.log", cwd=ROOT)
        _wait(lambda: _answers(self.api + "/check?id=x"), 60, "the API to answer")
        for name in self.hosts:
            self.start_worker(name)
        for name in self.hosts:
            _wait(lambda n=name: self.db.get_default_database()["workers"].find_one(
                {"_id": self.name(n)}), 60, f"worker {name}'s first heartbeat")

    def start_worker(self, name: str, host: str | None = None, **env: str) -> None:
        self.workers[name] = self.hosts[host or name].spawn(
            [sys.executable, str(ROOT / "run.py"), "worker"], self.env(**env),
            self.log_path(name), cwd=ROOT)

    def log_path(self, name: str) -> Path:
        return self.workdir / f"worker-{name}.log"

    def log(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    def name(self, worker: str) -> str:
        return f"{socket.gethostname()}:{self.workers[worker].pid}"

    def pause(self, worker: str) -> None:
        os.kill(self.workers[worker].pid, signal.SIGSTOP)

    def resume(self, worker: str) -> None:
        os.kill(self.workers[worker].pid, signal.SIGCONT)

    def submit(self, url: str, email: str | None = None) -> str:
        data = {"url": url, **({"email": email} if email else {})}
        r = requests.post(self.api + "/submit", data=data, timeout=30)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def view(self, task_id: str) -> dict:
        r = requests.get(f"{self.api}/tasks/{task_id}", timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def wait_doc(self, task_id: str, ok, timeout: float = 60, what: str = "") -> dict:
        deadline = time.monotonic() + timeout
        while True:
            doc = self.tasks.find_one({"_id": task_id})
            if doc is not None and ok(doc):
                return doc
            if time.monotonic() > deadline:
                raise AssertionError(f"task {task_id}: not {what} after {timeout} s: {doc}")
            time.sleep(0.1)

    def close(self) -> None:
        self.db.close()
        self.smtp.stop()


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=1)
        return True
    except requests.RequestException:
        return False


def _wait(ok, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = why_not_permitted()
    if reason:
        pytest.skip(f"namespace tests need root and ip netns: {reason}")
    net = Network()
    cluster = None
    try:
        cluster = Cluster(net, tmp_path_factory.mktemp("netns"))
        cluster.start()
        yield cluster
    finally:
        net.close()  # processes, veths, namespaces, bridge: even after a failure
        if cluster is not None:
            cluster.close()


@pytest.fixture
def links(cluster):
    """Every link a test cut is whole again after it, pass or fail; a
    paused worker runs again."""
    yield cluster.net
    cluster.net.heal_all()
    for proc in cluster.workers.values():
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)


def test_partition_fences_the_cut_off_worker(cluster, links):
    """A downloads a big throttled file; its link to the database (only)
    is cut for 2 x LEASE_SECONDS. B takes the task over; when the link
    returns A's renewal is refused, A hangs up on the file server at once,
    and the task ends once, by B, with the right digest and one mail."""
    c = cluster
    size, seed, key = 4 * 1024 * 1024, 5, uuid.uuid4().hex[:12]
    c.pause("B")  # so that A claims it
    task_id = c.submit(c.files.url(f"/throttle/{key}/{size}?parts=80&delay=0.25&seed={seed}"),
                       email="ops@example.com")
    c.wait_doc(task_id, lambda d: d["worker"] == c.name("A") and d["bytes_done"] > 0,
               what="downloading on A")
    c.resume("B")
    links.cut("A", "db")
    cut_at = time.monotonic()
    taken = c.wait_doc(task_id, lambda d: d["worker"] == c.name("B"), timeout=30,
                       what="taken over by B")
    assert taken["attempts"] == 2 and taken["status"] == "running"
    time.sleep(max(0.0, cut_at + 2 * LEASE - time.monotonic()))
    a_requests = [r for r in ThrottleHandler.requests[key] if r["peer"] == c.hosts["A"].address]
    assert len(a_requests) == 1 and not a_requests[0]["hung_up"], \
        "A should still be downloading while it is cut off from the database"
    links.heal("A", "db")
    healed_at = time.monotonic()

    _wait(lambda: a_requests[0]["hung_up"], 30, "A to stop its download")
    stopped_after = a_requests[0]["ended_at"] - healed_at
    assert a_requests[0]["sent"] < size
    _wait(lambda: f"task {task_id}: lease lost" in c.log("A"), 10, "A to log its lost lease")

    doc = c.wait_doc(task_id, lambda d: d["status"] == "done", timeout=120, what="done")
    assert doc["md5"] == md5_of(size, seed) and doc["bytes_done"] == size
    view = c.view(task_id)
    assert [(h["worker"], h["outcome"]) for h in view["history"]] == \
        [(c.name("A"), "lease_lost"), (c.name("B"), "done")]
    assert view["finished_by"] == c.name("B") and view["attempts"] == 2
    assert f"task {task_id} done" not in c.log("A")

    def mails() -> list:
        return [m for m in c.inbox.messages if m["X-md5-light-Task"] == task_id]
    _wait(lambda: len(mails()) >= 1, 60, "the mail")
    time.sleep(3)  # room for a second mail, which must not come
    assert len(mails()) == 1
    print(f"\nA stopped its download {stopped_after:.2f} s after its link returned")


def test_a_worker_that_cannot_reach_the_file_server_leaves_it_to_another(cluster, links):
    """A reaches the database but not the file server: its tries fail as
    transient (connect timeout), and each task is retried on B within
    MAX_ATTEMPTS, not failed."""
    c = cluster
    c.pause("B")
    links.cut("A", "gateway")
    sizes = {uuid.uuid4().hex[:8]: 100_000 + i for i in range(3)}
    ids = {c.submit(c.files.url(f"/count/{key}/{size}?seed=11")): (key, size)
           for key, size in sizes.items()}
    for task_id in ids:
        c.wait_doc(task_id, lambda d: d["worker"] == c.name("A"), what="claimed by A")
    c.resume("B")
    for task_id, (_key, size) in ids.items():
        doc = c.wait_doc(task_id, lambda d: d["status"] in ("done", "failed"), timeout=90,
                         what="finished")
        assert doc["status"] == "done" and doc["md5"] == md5_of(size, 11), doc
        assert doc["attempts"] <= MAX_ATTEMPTS
        outcomes = [(h["worker"], h["outcome"]) for h in doc["history"]]
        assert outcomes[0] == (c.name("A"), "retry") and outcomes[-1] == (c.name("B"), "done")
        assert all(worker == c.name("A") for worker, _ in outcomes[:-1]), outcomes
        why = [line for line in c.log("A").splitlines() if f"task {task_id} attempt" in line]
        print(f"\n{task_id}: {[o for _, o in outcomes]}; A: {why[-1].split(': ', 1)[-1]}")


def test_a_fast_clock_does_not_steal_live_leases(cluster, links):
    """Worker C's clock runs 30 s ahead (MD5LIGHT_CLOCK_OFFSET, a test
    hook): by its own clock B's lease ran out long ago. Leases follow the
    database's clock, so C leaves B's task alone."""
    c = cluster
    size, key = 1024 * 1024, uuid.uuid4().hex[:12]
    c.pause("A")
    c.start_worker("C", host="A", MD5LIGHT_CLOCK_OFFSET="30")
    try:
        _wait(lambda: "database clock offset" in c.log("C"), 60, "C to start")
        offset = float(c.log("C").split("database clock offset ")[1].split()[0])
        assert -31 < offset < -29, offset  # C's clock really is 30 s ahead
        task_id = c.submit(c.files.url(f"/throttle/{key}/{size}?parts=40&delay=0.25"))
        c.wait_doc(task_id, lambda d: d["status"] == "running", what="running")
        doc = c.tasks.find_one({"_id": task_id})
        if doc["worker"] != c.name("B"):
            pytest.fail(f"C claimed a fresh task, which is fine but leaves nothing to test: {doc}")
        # B renews its 3 s lease every second; C polls every 0.5 s and would
        # take a lease it thought expired as soon as it saw one.
        watch_until = time.monotonic() + 3 * LEASE
        while time.monotonic() < watch_until:
            doc = c.tasks.find_one({"_id": task_id})
            assert doc["worker"] == c.name("B") and doc["attempts"] == 1, doc
            time.sleep(0.2)
        doc = c.wait_doc(task_id, lambda d: d["status"] == "done", timeout=60, what="done")
        assert [h["worker"] for h in doc["history"]] == [c.name("B")]
        assert doc["md5"] == md5_of(size)
    finally:
        c.workers["C"].terminate()
        c.workers["C"].wait(30)
        c.resume("A")


def test_flapping_database_link_loses_and_repeats_nothing(cluster, links):
    """500 small, slowish files while both workers' links to the database
    drop for 1 s every 5 s: every task ends once, done, with the right
    md5. (Downloads may repeat: processing is at least once.)"""
    c = cluster
    prefix, n = uuid.uuid4().hex[:8], 500
    stop = threading.Event()
    flaps = []

    def flap() -> None:
        while not stop.wait(4.0):
            flaps.append(time.monotonic())
            links.cut("A", "db")
            links.cut("B", "db")
            stop.wait(1.0)
            links.heal("A", "db")
            links.heal("B", "db")

    flapper = threading.Thread(target=flap, daemon=True)
    flapper.start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(
                # Each takes about 1.5 s, so many downloads span a flap.
                lambda i: c.submit(c.files.url(
                    f"/throttle/{prefix}-{i}/{1000 + i}?seed={i}&parts=4&delay=0.5")),
                range(n)))
        deadline = time.monotonic() + 400
        while c.tasks.count_documents({"_id": {"$in": ids}, "status": "done"}) < n:
            assert c.tasks.count_documents({"_id": {"$in": ids}, "status": "failed"}) == 0, \
                c.tasks.find_one({"_id": {"$in": ids}, "status": "failed"})
            assert time.monotonic() < deadline, "tasks unfinished after 400 s"
            time.sleep(1)
    finally:
        stop.set()
        flapper.join(10)
    took = time.monotonic() - started
    docs = {d["_id"]: d for d in c.tasks.find({"_id": {"$in": ids}})}
    assert len(docs) == n == len(set(ids))
    for i, task_id in enumerate(ids):
        doc = docs[task_id]
        assert doc["status"] == "done" and doc["md5"] == md5_of(1000 + i, i), doc
        assert [h["outcome"] for h in doc["history"]].count("done") == 1, doc["history"]
    hits = [len(ThrottleHandler.requests.get(f"{prefix}-{i}", [])) for i in range(n)]
    taken_over = sum(1 for d in docs.values() if d["attempts"] > 1)
    print(f"\n{n} tasks in {took:.0f} s through {len(flaps)} flaps: 0 lost, 0 duplicated; "
          f"{taken_over} taken over after a lost lease, {sum(h > 1 for h in hits)} downloaded "
          f"more than once")
