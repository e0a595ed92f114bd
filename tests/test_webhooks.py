"""Webhooks (callback_url) against a real service and a real receiver:
signed as Standard Webhooks 1.0 says (checked with the spec's reference
implementation), retried with back-off, recorded on the task, and held to
the same address policy as downloads."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest
import requests
from fileserver import HookHandler, HookServer, ThreadedServer, md5_of
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

pytestmark = pytest.mark.timeout(120)

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
QUICK = {"WEBHOOK_SECRET": SECRET, "WEBHOOK_RETRY_BASE": "0.2"}


@pytest.fixture(scope="module")
def receiver():
    return HookServer().start()


def _key() -> str:
    return uuid.uuid4().hex[:12]


def _submit(svc, url: str, callback: str, **extra) -> str:
    r = requests.post(svc.base + "/submit", data={"url": url, "callback_url": callback, **extra},
                      timeout=10)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _callback_settles(svc, task_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        task = svc.task(task_id)
        if task["callback"]["status"] != "pending":
            return task
        assert time.monotonic() < deadline, task
        time.sleep(0.1)


def _verified(post: dict) -> dict:
    """The body, once the reference implementation accepts the signature."""
    return Webhook(SECRET).verify(post["body"], post["headers"])


def test_a_finished_task_is_posted_signed_and_recorded(make_service, files, receiver):
    svc = make_service(**QUICK)
    key = _key()
    task_id = _submit(svc, files.url("/bytes/5000?seed=61"), receiver.url(f"/hook/{key}"),
                      email="owner@example.com")
    task = _callback_settles(svc, task_id)
    assert task["callback"]["status"] == "delivered"
    assert task["callback"]["attempts"] == 1 and task["callback"]["last_error"] is None
    assert task["callback"]["delivered_at"].endswith("Z")
    assert "url" not in task["callback"]
    [post] = HookHandler.received[key]
    body = _verified(post)
    assert body["id"] == task_id and body["status"] == "done"
    assert body["md5"] == md5_of(5000, 61)
    assert "email" not in body and "owner@example.com" not in post["body"].decode()
    headers = {k.lower(): v for k, v in post["headers"].items()}
    assert headers["webhook-id"] == task_id
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 120
    assert headers["webhook-signature"].startswith("v1,")
    assert headers["content-type"] == "application/json"
    # The signature covers the body: the reference refuses a changed one.
    forged = post["body"].replace(b'"done"', b'"failed"')
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(forged, post["headers"])
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 32).verify(post["body"], post["headers"])


def test_a_failing_receiver_gets_retries_with_the_same_id_until_it_answers(
        make_service, files, receiver):
    svc = make_service(**QUICK)
    key = _key()
    task_id = _submit(svc, files.url("/bytes/100?seed=62"),
                      receiver.url(f"/hook/{key}?fail=2&code=503"))
    task = _callback_settles(svc, task_id)
    assert task["callback"]["status"] == "delivered" and task["callback"]["attempts"] == 3
    posts = HookHandler.received[key]
    assert len(posts) == 3
    assert {p["headers"]["Webhook-Id"] for p in posts} == {task_id}
    for post in posts:
        assert _verified(post)["id"] == task_id
    # Back-off: each wait at least the one before (0.2 s, then 0.4 s).
    gaps = [b["at"] - a["at"] for a, b in zip(posts, posts[1:], strict=False)]
    assert gaps[0] >= 0.15 and gaps[1] >= 0.35, gaps


def test_a_receiver_that_keeps_failing_is_given_up_with_its_reason(make_service, files,
                                                                   receiver):
    svc = make_service(**QUICK, WEBHOOK_MAX_ATTEMPTS="2")
    key = _key()
    task_id = _submit(svc, files.url("/status/404"),
                      receiver.url(f"/hook/{key}?fail=99&code=500"))
    task = _callback_settles(svc, task_id)
    assert task["status"] == "failed"
    assert task["callback"]["status"] == "failed" and task["callback"]["attempts"] == 2
    assert task["callback"]["last_error"] == "the receiver at 127.0.0.1 answered 500"
    body = _verified(HookHandler.received[key][0])
    assert body["status"] == "failed" and "404" in body["error"]


@pytest.mark.parametrize("answer", ["big", "endless"])
def test_a_2xx_is_delivery_whatever_body_follows(make_service, files, receiver, answer):
    # A 200 with 128 MiB of body, or one that never ends: delivered once,
    # the body cut off after 64 KiB (before: "connection closed", retried).
    svc = make_service(**QUICK, WEBHOOK_TIMEOUT="3")
    key = _key()
    task_id = _submit(svc, files.url("/bytes/100?seed=63"),
                      receiver.url(f"/hook/{key}?answer={answer}"))
    task = _callback_settles(svc, task_id)
    assert task["callback"]["status"] == "delivered", task["callback"]
    assert task["callback"]["attempts"] == 1
    time.sleep(1)
    assert len(HookHandler.received[key]) == 1


def test_a_cancelled_task_is_posted_too(make_service, files, receiver):
    svc = make_service(**QUICK)
    key = _key()
    task_id = _submit(svc, files.url("/stall"), receiver.url(f"/hook/{key}"))
    assert requests.delete(f"{svc.base}/tasks/{task_id}", timeout=10).status_code == 200
    task = _callback_settles(svc, task_id)
    assert task["callback"]["status"] == "delivered"
    assert _verified(HookHandler.received[key][0])["status"] == "cancelled"


def test_the_address_policy_applies_to_callbacks_as_to_downloads(make_service, receiver):
    """Loopback is refused unless allowed, the way downloads are: here only
    127.0.0.2 is allowed (ALLOW_NETWORKS), where the file server and one
    receiver listen; 127.0.0.1 is not."""
    files2 = ThreadedServer("127.0.0.2").start()
    allowed_receiver = HookServer("127.0.0.2").start()
    svc = make_service(**QUICK, ALLOW_PRIVATE_URLS="0", ALLOW_NETWORKS="127.0.0.2/32")
    url = files2.url("/bytes/100?seed=63")
    # An IP literal the policy forbids: refused at submit, like a url.
    r = requests.post(svc.base + "/submit", timeout=10,
                      data={"url": url, "callback_url": receiver.url("/hook/x")})
    assert r.status_code == 400
    assert r.json()["error"] == ("callback_url points to 127.0.0.1, a private or reserved "
                                 "address that this service does not fetch from")
    # A name that resolves to it: refused when sending, never connected to.
    key = _key()
    task_id = _submit(svc, url, f"http://localhost:{receiver.port}/hook/{key}")
    task = _callback_settles(svc, task_id)
    assert task["status"] == "done"
    assert task["callback"]["status"] == "failed" and task["callback"]["attempts"] == 1
    assert "localhost resolves to" in task["callback"]["last_error"]
    assert "private or reserved address" in task["callback"]["last_error"]
    assert key not in HookHandler.received
    # The allowed network gets its webhook.
    key = _key()
    task_id = _submit(svc, url, allowed_receiver.url(f"/hook/{key}"))
    assert _callback_settles(svc, task_id)["callback"]["status"] == "delivered"


@pytest.mark.parametrize("callback, message", [
    ("ftp://example.com/hook", "callback_url must start with http:// or https://"),
    ("http://user:pw@example.com/", "callback_url must not contain a user name or password"),
    ("http://exa mple.com/", "callback_url must not contain spaces"),
])
def test_bad_callback_urls_are_400s(make_service, files, callback, message):
    svc = make_service(**QUICK)
    r = requests.post(svc.base + "/submit", timeout=10,
                      data={"url": files.url("/bytes/1"), "callback_url": callback})
    assert r.status_code == 400 and r.json()["error"].startswith(message)


def test_without_a_secret_callbacks_are_refused_in_words(service, files):
    r = requests.post(service.base + "/submit", timeout=10,
                      json={"url": files.url("/bytes/1"), "callback_url": "http://a.example/"})
    assert r.status_code == 400
    assert "WEBHOOK_SECRET" in r.json()["error"]
    # A task without one shows no callback at all.
    task_id = service.submit(files.url("/bytes/1"))
    assert service.task(task_id)["callback"] is None


def test_a_bad_secret_stops_the_service_at_start(make_service):
    svc = make_service(start=False, WEBHOOK_SECRET="not-a-secret")
    svc.start(wait=False)
    assert svc.proc.wait(30) != 0
    assert "WEBHOOK_SECRET must be whsec_" in svc.log()


def test_payload_is_the_task_json(make_service, files, receiver):
    svc = make_service(**QUICK)
    key = _key()
    task_id = _submit(svc, files.url("/bytes/10?seed=64"), receiver.url(f"/hook/{key}"),
                      algorithms="sha256")
    _callback_settles(svc, task_id)
    body = json.loads(HookHandler.received[key][0]["body"])
    view = svc.task(task_id)
    view.pop("callback")
    assert body == view


def test_the_readme_receiver_snippet_verifies_a_real_webhook(make_service, files, receiver):
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("## Webhooks"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the README's own code, run as a receiver would
    svc = make_service(**QUICK)
    key = _key()
    task_id = _submit(svc, files.url("/bytes/10?seed=65"), receiver.url(f"/hook/{key}"))
    _callback_settles(svc, task_id)
    post = HookHandler.received[key][0]
    headers = {k.lower(): v for k, v in post["headers"].items()}
    assert scope["verify"](SECRET, post["body"], headers)["id"] == task_id
    with pytest.raises(ValueError, match="bad signature"):
        scope["verify"](SECRET, post["body"] + b" ", headers)
