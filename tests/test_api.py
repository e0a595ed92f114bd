"""The API contract of docs/design.md, against a running service."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import uuid

import pytest
import requests

from fileserver import body, md5_of

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def curl(*args: str) -> str:
    return subprocess.run(["curl", "-s", *args], check=True, capture_output=True,
                          text=True, timeout=30).stdout


def test_task_statement_examples_verbatim(service, files):
    """The original examples, with curl, byte for byte where they show bytes."""
    url = files.url("/bytes/1000")
    out = curl("-X", "POST", "-d", f"email=user@example.com&url={url}",
               f"{service.base}/submit")
    assert re.fullmatch(r'\{"id":"[0-9a-f-]{36}"\}', out), out
    task_id = json.loads(out)["id"]
    assert UUID4.match(task_id)
    first = curl("-X", "GET", f"{service.base}/check?id={task_id}")
    assert first in ('{"status":"running"}',
                     f'{{"md5":"{md5_of(1000)}","status":"done","url":"{url}"}}')
    service.wait(task_id)
    done = curl("-X", "GET", f"{service.base}/check?id={task_id}")
    assert done == f'{{"md5":"{md5_of(1000)}","status":"done","url":"{url}"}}'


def test_running_state_is_202_with_retry_after(service, files):
    task_id = service.submit(files.url("/slow/1000?parts=4&delay=0.5"))
    r = service.check(task_id)
    assert r.status_code == 202
    assert r.json() == {"status": "running"}
    assert r.headers["Retry-After"] == "1"
    final = service.wait(task_id)
    assert final.status_code == 200
    assert final.json() == {"md5": md5_of(1000), "status": "done",
                            "url": files.url("/slow/1000?parts=4&delay=0.5")}


def test_failed_state_is_502_with_reason(service, files):
    url = files.url("/status/404")
    r = service.wait(service.submit(url))
    assert r.status_code == 502
    doc = r.json()
    assert doc["status"] == "failed" and doc["url"] == url
    assert doc["error"] == "HTTP 404 Not Found from 127.0.0.1"


def test_unknown_id_is_404(service):
    for task_id in (str(uuid.uuid4()), "nonsense", "x" * 500):
        r = requests.get(service.base + "/check", params={"id": task_id}, timeout=10)
        assert r.status_code == 404
        assert r.json() == {"status": "not_found"}
    assert requests.get(service.base + f"/tasks/{uuid.uuid4()}").status_code == 404


def test_missing_id_is_400(service):
    for query in ("", "?id=", "?other=1"):
        r = requests.get(service.base + "/check" + query, timeout=10)
        assert r.status_code == 400
        assert r.json() == {"error": "id is required"}


def test_submit_answers_202_with_location(service, files):
    r = requests.post(service.base + "/submit", data={"url": files.url("/bytes/10")})
    assert r.status_code == 202
    task_id = r.json()["id"]
    assert UUID4.match(task_id)
    assert r.headers["Location"] == f"/check?id={task_id}"


@pytest.mark.parametrize("how", ["form", "query", "json"])
def test_submit_accepts_form_query_and_json(service, files, how):
    url = files.url("/bytes/2048?seed=5")
    if how == "form":
        r = requests.post(service.base + "/submit", data={"url": url})
    elif how == "query":
        r = requests.post(service.base + "/submit", params={"url": url})
    else:
        r = requests.post(service.base + "/submit", json={"url": url, "email": None})
    assert r.status_code == 202, r.text
    done = service.wait(r.json()["id"])
    assert done.json()["md5"] == md5_of(2048, 5)


MUST_START = "url must start with http://, https://, ftp:// or ftps://"


@pytest.mark.parametrize("data,message", [
    ({}, "url is required"),
    ({"url": ""}, "url is empty"),
    ({"url": "http://example.com/" + "a" * 2048}, "url is longer than 2048 characters"),
    ({"url": "gopher://example.com/file"}, MUST_START),
    ({"url": "file:///etc/passwd"}, MUST_START),
    ({"url": "example.com/file"}, MUST_START),
    ({"url": "http:///path"}, "url has no host"),
    ({"url": "http://user:secret@example.com/"}, "url must not contain a user name or password"),
    ({"url": "http://example.com/", "email": "not-an-email"}, None),
    ({"url": "http://example.com/", "email": "a" * 250 + "@x.com"},
     "email is longer than 254 characters"),
])
def test_bad_input_is_400_with_reason(service, data, message):
    r = requests.post(service.base + "/submit", data=data, timeout=10)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    if message:
        assert error == message
    else:
        assert error.startswith("email is not valid")


def test_blocked_ip_literal_is_400(make_service):
    strict = make_service(ALLOW_PRIVATE_URLS="0", WORKERS="1")
    r = requests.post(strict.base + "/submit", data={"url": "http://10.1.2.3/x"})
    assert r.status_code == 400
    assert "private or reserved address" in r.json()["error"]


def test_body_over_64k_is_413(service):
    r = requests.post(service.base + "/submit", data={"url": "http://e.com/" + "a" * 70000})
    assert r.status_code == 413
    assert "error" in r.json()


def test_task_view_has_progress_and_timestamps(service, files):
    task_id = service.submit(files.url("/bytes/300000"), email="someone@example.com")
    service.wait(task_id)
    doc = service.task(task_id)
    assert doc["status"] == "done" and doc["md5"] == md5_of(300000)
    assert doc["bytes_done"] == doc["bytes_total"] == 300000
    assert doc["attempts"] == 1
    assert doc["created_at"] <= doc["started_at"] <= doc["finished_at"]
    assert "someone" not in json.dumps(doc)
    assert doc["notification"]["status"] == "skipped"  # no SMTP_HOST here


def test_progress_is_visible_while_running(service, files):
    task_id = service.submit(files.url("/slow/4000000?parts=8&delay=0.5"))
    seen = set()
    while service.check(task_id).status_code == 202:
        doc = service.task(task_id)
        if doc["status"] == "running" and doc["bytes_done"]:
            seen.add(doc["bytes_done"])
            assert doc["bytes_total"] == 4000000
    # Partial progress shows (a renewal as the last bytes arrive may show
    # them all before the end is written).
    assert seen and min(seen) < 4000000
    assert service.task(task_id)["bytes_done"] == 4000000


@pytest.mark.parametrize("path,size", [
    ("/bytes/0", 0), ("/bytes/1", 1), ("/chunked/3000000", 3000000),
    ("/bytes/5000000", 5000000), ("/redirect/3/bytes/77777", 77777),
])
def test_md5_matches_hashlib(service, files, path, size):
    r = service.wait(service.submit(files.url(path)))
    assert r.status_code == 200, r.text
    assert r.json()["md5"] == hashlib.md5(body(size)).hexdigest()


def test_md5_of_100mb(service, files):
    r = service.wait(service.submit(files.url("/bytes/100000000?seed=9")), timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["md5"] == md5_of(100_000_000, 9)


def test_md5_equals_curl_pipeline_for_gzip_body(service, files):
    """Content-Encoding: gzip is hashed as sent, like curl -sL | md5sum."""
    url = files.url("/gzip/100000")
    expected = subprocess.run(f"curl -sL '{url}' | md5sum", shell=True, check=True,
                              capture_output=True, text=True).stdout.split()[0]
    r = service.wait(service.submit(url))
    assert r.json()["md5"] == expected


def test_burst_of_200_tasks(service, files):
    urls = [files.url(f"/bytes/{1000 + i}?seed={i}") for i in range(200)]
    ids = [service.submit(u) for u in urls]
    assert len(set(ids)) == 200
    results = service.wait_all(ids, timeout=180)
    for i, task_id in enumerate(ids):
        r = results[task_id]
        assert r.status_code == 200
        assert r.json()["md5"] == md5_of(1000 + i, i)


def test_unknown_path_and_method_are_json(service):
    r = requests.get(service.base + "/nope")
    assert r.status_code == 404 and r.headers["Content-Type"].startswith("application/json")
    r = requests.delete(service.base + "/submit")
    assert r.status_code == 405 and "error" in r.json()
