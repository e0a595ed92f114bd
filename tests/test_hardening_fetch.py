"""Downloads that end, whatever the server sends: malformed framing, chunk
extensions, interim answers, odd redirects. Each response is sent verbatim
by a raw socket server; where curl can hash a response, md5-light must
give curl's md5 (``curl -s URL | md5sum``)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import subprocess
import time

import pytest
import requests
from pymongo import MongoClient
from tornado.httpclient import AsyncHTTPClient

from fileserver import RawResponseServer, md5_of
from service import config as config_mod
from service.fetch import tornado_hooks as httpclient_hooks
from service.fetch.client import make_client
from service.fetch.download import Download, FetchError

OK = b"HTTP/1.1 200 OK\r\n"
LONG_EXTENSION = OK + (b"Transfer-Encoding: chunked\r\n\r\n5;note=" + b"x" * 80
                       + b"\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")

# Responses curl hashes; so must we, to the same md5.
CURL_HASHES = {
    "long chunk extension": LONG_EXTENSION,
    "short chunk extension": OK + b"Transfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\n\r\n",
    "trailers": OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n",
    "1xx before 200": (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                       b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
                       + OK + b"Content-Length: 5\r\n\r\nhello"),
    "chunk-size in upper case hex": (OK + b"Transfer-Encoding: chunked\r\n\r\nA\r\n0123456789"
                                     b"\r\n0\r\n\r\n"),
    "repeated equal Content-Length": OK + b"Content-Length: 5, 5\r\n\r\nhello",
}

# Responses whose framing cannot be trusted: a permanent failure that says
# what was wrong, never "connection closed" (which would be retried).
MALFORMED = {
    "negative Content-Length": (OK + b"Content-Length: -5\r\n\r\nhello",
                                "its Content-Length is not a whole number ('-5')"),
    "conflicting Content-Length": (OK + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
                                   "it sent conflicting Content-Length values (5, 6)"),
    "Transfer-Encoding with Content-Length": (
        OK + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "it sent both Transfer-Encoding and Content-Length"),
    "bad chunk size": (OK + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
                       "a chunk-size line is not valid: b'zz\\r\\n'"),
    "chunk longer than announced": (
        OK + b"Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n",
        "a chunk is longer than its chunk-size line says"),
    "endless chunk-size line": (OK + b"Transfer-Encoding: chunked\r\n\r\n5;" + b"x" * 20000,
                                "a chunk-size line is longer than 16384 bytes"),
    "unsupported Transfer-Encoding": (OK + b"Transfer-Encoding: gzip\r\n\r\nhello",
                                      "its Transfer-Encoding 'gzip' is not supported "
                                      "(only chunked)"),
    "HTTP/0.9": (b"hello world, no status line\n",
                 "its response does not start with an HTTP status line "
                 "(HTTP/0.9 is not supported)"),
    "headers over 64 KiB": (OK + b"X-Big: " + b"a" * 70000 + b"\r\nContent-Length: 5\r\n\r\nhello",
                            "its response headers are larger than 64 KiB"),
}


@pytest.fixture(scope="module")
def config():
    return config_mod.load(None, {"ALLOW_PRIVATE_URLS": "1", "IDLE_TIMEOUT": "2",
                                  "CONNECT_TIMEOUT": "2"})


def fetch(url: str, config, client=None) -> tuple[str | None, FetchError | None, Download]:
    async def go():
        own = client or make_client(config)
        download = Download(url, config, own, None)
        try:
            return (await asyncio.wait_for(download.run(), 30)).digests["md5"], None, download
        except FetchError as exc:
            return None, exc, download
        finally:
            if client is None:
                own.close()
    return asyncio.run(go())


def curl_md5(url: str) -> str:
    out = subprocess.run(f"curl -s '{url}' | md5sum", shell=True, check=True,
                         capture_output=True, text=True, timeout=30)
    return out.stdout.split()[0]


@pytest.mark.parametrize("name", sorted(CURL_HASHES))
def test_hashes_what_curl_hashes(name, config):
    server = RawResponseServer(CURL_HASHES[name])
    md5, error, _ = fetch(server.url(), config)
    assert error is None, error
    assert md5 == curl_md5(server.url())


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_framing_is_a_permanent_bad_response(name, config):
    response, reason = MALFORMED[name]
    server = RawResponseServer(response)
    md5, error, _ = fetch(server.url(), config)
    assert md5 is None
    assert error.code == "bad_response" and not error.transient
    assert error.message == f"127.0.0.1 sent a malformed HTTP response: {reason}"


@pytest.mark.parametrize("code,reason", [(300, "Multiple Choices"), (304, "Not Modified"),
                                         (305, "Use Proxy")])
def test_3xx_that_is_not_followed_says_so(code, reason, config):
    server = RawResponseServer(f"HTTP/1.1 {code} {reason}\r\nLocation: /x\r\n"
                               "Content-Length: 0\r\n\r\n".encode())
    _, error, _ = fetch(server.url(), config)
    assert error.code == "http_status" and not error.transient
    assert error.message == (f"HTTP {code} {reason} from 127.0.0.1 "
                             "(not a redirect this service follows)")


def test_idn_redirect_names_the_host_readably(config):
    location = "http://bücher.invalid/x".encode()
    server = RawResponseServer(b"HTTP/1.1 302 Found\r\nLocation: " + location
                               + b"\r\nContent-Length: 0\r\n\r\n")
    _, error, _ = fetch(server.url(), config)
    assert error.code == "dns"
    assert error.message == "could not resolve host bücher.invalid"


def test_invalid_host_name_in_redirect(config):
    bad = b"http://" + b"a" * 70 + b".example/x"  # a DNS label over 63 characters
    server = RawResponseServer(b"HTTP/1.1 302 Found\r\nLocation: " + bad
                               + b"\r\nContent-Length: 0\r\n\r\n")
    _, error, _ = fetch(server.url(), config)
    assert error.code == "dns" and not error.transient
    assert error.message == f"'{'a' * 70}.example' is not a valid host name"


def test_absurd_content_length_is_too_large_and_never_recorded(config):
    server = RawResponseServer(OK + b"Content-Length: 99999999999999999999\r\n\r\nhello")
    _, error, download = fetch(server.url(), config)
    assert error.code == "too_large"
    assert download.bytes_total is None  # nothing that BSON could not store


def test_a_fetch_the_http_client_never_ends_still_ends(config):
    """Tornado 6.6 without our hooks never resolves a fetch whose chunk-size
    line is over 64 bytes. The download must end all the same: the watchdog
    aborts it and gives the fetch up."""
    server = RawResponseServer(LONG_EXTENSION)
    plain = AsyncHTTPClient(force_instance=True)
    started = time.monotonic()
    _, error, _ = fetch(server.url(), config, client=plain)
    assert error.code == "timeout" and error.transient
    assert error.message == "no data from 127.0.0.1 for 2 s"
    assert time.monotonic() - started < 20  # the bound is idle 2 s + grace 2 s


def test_private_tornado_hooks_still_exist():
    """These overrides rely on private Tornado methods. If an upgrade
    removes or renames one, fail here, loudly, not in production."""
    for cls, name in httpclient_hooks.PRIVATE_HOOKS:
        assert callable(getattr(cls, name, None)), f"Tornado no longer has {cls.__name__}.{name}"
    from tornado.iostream import IOStream
    import socket
    with socket.socket() as sock:
        stream = IOStream(sock)
        for name in httpclient_hooks.PRIVATE_STREAM_ATTRIBUTES:
            assert hasattr(stream, name), f"Tornado's IOStream no longer has {name}"


def test_chunk_size_parsing():
    parse = httpclient_hooks.parse_chunk_size
    assert parse(b"1a\r\n") == 26
    assert parse(b"1A;name=value;x\r\n") == 26
    assert parse(b"0\r\n") == 0
    assert parse(b" 5 \r\n") == 5
    for bad in (b"\r\n", b"-1\r\n", b"0x5\r\n", b"g\r\n", b"1" * 17 + b"\r\n", b";x\r\n"):
        assert parse(bad) is None, bad


# -- through the running service ------------------------------------------

def test_32_long_chunk_extensions_do_not_stop_processing(service, files):
    """The review's attack: 32 such submits held every slot forever."""
    server = RawResponseServer(LONG_EXTENSION)
    ids = [service.submit(server.url(f"/f{i}")) for i in range(32)]
    normal = service.submit(files.url("/bytes/1000"))
    results = service.wait_all(ids + [normal], timeout=60)
    expected = hashlib.md5(b"hello world").hexdigest()
    for task_id in ids:
        assert results[task_id].json() == {"md5": expected, "status": "done",
                                           "url": server.url(f"/f{ids.index(task_id)}")}
    assert results[normal].json()["md5"] == md5_of(1000)


def test_malformed_response_fails_once_with_reason(service):
    server = RawResponseServer(MALFORMED["Transfer-Encoding with Content-Length"][0])
    task_id = service.submit(server.url())
    r = service.wait(task_id)
    assert r.status_code == 502
    assert r.json()["error"] == ("127.0.0.1 sent a malformed HTTP response: it sent both "
                                 "Transfer-Encoding and Content-Length")
    task = service.task(task_id)
    assert task["attempts"] == 1 and task["error_code"] == "bad_response"
    assert server.hits == 1


def test_absurd_content_length_fails_as_too_large_not_internal(service):
    server = RawResponseServer(OK + b"Content-Length: 99999999999999999999\r\n\r\nhello")
    r = service.wait(service.submit(server.url()))
    assert r.status_code == 502
    assert r.json()["error"] == "file larger than 10 GiB limit"


def test_interim_1xx_answers_are_skipped(service):
    server = RawResponseServer(CURL_HASHES["1xx before 200"])
    r = service.wait(service.submit(server.url()))
    assert r.status_code == 200 and r.json()["md5"] == hashlib.md5(b"hello").hexdigest()


def test_health_reports_a_stuck_worker(service, mongo):
    """A worker whose downloads made no progress for 2 x IDLE_TIMEOUT sends
    stuck=N in its heartbeat; /health names it and answers 503."""
    assert requests.get(service.base + "/health").status_code == 200
    db = MongoClient(mongo)[service.db_name]
    db.workers.insert_one({"_id": "host:4242", "heartbeat_at": dt.datetime.now(dt.timezone.utc),
                           "active": 3, "stuck": 2})
    try:
        r = requests.get(service.base + "/health")
        assert r.status_code == 503
        assert r.json()["stuck_workers"] == ["host:4242"]
        assert r.json()["status"] == "unhealthy"
    finally:
        db.workers.delete_one({"_id": "host:4242"})
    assert requests.get(service.base + "/health").status_code == 200


def test_worker_counts_downloads_without_progress(config):
    from service.runtime.worker import Worker
    worker = Worker(config, store=None, name="w")
    fresh = Download("http://127.0.0.1/a", config, worker.client, None)
    old = Download("http://127.0.0.1/b", config, worker.client, None)
    old.last_progress -= 2 * config.idle_timeout + 1
    worker.active = {"a": ({}, fresh), "b": ({}, old)}
    assert worker._stuck() == 1
    worker.client.close()
