"""Hardening: no secrets in logs (query strings, user info, emails), and an
address policy that is default-deny for every IPv6 form that embeds or
routes to a blocked IPv4 address or is not globally routable."""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import socket
import os
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fileserver import md5_of
from service.runtime.logs import JsonFormatter, TextFormatter
from service.fetch.netpolicy import AddressPolicy, embedded_ipv4s, is_public, parse_ip_literal
from service.redact import safe_url, scrub_urls
from servicectl import Service

ROOT = Path(__file__).resolve().parent.parent

# -- 6. secrets in logs -------------------------------------------------------

SECRET = "s3cr3t-T0KEN-4a7f9c"
EMAIL = "leaky.person@example.org"
QUERY = urllib.parse.urlencode({"token": SECRET, "email": EMAIL})


def _secret_forms() -> list[str]:
    """The secret and the email in every spelling a log line could use."""
    return [SECRET, EMAIL, urllib.parse.quote(EMAIL), urllib.parse.quote_plus(EMAIL),
            urllib.parse.quote(urllib.parse.quote(EMAIL))]


@pytest.mark.parametrize("url,shown", [
    (f"http://files.example.com/a/b.iso?{QUERY}", "http://files.example.com/a/b.iso"),
    (f"https://files.example.com:8443/x#{SECRET}", "https://files.example.com:8443/x"),
    (f"http://user:{SECRET}@files.example.com/x", "http://files.example.com/x"),
    (f"http://[2001:db8::1]:8080/x?{QUERY}", "http://[2001:db8::1]:8080/x"),
    (f"http://files.example.com?{QUERY}", "http://files.example.com"),
    (f"http://files.example.com/x;jsessionid={SECRET}", "http://files.example.com/x"),
    (f"http://[broken/x?{QUERY}", "http://[broken/x"),
    ("http://files.example.com/" + "a" * 500 + f"?{QUERY}",
     "http://files.example.com/" + "a" * 172 + "..."),
])
def test_safe_url_keeps_scheme_host_port_and_path(url, shown):
    assert safe_url(url) == shown


def test_scrub_urls_in_free_text():
    text = (f"ValueError: bad redirect to https://other.test/next?{QUERY} from "
            f"GET /submit?{QUERY} (127.0.0.1) uri='/check?{QUERY}' "
            f"ftp://me:{SECRET}@ftp.test/pub")
    scrubbed = scrub_urls(text)
    for secret in _secret_forms():
        assert secret not in scrubbed
    assert "https://other.test/next" in scrubbed
    assert "GET /submit (127.0.0.1)" in scrubbed and "uri='/check'" in scrubbed
    assert "ftp://ftp.test/pub" in scrubbed
    plain = "url must start with http:// or https:// (data in /var/lib/x, ok?)"
    assert scrub_urls(plain) == plain


@pytest.mark.parametrize("formatter", [TextFormatter("%(name)s: %(message)s"), JsonFormatter()],
                         ids=["text", "json"])
def test_formatters_scrub_messages_and_tracebacks(formatter):
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    log = logging.getLogger(f"md5light.test.{uuid.uuid4().hex}")
    log.addHandler(handler)
    log.propagate = False
    try:
        raise ValueError(f"Unsupported url scheme: ftp://files.test/x?{QUERY}")
    except ValueError:
        log.exception("fetching http://files.test/a.bin?%s failed", QUERY, stack_info=True)
    text = out.getvalue()
    for secret in _secret_forms():
        assert secret not in text
    assert "http://files.test/a.bin" in text and "ftp://files.test/x" in text
    assert "Traceback" in text


def test_uncaught_exceptions_are_scrubbed(tmp_path):
    """Tracebacks that Python would print straight to stderr, from the main
    thread and from other threads, go through the scrubbing log handler."""
    script = tmp_path / "crash.py"
    script.write_text(
        "import sys, threading\n"
        "from service.runtime import logs\n"
        "logs.setup('INFO', sys.argv[1])\n"
        f"url = 'http://files.test/a.bin?{QUERY}'\n"
        "def boom():\n"
        "    raise RuntimeError('thread failed on ' + url)\n"
        "t = threading.Thread(target=boom, name='fetcher'); t.start(); t.join()\n"
        "raise RuntimeError('main failed on ' + url)\n")
    for fmt in ("text", "json"):
        # PYTHONPATH: a script run by path sees its own folder, not the repo.
        run = subprocess.run([sys.executable, str(script), fmt], capture_output=True,
                             text=True, timeout=60, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert run.returncode == 1
        for secret in _secret_forms():
            assert secret not in run.stderr + run.stdout
        assert "thread failed on http://files.test/a.bin" in run.stderr
        assert "main failed on http://files.test/a.bin" in run.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(data)
        chunks = []
        while True:
            try:
                chunk = conn.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_service_logs_never_show_query_strings(make_service, files, log_format):
    """Success, failure, retry, redirects, refused connections and API
    errors, at DEBUG, with a secret token and an email in every URL."""
    svc = make_service(LOG_LEVEL="DEBUG", LOG_FORMAT=log_format, MAX_ATTEMPTS="2")
    key = uuid.uuid4().hex
    second_hop = files.url(f"/bytes/64?{QUERY}")
    urls = {
        "done": files.url(f"/bytes/100?{QUERY}"),
        "failed": files.url(f"/status/404?{QUERY}"),
        "retried": files.url(f"/flaky/{key}/200?fails=1&{QUERY}"),
        "redirected": files.url(f"/redirect/2/bytes/50?{QUERY}"),
        "redirected-to": files.url("/redirect-to?" + urllib.parse.urlencode({"to": second_hop})),
        "bad-scheme": files.url("/redirect-to?" + urllib.parse.urlencode(
            {"to": f"ftp://me:{SECRET}@127.0.0.1/x?{QUERY}"})),
        "refused": f"http://127.0.0.1:{_closed_port()}/file.bin?{QUERY}",
    }
    ids = {name: svc.submit(url, email=EMAIL) for name, url in urls.items()}
    r = requests.post(svc.base + "/submit", params={"url": urls["done"], "email": EMAIL},
                      timeout=10)
    assert r.status_code == 202
    ids["query-submit"] = r.json()["id"]
    assert requests.post(svc.base + "/submit", params={"url": f"ftp://x/?{QUERY}",
                                                       "email": EMAIL}, timeout=10).status_code == 400
    assert requests.get(svc.base + f"/nowhere?{QUERY}", timeout=10).status_code == 404
    answer = _raw_request(svc.port, (
        f"GET /check?{QUERY} HTTP/1.1\r\nHost: x\r\n"
        f"Referer: http://evil.test/p?{QUERY}\x01\r\n\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 400")

    results = svc.wait_all(list(ids.values()), timeout=120)
    outcome = {name: results[task_id] for name, task_id in ids.items()}
    assert outcome["done"].json()["md5"] == md5_of(100)
    assert outcome["retried"].json()["md5"] == md5_of(200)
    assert svc.task(ids["retried"])["attempts"] == 2
    assert outcome["redirected"].json()["md5"] == md5_of(50)
    assert outcome["redirected-to"].json()["md5"] == md5_of(64)
    for name in ("failed", "bad-scheme", "refused"):
        assert outcome[name].status_code == 502, (name, outcome[name].text)
    # The user still gets their own URL back, whole.
    assert outcome["done"].json()["url"] == urls["done"]

    time.sleep(0.5)  # the last lines of the worker processes
    log = svc.log()
    for secret in _secret_forms():
        assert secret not in log, f"{secret!r} leaked into the log"
    host = f"127.0.0.1:{files.port}"
    for path in ("/bytes/100", "/status/404", f"/flaky/{key}/200", "/redirect/2/bytes/50",
                 "/redirect-to"):
        assert f"http://{host}{path}" in log, path
    assert "HTTP 404 Not Found from 127.0.0.1" in log
    assert "Malformed HTTP message" in log  # Tornado's own line, scrubbed
    if log_format == "json":
        lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        assert any(line["logger"] == "md5light.worker" for line in lines)


# -- 7. address policy --------------------------------------------------------

TEREDO_EXAMPLE = "2001:0:4136:e378:8000:63bf:3fff:fdd2"  # RFC 4380's, client 192.0.2.45

BLOCKED = {
    # IPv4 special-purpose registry
    "this-network": "0.1.2.3", "rfc1918-10": "10.1.2.3", "cgnat": "100.64.0.1",
    "loopback": "127.0.0.1", "link-local": "169.254.169.254", "rfc1918-172": "172.16.0.1",
    "ietf-protocol": "192.0.0.9", "test-net-1": "192.0.2.1", "6to4-relay": "192.88.99.1",
    "rfc1918-192": "192.168.0.1", "benchmark": "198.18.0.1", "test-net-2": "198.51.100.1",
    "test-net-3": "203.0.113.1", "multicast": "224.0.0.251", "mcast-test": "233.252.0.1",
    "reserved": "240.0.0.1", "broadcast": "255.255.255.255",
    # IPv6 special-purpose registry and the deprecated forms
    "v6-unspecified": "::", "v6-loopback": "::1", "v6-two": "::2",
    "compat-loopback": "::127.0.0.1", "compat-metadata": "::169.254.169.254",
    "compat-public": "::8.8.8.8", "mapped-loopback": "::ffff:127.0.0.1",
    "mapped-metadata": "::ffff:169.254.169.254", "siit-loopback": "::ffff:0:127.0.0.1",
    "siit-metadata": "::ffff:0:169.254.169.254", "siit-public": "::ffff:0:8.8.8.8",
    "nat64-loopback": "64:ff9b::7f00:1", "nat64-metadata": "64:ff9b::a9fe:a9fe",
    "nat64-local-use": "64:ff9b:1::808:808", "nat64-local-use-private": "64:ff9b:1::a00:1",
    "discard": "100::1", "dummy-prefix": "100:0:0:1::1",
    "teredo": TEREDO_EXAMPLE, "teredo-public": "2001:0:808:808:0:0:f7f7:f7f7",
    "pcp-anycast": "2001:1::1", "benchmark-v6": "2001:2::1", "amt": "2001:3::1",
    "orchid": "2001:10::1", "orchid-v2": "2001:20::1", "documentation": "2001:db8::1",
    "6to4-loopback": "2002:7f00:1::1", "6to4-metadata": "2002:a9fe:a9fe::1",
    "6to4-private": "2002:c0a8:101::1", "6to4-public": "2002:808:808::1",
    "documentation-3fff": "3fff::1",
    "srv6-sid": "5f00::1", "unallocated": "4000::1", "ula": "fd12:3456::1",
    "link-local-v6": "fe80::1", "site-local": "fec0::1", "multicast-v6": "ff0e::1",
}
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111",
          "2001:4860:4860::8888", "2a00:1450:4001:800::200e", "64:ff9b::808:808",
          "::ffff:8.8.8.8"]


@pytest.mark.parametrize("name", sorted(BLOCKED))
def test_policy_blocks(name):
    ip = ipaddress.ip_address(BLOCKED[name])
    assert not AddressPolicy().allows(ip) and not is_public(ip)


@pytest.mark.parametrize("addr", PUBLIC)
def test_policy_allows_public(addr):
    assert AddressPolicy().allows(ipaddress.ip_address(addr))


@pytest.mark.parametrize("allowed,addr,expected", [
    ("127.0.0.1/32", "127.0.0.1", True),
    ("127.0.0.1/32", "::ffff:127.0.0.1", True),
    ("127.0.0.1/32", "64:ff9b::7f00:1", True),  # a translator connects to it
    ("127.0.0.1/32", "127.0.0.2", False),
    ("127.0.0.1/32", "::127.0.0.1", False),  # tunnels reach some other host
    ("127.0.0.1/32", "::ffff:0:127.0.0.1", False),
    ("127.0.0.1/32", "2002:7f00:1::1", False),
    ("10.0.0.0/8", "::ffff:10.9.8.7", True),
    ("fec0::/10", "fec0::1", True),
    ("fd00::/8", "fd00::1", True),
    ("fd00::/8", "fe80::1", False),
])
def test_allow_networks_exceptions(allowed, addr, expected):
    assert AddressPolicy(allow_networks=[allowed]).allows(ipaddress.ip_address(addr)) is expected


def test_allow_private_allows_everything():
    policy = AddressPolicy(allow_private=True)
    assert all(policy.allows(ipaddress.ip_address(a)) for a in BLOCKED.values())


@pytest.mark.parametrize("addr,inner", [
    ("::ffff:10.0.0.1", ["10.0.0.1"]), ("::10.0.0.1", ["10.0.0.1"]),
    ("::ffff:0:10.0.0.1", ["10.0.0.1"]), ("64:ff9b::a00:1", ["10.0.0.1"]),
    ("2002:a00:1::1", ["10.0.0.1"]), (TEREDO_EXAMPLE, ["65.54.227.120", "192.0.2.45"]),
    ("2606:4700:4700::1111", []),
])
def test_embedded_ipv4s(addr, inner):
    assert [str(i) for i in embedded_ipv4s(ipaddress.ip_address(addr))] == inner


# The property: whatever the policy allows is global, and so is every IPv4
# address it carries. The oracle is the standard library plus what it does
# not know (it calls ::127.0.0.1, ::ffff:0:127.0.0.1 and fec0::1 global):
# the IANA IPv6 address space, where only 2000::/3 is global unicast, and
# the registries' non-global blocks, written out here independently of
# the policy's own tables.
NOT_GLOBAL_IANA = [ipaddress.ip_network(n) for n in (
    "::/96", "::ffff:0:0:0/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32",
    "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    "192.88.99.0/24", "100.64.0.0/10", "0.0.0.0/8", "240.0.0.0/4")]
GLOBAL_UNICAST_SPACE = ipaddress.ip_network("2000::/3")
WELL_KNOWN_NAT64 = ipaddress.ip_network("64:ff9b::/96")

def _carried_by_stdlib(ip) -> list:
    if ip.version == 4:
        return []
    out = [ip.ipv4_mapped, ip.sixtofour] + list(ip.teredo or ())
    return [i for i in out if i is not None]


def _assert_allowed_means_global(ip, carried=()) -> None:
    if not AddressPolicy().allows(ip):
        return
    # A mapped address is an IPv4 connection: judge the IPv4 address (older
    # Pythons call every mapped address non-global).
    destination = ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip
    assert destination.is_global and not destination.is_multicast, ip
    assert not any(destination.version == n.version and destination in n
                   for n in NOT_GLOBAL_IANA), ip
    if destination.version == 6:
        assert destination in GLOBAL_UNICAST_SPACE or destination in WELL_KNOWN_NAT64, ip
    for inner in [*carried, *_carried_by_stdlib(ip)]:
        assert inner.is_global and not inner.is_multicast, (ip, inner)


def _v6(value: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(value)


EMBEDDINGS = {
    "mapped": lambda v4, rest: _v6(0xFFFF << 32 | int(v4)),
    "compat": lambda v4, rest: _v6(int(v4)),
    "siit": lambda v4, rest: _v6(0xFFFF << 48 | int(v4)),
    "nat64": lambda v4, rest: _v6(0x64FF9B << 96 | int(v4)),
    "6to4": lambda v4, rest: _v6(0x2002 << 112 | int(v4) << 80 | rest & (2**80 - 1)),
    "teredo-client": lambda v4, rest: _v6(
        0x20010000 << 96 | (rest & 2**64 - 1) << 32 | int(v4) ^ 0xFFFFFFFF),
    "teredo-server": lambda v4, rest: _v6(0x20010000 << 96 | int(v4) << 64 | rest & 2**64 - 1),
}
SPECIAL_V6 = ["::/8", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001::/23",
              "2001::/32", "2001:20::/28", "2001:db8::/32", "2002::/16", "3fff::/20",
              "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8", "2000::/3"]
SPECIAL_V4 = ["0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
              "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24",
              "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4", "0.0.0.0/0"]

PROPERTY = settings(max_examples=1500, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
v4_addresses = st.one_of(st.ip_addresses(v=4),
                         st.sampled_from(SPECIAL_V4).flatmap(lambda n: st.ip_addresses(network=n)))
v6_addresses = st.one_of(st.ip_addresses(v=6),
                         st.sampled_from(SPECIAL_V6).flatmap(lambda n: st.ip_addresses(network=n)))


@PROPERTY
@given(ip=st.one_of(v4_addresses, v6_addresses))
def test_property_allowed_addresses_are_global(ip):
    _assert_allowed_means_global(ip)


@PROPERTY
@given(v4=v4_addresses, how=st.sampled_from(sorted(EMBEDDINGS)),
       rest=st.integers(0, 2**80 - 1))
def test_property_embedded_ipv4_must_be_global(v4, how, rest):
    ip = EMBEDDINGS[how](v4, rest)
    _assert_allowed_means_global(ip, carried=[v4])
    if not AddressPolicy().allows(v4):
        assert not AddressPolicy().allows(ip), (how, v4, ip)


@PROPERTY
@given(v4=v4_addresses, how=st.sampled_from(["mapped", "nat64"]))
def test_property_public_ipv4_stays_reachable_in_translated_forms(v4, how):
    ip = EMBEDDINGS[how](v4, 0)
    assert AddressPolicy().allows(ip) == AddressPolicy().allows(v4), (how, v4, ip)


# End to end: a strict service (everything private blocked except the test
# file servers' 127.0.0.1), names resolving to the new forms, and literals.

NEW_FORMS = {"compat": "::127.0.0.1", "compat-metadata": "::169.254.169.254",
             "siit": "::ffff:0:169.254.169.254", "site-local": "fec0::1", "two": "::2",
             "teredo": TEREDO_EXAMPLE, "nat64-local": "64:ff9b:1::a9fe:a9fe",
             "srv6": "5f00::1", "relay": "192.88.99.1"}


@pytest.fixture(scope="module")
def strict(mongo, logs, files):
    resolve = ",".join(f"{name}.evil.test={addr}" for name, addr in NEW_FORMS.items())
    resolve += ",files.test=127.0.0.1,mapped.test=::ffff:127.0.0.1"
    svc = Service(mongo, logs, ALLOW_PRIVATE_URLS="0", ALLOW_NETWORKS="127.0.0.1/32",
                  RESOLVE=resolve, WORKERS="1").start()
    yield svc
    svc.stop()


def test_names_resolving_to_new_forms_fail(strict):
    ids = {name: strict.submit(f"http://{name}.evil.test:8080/x") for name in NEW_FORMS}
    for name, task_id in ids.items():
        r = strict.wait(task_id)
        assert r.status_code == 502, (name, r.text)
        shown = ipaddress.ip_address(NEW_FORMS[name])
        assert r.json()["error"] == (
            f"{name}.evil.test resolves to {shown}, which is a private or reserved address "
            "that this service does not fetch from"), name
        assert strict.task(task_id)["attempts"] == 1


def test_allowed_network_still_fetched_in_its_mapped_form(strict, files):
    r = strict.wait(strict.submit(f"http://files.test:{files.port}/bytes/300"))
    assert r.status_code == 200 and r.json()["md5"] == md5_of(300)
    if not socket.has_ipv6:
        pytest.skip("no IPv6 sockets here")
    r = strict.wait(strict.submit(f"http://mapped.test:{files.port}/bytes/301"))
    assert r.status_code == 200, r.text
    assert r.json()["md5"] == md5_of(301)


@pytest.mark.parametrize("host", [
    "[::127.0.0.1]", "[::169.254.169.254]", "[::ffff:0:127.0.0.1]", "[::ffff:0:a9fe:a9fe]",
    "[fec0::1]", "[::2]", f"[{TEREDO_EXAMPLE}]", "[64:ff9b:1::a00:1]", "[100::1]",
    "[2001:db8::1]", "[3fff::1]", "[5f00::1]", "[2001:20::1]", "[2002:a9fe:a9fe::1]",
    "[64:ff9b::7f00:2]", "192.88.99.1", "[::]"])
def test_new_literals_refused_at_submit(strict, host):
    assert parse_ip_literal(host) is not None
    r = requests.post(strict.base + "/submit", data={"url": f"http://{host}:8080/file"},
                      timeout=10)
    assert r.status_code == 400, r.text
    shown = ipaddress.ip_address(host.strip("[]"))
    assert r.json() == {"error": f"url points to {shown}, a private or reserved address "
                                 "that this service does not fetch from"}
