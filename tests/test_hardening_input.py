"""Hostile input against the real service: one bad request must never cost
anyone else their submit, and every answer, even to a request Tornado
cannot frame, is a JSON 4xx rather than a 500, a reset or a bare 400."""

from __future__ import annotations

import asyncio
import inspect
import json
import random
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import tornado.http1connection
import tornado.iostream
import tornado.tcpserver
from pymongo import AsyncMongoClient
from pymongo.errors import DuplicateKeyError

from fileserver import md5_of
from service.runtime import framing
from service.storage.batching import InsertBatcher

JSON = {"Content-Type": "application/json"}


def raw(port: int, data: bytes, timeout: float = 15) -> bytes:
    """Send ``data`` on a fresh connection; everything the server sends
    back until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server may answer and stop reading before we finish
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                raise AssertionError(f"connection reset after {out[:300]!r}") from None
            if not chunk:
                return out
            out += chunk


def parse(answer: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


# -- item 2: one bad request loses nobody else's submit ----------------------

def _good(service, files, i: int) -> tuple[str, requests.Response]:
    url = files.url(f"/bytes/{100 + i}?seed={i}")
    if i % 2:
        r = requests.post(service.base + "/submit", json={"url": url}, timeout=30)
    else:
        r = requests.post(service.base + "/submit", data={"url": url}, timeout=30)
    return url, r


BAD_BODIES = [
    b'{"url":"http://x.test/\\ud800"}',
    b'{"url":"http://x.test/","email":"a\\udfffb@example.com"}',
    b'{"url":"http://x.test/","\\ud800":"x"}',
    b'{"url":"http://x.test/\\udc00\\ud800"}',
]


def test_burst_of_good_and_bad_submits_loses_nothing(service, files):
    """Before the fix a lone surrogate failed the whole batched insert it
    joined: good submits in that batch got 500 and were never stored."""
    good_n, bad_n = 300, 120
    jobs = [("good", i) for i in range(good_n)] + [("bad", j) for j in range(bad_n)]
    random.Random(7).shuffle(jobs)

    def work(job: tuple[str, int]):
        kind, n = job
        if kind == "bad":
            body = BAD_BODIES[n % len(BAD_BODIES)]
            result = "bad", body, requests.post(service.base + "/submit", data=body,
                                                headers=JSON, timeout=30)
        else:
            result = "good", *_good(service, files, n)
        # A kept response keeps its connection open; 420 of them would be
        # over the per-client connection cap.
        result[2].close()
        return result

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(work, jobs))
    good = [(url, r) for kind, url, r in results if kind == "good"]
    bad = [(body, r) for kind, body, r in results if kind == "bad"]
    assert len(bad) == bad_n and len(good) == good_n
    for body, r in bad:
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert "lone surrogate" in r.json()["error"]
    for url, r in good:
        assert r.status_code == 202, (url, r.status_code, r.text)
    ids = {r.json()["id"]: url for url, r in good}
    for task_id, url in ids.items():
        found = requests.get(f"{service.base}/tasks/{task_id}", timeout=10)
        assert found.status_code == 200 and found.json()["url"] == url
    finished = service.wait_all(list(ids), timeout=240)
    for task_id, url in ids.items():
        size, seed = int(url.split("/bytes/")[1].split("?")[0]), int(url.split("seed=")[1])
        assert finished[task_id].json() == {"md5": md5_of(size, seed), "status": "done",
                                            "url": url}


def test_a_batch_never_fails_for_one_document(mongo):
    """The batcher itself, on the real database: a document the driver
    cannot encode fails alone; the rest of its batch is written, and a
    duplicate _id is still reported as such."""

    async def main():
        client = AsyncMongoClient(f"{mongo}/t_batch_{uuid.uuid4().hex[:8]}")
        try:
            coll = client.get_default_database()["tasks"]
            await coll.insert_one({"_id": "taken"})
            batcher = InsertBatcher(coll)
            docs = [{"_id": f"good-{i}", "url": f"http://x.test/{i}"} for i in range(40)]
            docs.insert(7, {"_id": "bad", "url": "http://x.test/\ud800"})
            docs.insert(20, {"_id": "taken"})
            outcomes = await asyncio.gather(*(batcher.insert(d) for d in docs),
                                            return_exceptions=True)
            stored = {d["_id"] for d in await coll.find({}, {"_id": 1}).to_list(None)}
            return dict(zip([d["_id"] for d in docs], outcomes)), stored
        finally:
            await client.close()

    outcomes, stored = asyncio.run(main())
    assert isinstance(outcomes.pop("bad"), Exception)
    assert isinstance(outcomes.pop("taken"), DuplicateKeyError)
    assert outcomes == {f"good-{i}": None for i in range(40)}
    assert stored == {"taken"} | {f"good-{i}" for i in range(40)}


@pytest.mark.parametrize("how,expected", [
    ("/check?id=%ED%A0%80", 400), ("/check?id=%FF%FE", 400), ("/check?id=%C0%80", 400),
    ("/tasks/%ED%A0%80", 400), ("/tasks/%FF", 400), ("/tasks/%ZZ", 404),
    ("/check?id=%00", 404), ("/tasks/%00", 404), ("/tasks/a%00b", 404),
    ("/check?id=" + "7" * 20000, 404), ("/tasks/" + "7" * 20000, 404),
    ("/check?id=%ED%A0%80&id=x", 400),
])
def test_odd_task_ids_are_404_or_400(service, how, expected):
    r = requests.get(service.base + how, timeout=10)
    assert r.status_code == expected, r.text
    doc = r.json()
    assert doc == {"status": "not_found"} if expected == 404 else "error" in doc


def test_surrogate_id_in_json_body_is_400(service):
    r = requests.get(service.base + "/check", data=b'{"id":"\\ud800"}', headers=JSON,
                     timeout=10)
    assert r.status_code == 400
    assert r.json() == {"error": "id is not valid Unicode: it contains a lone "
                                 "surrogate such as \\ud800"}


@pytest.mark.parametrize("body", [b"[" * 60000, b'{"a":' * 12000, b'{"url":' + b"[" * 30000])
def test_deeply_nested_json_is_400(service, body):
    r = requests.post(service.base + "/submit", data=body, headers=JSON, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json() == {"error": "request body is not valid: JSON is nested too deeply"}


@pytest.mark.parametrize("query,form", [
    ("url=http%3A%2F%2Fx.test%2F%ED%A0%80", None),
    ("", b"url=http%3A%2F%2Fx.test%2F%ED%A0%80"),
    ("", b"url=http%3A%2F%2Fx.test%2F&email=%ED%B0%80%40x.com"),
])
def test_surrogates_in_query_and_form_are_400(service, query, form):
    r = requests.post(f"{service.base}/submit?{query}", data=form, timeout=10,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400
    assert r.json() == {"error": "request is not valid UTF-8"}


def test_non_ascii_idempotency_key_is_400(service, files):
    r = requests.post(service.base + "/submit", data={"url": files.url("/bytes/1")},
                      headers={"Idempotency-Key": "k\xe9y"}, timeout=10)
    assert r.status_code == 400
    assert r.json() == {"error": "Idempotency-Key must be printable ASCII without spaces"}


# -- item 8: helpful HTTP answers ------------------------------------------------

@pytest.mark.parametrize("body,name", [
    (b'{"url":"http://a.test/","url":"http://b.test/"}', "url"),
    (b'{"url":"http://a.test/","email":"a@b.com","email":"c@d.com"}', "email"),
    (b'{"url":"http://a.test/","url":null}', "url"),
    (b'{"url":"http://a.test/","x":"1","x":"1"}', "x"),
])
def test_duplicate_json_keys_are_400(service, body, name):
    r = requests.post(service.base + "/submit", data=body, headers=JSON, timeout=10)
    assert r.status_code == 400
    assert r.json() == {"error": f"{name} given more than once"}


ROUTES = {"/submit": "POST", "/check?id=x": "GET, HEAD", "/tasks/x": "GET, HEAD, DELETE",
          "/tasks": "GET, HEAD",
          "/health": "GET, HEAD", "/metrics": "GET, HEAD", "/openapi.yaml": "GET, HEAD",
          "/manifests": "POST", "/manifests/x": "GET, HEAD"}


@pytest.mark.parametrize("path", sorted(ROUTES))
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS",
                                    "BREW"])
def test_405_lists_allowed_methods(service, path, method):
    allowed = ROUTES[path]
    if method in allowed.split(", "):
        return
    r = requests.request(method, service.base + path, timeout=10)
    assert r.status_code == 405
    assert r.headers["Allow"] == allowed
    assert r.json() == {"error": "method not allowed"}


def test_head_is_get_without_body(service, files):
    task_id = service.submit(files.url("/bytes/10"))
    service.wait(task_id)
    for path in (f"/check?id={task_id}", f"/tasks/{task_id}", "/check?id=nope", "/health"):
        got = requests.get(service.base + path, timeout=10)
        head = requests.head(service.base + path, timeout=10)
        assert head.status_code == got.status_code
        assert head.content == b""
        assert head.headers["Content-Length"] == str(len(got.content))
    head = requests.head(service.base + "/submit", timeout=10)
    assert head.status_code == 405 and head.headers["Allow"] == "POST"


def test_compressed_body_is_415(service):
    r = requests.post(service.base + "/submit", data=b"\x1f\x8b\x08\x00junk",
                      headers={"Content-Encoding": "gzip",
                               "Content-Type": "application/x-www-form-urlencoded"},
                      timeout=10)
    assert r.status_code == 415
    assert r.json() == {"error": "Content-Encoding gzip is not supported; "
                                 "send the body uncompressed"}


def test_expect_100_continue(service, files):
    url = files.url("/bytes/10")
    r = requests.post(service.base + "/submit", data={"url": url},
                      headers={"Expect": "100-continue"}, timeout=10)
    assert r.status_code == 202
    assert service.wait(r.json()["id"]).json()["md5"] == md5_of(10)


@pytest.mark.parametrize("ctype,body", [
    ("multipart/form-data", b"--x\r\n"),
    ("multipart/form-data; boundary=", b"--\r\n"),
    ('multipart/form-data; boundary="unterminated', b'--"unterminated\r\n'),
    ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data\r\n\r\nv\r\n--x--"),
    ("multipart/form-data; boundary=x", b"--x\r\nno headers end"),
    ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data; "
                                         b'name="url"\r\n\r\n\xff\r\n--x--\r\n'),
    ("application/json; charset=utf-16", b'\xff\xfe{\x00}\x00'),
    ("application/json; =;;", b"{"),
    ("application/x-www-form-urlencoded; charset=\x7f", b"url=%"),
])
def test_odd_content_types_and_bodies_are_json_4xx(service, ctype, body):
    r = requests.post(service.base + "/submit", data=body, headers={"Content-Type": ctype},
                      timeout=10)
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    assert "error" in r.json()


def test_multipart_form_still_works(service, files):
    url = files.url("/bytes/33")
    r = requests.post(service.base + "/submit", files={"url": (None, url)}, timeout=10)
    assert r.status_code == 202
    assert service.wait(r.json()["id"]).json()["md5"] == md5_of(33)


GET = b"GET /check?id=x HTTP/1.1\r\nHost: t\r\n"
POST = b"POST /submit HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\n"

MALFORMED = {
    "negative content-length": POST + b"Content-Length: -5\r\n\r\n",
    "both te and cl": POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "unknown transfer-encoding": POST + b"Transfer-Encoding: gzip\r\n\r\n",
    "bad chunk size": POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "unterminated chunk": POST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n",
    "chunk-size line too long": POST + b"Transfer-Encoding: chunked\r\n\r\n" + b"0" * 200,
    "http/0.9 request line": b"GET /\r\n\r\n",
    "tls hello": b"\x16\x03\x01\x00\xa5\x01\x00\x00\r\n\r\n",
    "http/2 version": b"GET /check?id=x HTTP/2.0\r\nHost: t\r\n\r\n",
    "space in target": b"GET /check?id=a b HTTP/1.1\r\nHost: t\r\n\r\n",
    "header without colon": GET + b"Bogus header\r\n\r\n",
    "folded header": GET + b"X-A: a\r\n b\r\n\r\n",
    "nul in header": GET + b"X-A: a\x00b\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_framing_gets_json_400(service, name):
    status, headers, doc = parse(raw(service.port, MALFORMED[name]))
    assert status == 400, doc
    assert headers["Content-Type"] == "application/json; charset=UTF-8"
    assert doc["error"].startswith("the request is not valid HTTP/1.1 (")


def test_chunked_body_past_drain_cap_gets_json_413(service):
    chunk = b"u" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(20)) + b"0\r\n\r\n"
    status, _, doc = parse(raw(service.port, POST + b"Transfer-Encoding: chunked\r\n\r\n" + body))
    assert status == 413
    assert doc["error"].startswith("request body too large")


def test_one_answer_when_handler_answered_before_framing_failed(service):
    """A 413 from the handler, then a Content-Length Tornado refuses to
    read: the client gets the 413 alone, not a second answer after it."""
    answer = raw(service.port, GET + b"Content-Length: 99999999\r\n\r\n")
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert parse(answer)[0] == 413


@pytest.mark.parametrize("headers", [
    b"X-Big: " + b"a" * 300_000 + b"\r\n",
    b"".join(b"X-%d: y\r\n" % i for i in range(40_000)),
])
def test_oversized_headers_get_json_431(service, headers):
    status, head, doc = parse(raw(service.port, GET + headers + b"\r\n"))
    assert status == 431
    assert head["Connection"] == "close"
    assert doc == {"error": "request headers are larger than 256 KiB; "
                            "send fewer or shorter headers"}


def test_oversized_headers_431_through_an_http_client(service):
    r = requests.get(service.base + "/check", params={"id": "x"},
                     headers={"X-Big": "b" * 300_000}, timeout=15)
    assert r.status_code == 431 and "256 KiB" in r.json()["error"]


def test_server_keeps_serving_during_a_barrage_of_malformed_requests(service, files):
    cases = list(MALFORMED.values()) * 5 + [GET + b"X-Big: " + b"a" * 300_000 + b"\r\n\r\n"] * 5

    def good(i: int) -> int:
        return requests.get(service.base + "/check", params={"id": f"x{i}"},
                            timeout=15).status_code

    log_start = len(service.log())
    with ThreadPoolExecutor(16) as pool:
        bad = pool.map(lambda data: raw(service.port, data), cases)
        ok = pool.map(good, range(100))
        assert all(b"application/json" in answer for answer in bad)
        assert set(ok) == {404}
    assert requests.get(service.base + "/health", timeout=10).status_code == 200
    assert service.wait(service.submit(files.url("/bytes/77"))).json()["md5"] == md5_of(77)
    assert "Traceback" not in service.log()[log_start:]


def test_tornado_still_has_the_hooks_framing_relies_on():
    """service/framing.py depends on these details of Tornado's HTTP/1
    server. If an upgrade changes them, malformed requests silently get
    bare 400s and resets again: update service/framing.py."""
    conn = inspect.getsource(tornado.http1connection.HTTP1Connection._read_message_inner)
    assert framing.TORNADO_BARE_400 == b"HTTP/1.1 400 Bad Request\r\n\r\n"
    assert 'self.stream.write(b"HTTP/1.1 400 Bad Request\\r\\n\\r\\n")' in conn, \
        "Tornado no longer writes the bare 400 framing.py replaces"
    assert "self.stream.read_until_regex(" in conn and \
        "max_bytes=self.params.max_header_size" in conn, \
        "Tornado no longer reads headers with a bounded read_until_regex"
    chunked = inspect.getsource(tornado.http1connection.HTTP1Connection._read_chunked_body)
    assert 'self.stream.read_until(b"\\r\\n", max_bytes=64)' in chunked
    stream = inspect.getsource(tornado.iostream.BaseIOStream)
    assert "except UnsatisfiableReadError as e:" in stream and \
        "self.close(exc_info=e)" in stream, \
        "IOStream no longer closes itself with the UnsatisfiableReadError"
    tcp = inspect.getsource(tornado.tcpserver.TCPServer._handle_connection)
    assert "stream = IOStream(" in tcp and "self.handle_stream(stream, address)" in tcp
