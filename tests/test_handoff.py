"""The API hands tasks to its own workers (runtime/handoff.py): to a worker
with room, a task is stored already claimed (no claim write); otherwise it
waits in the API and is handed over, in order, when a slot frees (claimed
by id, no scan). Each test runs the same thing with HANDOFF=0 as the
control, so it fails if the handoff does nothing. What the database did is
read from its own profiler (system.profile), every statement of it."""

from __future__ import annotations

import pytest
from pymongo import MongoClient
from servicectl import Service, wait_for

from fileserver import md5_of


def _statements(db, since: int) -> list[dict]:
    return [p for p in db["system.profile"].find().sort("ts", 1)][since:]


def _task_updates(db, entries: list[dict]) -> list[dict]:
    return [p for p in entries if p.get("op") == "update" and p.get("ns") == f"{db.name}.tasks"]


def _scans(db, entries: list[dict]) -> list[dict]:
    """Claim scans: reads of the tasks collection by lane."""
    return [p for p in entries if p.get("op") == "query" and p.get("ns") == f"{db.name}.tasks"
            and "lane" in ((p.get("command") or {}).get("filter") or {})]


@pytest.fixture
def profiled(mongo, logs):
    """Start a service with ``env`` and the profiler on its database."""
    started: list[Service] = []

    def start(**env: str):
        svc = Service(mongo, logs, **env).start()
        started.append(svc)
        db = MongoClient(f"{mongo}/{svc.db_name}").get_default_database()
        db.command("profile", 2)
        # The workers have reported their room once they scanned idle.
        wait_for(lambda: len(_scans(db, _statements(db, 0))) >= 2, 10, "the workers' first scans")
        return svc, db

    yield start
    Service.stop_all(started)


@pytest.mark.parametrize("handoff", ["1", "0"])
def test_a_task_for_an_idle_worker_is_stored_claimed(profiled, files, handoff):
    svc, db = profiled(WORKERS="1", HANDOFF=handoff)
    before = len(_statements(db, 0))
    task_id = svc.submit(files.url("/bytes/5000"))
    r = svc.wait(task_id)
    assert r.status_code == 200
    assert r.json()["md5"] == md5_of(5000)
    wait_for(lambda: len(_task_updates(db, _statements(db, before))) >= 1, 5, "the end")
    updates = _task_updates(db, _statements(db, before))
    doc = db.tasks.find_one({"_id": task_id})
    assert doc["attempts"] == 1 and len(doc["history"]) == 1
    if handoff == "1":
        # The end is the only write of the task after its insert.
        assert len(updates) == 1, updates
    else:
        assert len(updates) == 2, updates  # the claim, then the end


@pytest.mark.parametrize("handoff", ["1", "0"])
def test_waiting_tasks_are_handed_over_in_order_without_scans(profiled, files, handoff):
    svc, db = profiled(WORKERS="1", WORKER_CONCURRENCY="1", HANDOFF=handoff)
    slow = svc.submit(files.url("/slow/4000?parts=4&delay=0.4"))
    wait_for(lambda: (db.tasks.find_one({"_id": slow}) or {}).get("status") == "running", 5,
             "the slow task to run")
    before = len(_statements(db, 0))
    sizes = [1000 + i for i in range(6)]
    ids = [svc.submit(files.url(f"/bytes/{n}")) for n in sizes]
    answers = svc.wait_all([slow, *ids], timeout=60)
    for task_id, n in zip(ids, sizes, strict=True):
        assert answers[task_id].json()["md5"] == md5_of(n)
    docs = {d["_id"]: d for d in db.tasks.find({"_id": {"$in": ids}})}
    # One slot: they ran one after another; handed over, in the order they
    # came within each lane (a client's fifth unfinished task is in lane 1).
    order = sorted(ids, key=lambda t: (docs[t]["lane"], ids.index(t)))
    starts = [docs[task_id]["started_at"] for task_id in order]
    last_end = max(d["finished_at"] for d in docs.values())
    entries = [p for p in _statements(db, before) if p["ts"] <= last_end]
    scans = _scans(db, entries)
    if handoff == "1":
        assert starts == sorted(starts)
        # Handed over as the slot freed, without looking for them.
        assert len(scans) <= 1, [s.get("command") for s in scans]
    else:
        assert len(scans) >= len(ids), len(scans)  # one per freed slot
