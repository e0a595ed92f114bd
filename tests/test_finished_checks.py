"""/check answers ended tasks from the API's memory (#17): the pool's
workers report every end they record through a pipe. Those answers must
be the ones the stored task gives, and must cost the database nothing."""

from __future__ import annotations

import json
import urllib.parse
import uuid

import pytest
import requests
from fileserver import md5_of
from pymongo import MongoClient
from servicectl import wait_for

from service.model.task import Task
from service.model.views import check_view


def database(svc):
    return MongoClient(svc.env["MONGODB_URI"], tz_aware=True).get_default_database()


def ended(svc, **data) -> str:
    r = requests.post(svc.base + "/submit", data=data, timeout=30)
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]
    # Waited for through /tasks/<id>, which always reads the database.
    wait_for(lambda: svc.task(task_id)["status"] in ("done", "failed"), 60, "the task's end")
    return task_id


@pytest.mark.parametrize("data", [
    {"path": "/bytes/3000"},
    {"path": "/bytes/3001", "algorithms": "sha256,sha512"},
    {"path": "/bytes/3002", "expected": "sha256:" + "0" * 64},
    {"path": "/bytes/3003", "expected": "md5:" + md5_of(3003)},
    {"path": "/status/404"},
], ids=["md5", "digests", "mismatch", "verified", "failed"])
def test_an_ended_tasks_answer_is_the_stored_tasks_answer(service, files, data):
    data = dict(data)
    task_id = ended(service, url=files.url(data.pop("path")), **data)
    doc = database(service).tasks.find_one({"_id": task_id})
    status, body = check_view(Task.from_doc(doc))
    r = service.check(task_id)
    assert (r.status_code, r.json()) == (status, body)
    if data.get("algorithms") is None and status == 200 and "expected" not in data:
        # The original contract, byte for byte.
        assert r.text == json.dumps({"md5": doc["md5"], "status": "done", "url": doc["url"]},
                                    separators=(",", ":"))


def test_checking_an_ended_task_reads_nothing_from_the_database(service, files):
    task_id = ended(service, url=files.url("/bytes/4000"))
    admin = database(service).client.admin

    def queries() -> int:
        return admin.command("serverStatus")["opcounters"]["query"]

    wait_for(lambda: service.check(task_id).status_code == 200, 10, "the answer")
    before = queries()
    for _ in range(100):
        assert service.check(task_id).json()["md5"] == md5_of(4000)
    # The idle workers' own polls read a few times a second; a read per
    # check would be 100 more.
    assert queries() - before < 30


def test_polling_an_unfinished_task_reads_the_database_about_once_a_second(service, files):
    r = requests.post(service.base + "/submit", timeout=30,
                      data={"url": files.url("/slow/5000?parts=5&delay=2")})
    task_id = r.json()["id"]
    admin = database(service).client.admin
    before = admin.command("serverStatus")["opcounters"]["query"]
    for _ in range(100):
        r = service.check(task_id)
        assert (r.status_code, r.json()) == (202, {"status": "running"})
        assert r.headers["Retry-After"] == "1"
    # Well under a second of polling: one read, plus the idle workers' own.
    assert admin.command("serverStatus")["opcounters"]["query"] - before < 30


def test_a_cancel_shows_at_once_in_check(service, files):
    r = requests.post(service.base + "/submit", timeout=30,
                      data={"url": files.url("/slow/5000?parts=5&delay=2")})
    task_id = r.json()["id"]
    assert service.check(task_id).status_code == 202  # now remembered as unfinished
    assert requests.delete(f"{service.base}/tasks/{task_id}", timeout=30).status_code == 200
    assert service.check(task_id).json() == {"status": "cancelled", "url": files.url(
        "/slow/5000?parts=5&delay=2")}


def test_ids_we_never_hand_out_are_answered_without_the_database(service):
    # Ours are random UUIDs in canonical form; the last is one, uppercased.
    strangers = ["not-a-task", "x" * 500, "{%s}" % uuid.uuid4(), str(uuid.uuid4()).upper()]
    admin = database(service).client.admin
    before = admin.command("serverStatus")["opcounters"]["query"]
    for _ in range(25):
        for name in strangers:
            r = requests.get(service.base + "/check", params={"id": name}, timeout=10)
            assert (r.status_code, r.json()) == (404, {"status": "not_found"})
            quoted = urllib.parse.quote(name, safe="")
            for method, path in (("GET", f"/tasks/{quoted}"), ("DELETE", f"/tasks/{quoted}"),
                                 ("GET", f"/tasks/{quoted}/events"),
                                 ("GET", f"/manifests/{quoted}")):
                r = requests.request(method, service.base + path, timeout=10)
                assert r.status_code == 404, (method, path, r.status_code)
    # 500 requests; a read each would be 500 more, the idle workers' own
    # polls are a few a second.
    assert admin.command("serverStatus")["opcounters"]["query"] - before < 60
