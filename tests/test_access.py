"""#24.3: API keys. A task id stays a bearer capability for its own task;
what is gone is every way to learn other clients' ids: GET /tasks lists a
key's own tasks (an operator's: all), ids of other clients' tasks are not
shown in links, Idempotency-Keys are per client, and an owned task is
cancelled only by its key. Keys are made by ``run.py keys``, stored hashed."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import requests
from pymongo import MongoClient

from fileserver import md5_of
from servicectl import ROOT


def keys(svc, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), "keys", *args], cwd=ROOT,
                          env=svc.env, capture_output=True, text=True, timeout=60)


def make_key(svc, name: str, *flags: str) -> str:
    made = keys(svc, "create", name, *flags)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("md5l_") and "not shown again" in made.stderr
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit(svc, url: str, token: str | None = None, **form) -> str:
    r = requests.post(svc.base + "/submit", data={"url": url, **form},
                      headers=bearer(token) if token else {}, timeout=10)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def listed(svc, token: str | None = None, **query) -> requests.Response:
    return requests.get(svc.base + "/tasks", params=query,
                        headers=bearer(token) if token else {}, timeout=10)


@pytest.fixture
def svc(make_service):
    # X-Forwarded-For lets a test speak from an address other than loopback.
    return make_service(CLIENT_IP_HEADER="X-Forwarded-For")


@pytest.fixture
def people(svc):
    # Made as `run.py keys create` makes them, without a process each (the
    # command itself is tested below and in the page's test).
    from service.model.keys import Role, new_key
    db = MongoClient(svc.env["MONGODB_URI"]).get_default_database()
    tokens = {}
    for name, role in (("alice", Role.USER), ("bob", Role.USER), ("operator", Role.OPERATOR)):
        key, tokens[name] = new_key(name, role)
        db["api_keys"].insert_one(key.to_doc())
    return tokens


def test_before_any_key_loopback_lists_all_and_others_need_a_key(svc, files):
    # CLIENT_IP_HEADER is set: loopback is the header naming loopback, on a
    # connection from loopback; a missing header is not loopback.
    task = submit(svc, files.url("/bytes/100"))
    local = {"X-Forwarded-For": "127.0.0.1"}
    mine = requests.get(svc.base + "/tasks", headers=local, timeout=10)
    assert [t["id"] for t in mine.json()["tasks"]] == [task]
    for headers in ({"X-Forwarded-For": "203.0.113.9"}, {}):
        remote = requests.get(svc.base + "/tasks", headers=headers, timeout=10)
        assert remote.status_code == 401, headers
        assert "listing tasks needs an API key" in remote.json()["error"]
    # The id is still the task's capability, from anywhere.
    named = requests.get(svc.base + "/tasks", params={"id": task},
                         headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10)
    assert [t["id"] for t in named.json()["tasks"]] == [task]


def test_loopback_behind_a_proxy_is_not_an_operator(make_service, files):
    # No CLIENT_IP_HEADER, but the request carries a proxy's header: the
    # proxy on this host is loopback, its clients are not.
    svc = make_service()
    submit(svc, files.url("/bytes/100"))
    assert listed(svc).status_code == 200
    for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
        r = requests.get(svc.base + "/tasks", headers={header: "203.0.113.9"}, timeout=10)
        assert r.status_code == 401, header
    # LOOPBACK_OPERATOR=0 turns the rule off.
    off = make_service(LOOPBACK_OPERATOR="0")
    assert listed(off).status_code == 401


def test_revoking_every_key_does_not_reopen_loopback(make_service):
    svc = make_service()
    token = make_key(svc, "temp")
    assert keys(svc, "revoke", token.split("_")[1]).returncode == 0
    import time as _time
    _time.sleep(2.5)  # past the API's cache of whether keys exist
    assert listed(svc).status_code == 401


def test_a_second_client_sees_none_of_the_first_ones_tasks(svc, files, people):
    alice = [submit(svc, files.url(f"/bytes/{n}"), people["alice"]) for n in (10, 20)]
    bob = [submit(svc, files.url("/bytes/30"), people["bob"])]
    anonymous = submit(svc, files.url("/bytes/40"))
    for task in alice + bob + [anonymous]:
        svc.wait(task)
    assert {t["id"] for t in listed(svc, people["alice"]).json()["tasks"]} == set(alice)
    assert {t["id"] for t in listed(svc, people["bob"]).json()["tasks"]} == set(bob)
    everyone = listed(svc, people["operator"]).json()["tasks"]
    assert {t["id"] for t in everyone} == {*alice, *bob, anonymous}
    # Filters and pages stay within the caller's tasks.
    page = listed(svc, people["alice"], limit="1").json()
    assert len(page["tasks"]) == 1 and page["next"]
    rest = requests.get(svc.base + page["next"], headers=bearer(people["alice"]), timeout=10)
    assert {t["id"] for t in page["tasks"] + rest.json()["tasks"]} == set(alice)
    assert listed(svc, people["bob"], url=files.url("/bytes/10")).json()["tasks"] == []
    # Once keys exist, loopback is no longer an operator.
    anon = listed(svc)
    assert anon.status_code == 401 and "API key" in anon.json()["error"]
    # Naming ids shows those tasks, whoever asks: the id is the capability.
    named = listed(svc, people["bob"], id=alice[0]).json()["tasks"]
    assert [t["id"] for t in named] == [alice[0]]
    for view in everyone:
        assert "owner" not in view and "client" not in view and "email" not in view


def test_another_key_cannot_cancel_nor_mail_an_owned_task(svc, files, people):
    url = files.url("/slow/200000?parts=50&delay=0.2")
    task = submit(svc, url, people["alice"], email="alice@example.com")
    for who in (people["bob"], None):
        r = requests.delete(f"{svc.base}/tasks/{task}", params={"notify": "true"},
                            headers=bearer(who) if who else {}, timeout=10)
        assert r.status_code == 403, r.text
        assert "another API key" in r.json()["error"]
    assert svc.task(task)["status"] in ("queued", "running")
    assert svc.task(task)["notification"]["status"] in ("pending", "skipped")
    ok = requests.delete(f"{svc.base}/tasks/{task}", headers=bearer(people["alice"]),
                         timeout=10)
    assert ok.status_code == 200 and ok.json()["status"] == "cancelled"
    # An anonymous task stays the id's holder's to cancel.
    loose = submit(svc, url)
    r = requests.delete(f"{svc.base}/tasks/{loose}", headers=bearer(people["bob"]), timeout=10)
    assert r.status_code == 200


def test_links_to_other_clients_tasks_do_not_show_their_ids(svc, files, people):
    url = files.url("/slow/300000?parts=20&delay=0.1")
    leader = submit(svc, url, people["alice"])
    follower = submit(svc, url, people["bob"])
    svc.wait(follower, timeout=60)
    seen_by_bob = requests.get(f"{svc.base}/tasks/{follower}", headers=bearer(people["bob"]),
                               timeout=10).json()
    assert seen_by_bob["follows"] is True, seen_by_bob
    assert leader not in requests.get(f"{svc.base}/tasks/{follower}", timeout=10).text
    seen_by_ops = requests.get(f"{svc.base}/tasks/{follower}",
                               headers=bearer(people["operator"]), timeout=10).json()
    assert seen_by_ops["follows"] == leader


def test_idempotency_keys_are_per_client(svc, files, people):
    url = files.url("/bytes/500")
    first = submit(svc, url, people["alice"], **{})
    r1 = requests.post(svc.base + "/submit", data={"url": url}, timeout=10,
                       headers={**bearer(people["alice"]), "Idempotency-Key": "order-1"})
    r2 = requests.post(svc.base + "/submit", data={"url": url}, timeout=10,
                       headers={**bearer(people["bob"]), "Idempotency-Key": "order-1"})
    again = requests.post(svc.base + "/submit", data={"url": url}, timeout=10,
                          headers={**bearer(people["alice"]), "Idempotency-Key": "order-1"})
    assert r1.json()["id"] != r2.json()["id"] and again.json()["id"] == r1.json()["id"]
    assert first not in (r1.json()["id"], r2.json()["id"])


@pytest.mark.parametrize("header, says", [
    ("Bearer md5l_000000000000_" + "A" * 43, "is not valid"),
    ("Bearer md5l_short", "not one this service made"),
    ("bearer   md5l_x_y ", "not one this service made"),
])
def test_a_wrong_key_is_a_401_with_a_sentence_everywhere(svc, files, people, header, says):
    task = submit(svc, files.url("/bytes/10"), people["alice"])
    for method, path in (("POST", "/submit"), ("GET", f"/check?id={task}"),
                         ("GET", f"/tasks/{task}"), ("GET", "/tasks"),
                         ("DELETE", f"/tasks/{task}"), ("POST", "/manifests")):
        r = requests.request(method, svc.base + path, data={"url": files.url("/bytes/1")},
                             headers={"Authorization": header}, timeout=10)
        assert r.status_code == 401, (path, r.text)
        assert says in r.json()["error"] and r.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", ["Basic YWxpY2U6c2VjcmV0", "Bearer eyJhbGciOi.jwt.sig"])
def test_other_authorization_headers_are_not_ours_to_refuse(svc, files, people, header):
    # A proxy's Basic login or an SSO's token passes through: anonymous.
    r = requests.post(svc.base + "/submit", data={"url": files.url("/bytes/10")},
                      headers={"Authorization": header}, timeout=10)
    assert r.status_code == 202, r.text
    check = requests.get(svc.base + "/check", params={"id": r.json()["id"]},
                         headers={"Authorization": header}, timeout=10)
    assert check.status_code in (200, 202)
    listing = requests.get(svc.base + "/tasks", headers={"Authorization": header}, timeout=10)
    assert listing.status_code == 401 and "listing tasks needs" in listing.json()["error"]


def test_a_revoked_key_is_refused_within_seconds(svc, files, people):
    token = people["bob"]
    key_id = token.split("_")[1]
    submit(svc, files.url("/bytes/10"), token)
    revoked = keys(svc, "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    deadline = time.monotonic() + 10
    while True:
        r = listed(svc, token)
        if r.status_code == 401:
            break
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    assert r.json()["error"] == f"the API key {key_id} was revoked"
    assert listed(svc, people["alice"]).status_code == 200


def test_secrets_are_stored_hashed_and_never_shown_nor_logged(svc, files, people):
    secret = people["alice"].rsplit("_", 1)[1]
    task = submit(svc, files.url("/bytes/10"), people["alice"])
    svc.wait(task)
    listing = keys(svc, "list")
    assert listing.returncode == 0 and "alice" in listing.stdout and "operator" in listing.stdout
    db = MongoClient(svc.env["MONGODB_URI"]).get_default_database()
    stored = list(db["api_keys"].find({}))
    assert len(stored) == 3
    for text in (listing.stdout + listing.stderr, str(stored), svc.log(),
                 listed(svc, people["operator"]).text):
        assert secret not in text
    assert db["tasks"].find_one({"_id": task})["owner"] == people["alice"].split("_")[1]


def test_a_key_is_its_own_quota_client(make_service, files):
    svc = make_service(MAX_PENDING_PER_CLIENT="2")
    token = make_key(svc, "carol")
    url = files.url("/slow/100000?parts=50&delay=0.2")
    submit(svc, url + "&k=1", token)
    submit(svc, url + "&k=2", token)
    r = requests.post(svc.base + "/submit", data={"url": url + "&k=3"}, headers=bearer(token),
                      timeout=10)
    assert r.status_code == 429 and "your API key" in r.json()["error"]
    submit(svc, url + "&k=4")  # the same address without the key: a quota of its own


def test_require_api_key_refuses_anonymous_requests(make_service, files):
    svc = make_service(REQUIRE_API_KEY="1", start=False)
    svc.start(wait=False)
    from servicectl import wait_for
    wait_for(lambda: _up(svc), what="the API")
    r = requests.post(svc.base + "/submit", data={"url": files.url("/bytes/10")}, timeout=10)
    assert r.status_code == 401 and "needs an API key" in r.json()["error"]
    # Refused before its body is read, whatever the route; health is open.
    assert requests.get(svc.base + "/check?id=x", timeout=10).status_code == 401
    big = requests.post(svc.base + "/manifests", data=b"x\n" * 100_000, timeout=10)
    assert big.status_code == 401
    assert requests.get(svc.base + "/health", timeout=10).status_code in (200, 503)
    token = make_key(svc, "dave")
    task = submit(svc, files.url("/bytes/10"), token)
    deadline = time.monotonic() + 30
    while (r := requests.get(svc.base + "/check", params={"id": task}, headers=bearer(token),
                             timeout=10)).status_code == 202:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert r.json()["md5"] == md5_of(10)


def _up(svc) -> bool:
    try:
        return requests.get(svc.base + "/health", timeout=2).status_code in (200, 503)
    except requests.RequestException:
        return False
