"""SSRF defences and hostile input. The policy is checked on the addresses
names really resolve to (here through RESOLVE, a curl --resolve style map,
so no test needs the internet), on every redirect hop, and on IP literals
in every spelling."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
import time

import pytest
import requests

from fileserver import ThreadedServer, md5_of
from service.fetch.netpolicy import AddressPolicy, is_public, parse_ip_literal

BLOCKED = {
    "loopback": "127.0.0.1", "loopback-other": "127.45.6.7", "rfc1918-10": "10.0.0.1",
    "rfc1918-172": "172.16.5.4", "rfc1918-192": "192.168.1.1",
    "metadata": "169.254.169.254", "cgnat": "100.64.0.1", "multicast": "224.0.0.251",
    "reserved": "240.0.0.1", "broadcast": "255.255.255.255", "unspecified": "0.0.0.0",
    "benchmark": "198.18.0.1", "v6-loopback": "::1", "v6-unspecified": "::",
    "v6-ula": "fd00::1", "v6-ula-fc": "fc00::5", "v6-linklocal": "fe80::1",
    "v6-multicast": "ff02::1", "v4-mapped": "::ffff:127.0.0.9",
    "v4-mapped-private": "::ffff:10.0.0.1", "nat64-private": "64:ff9b::a00:1",
    "nat64-metadata": "64:ff9b::a9fe:a9fe", "6to4-private": "2002:c0a8:101::1",
}
ALLOWED = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808"]


@pytest.mark.parametrize("name", sorted(BLOCKED))
def test_policy_blocks_every_family(name):
    assert not is_public(ipaddress.ip_address(BLOCKED[name]))


@pytest.mark.parametrize("addr", ALLOWED)
def test_policy_allows_public(addr):
    assert is_public(ipaddress.ip_address(addr))


@pytest.mark.parametrize("spelling", [
    "2130706433", "0x7f000001", "017700000001", "0177.0.0.1", "0x7f.0.0.1", "127.1",
    "127.0.1", "0x7f.1", "[::1]", "[::ffff:127.0.0.1]", "0"])
def test_odd_literal_spellings_are_recognised(spelling):
    ip = parse_ip_literal(spelling)
    assert ip is not None and not is_public(ip)


def test_names_are_not_literals():
    for host in ("example.com", "cafe", "deadbeef.com", "1.example", "a1b2"):
        assert parse_ip_literal(host) is None


def test_allow_networks_exception():
    policy = AddressPolicy(allow_networks=["127.0.0.1/32"])
    assert policy.allows(ipaddress.ip_address("127.0.0.1"))
    assert policy.allows(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert not policy.allows(ipaddress.ip_address("127.0.0.2"))


@pytest.fixture(scope="module")
def strict(mongo, logs, files):
    """Private addresses blocked, except 127.0.0.1 where the test file
    servers live; names mapped to each blocked family."""
    from servicectl import Service
    resolve = ",".join(f"{name}.evil.test={addr}" for name, addr in BLOCKED.items())
    resolve += ",files.test=127.0.0.1"
    svc = Service(mongo, logs, ALLOW_PRIVATE_URLS="0", ALLOW_NETWORKS="127.0.0.1/32",
                  RESOLVE=resolve, WORKERS="1").start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def closed(mongo, logs):
    """The default policy: nothing private at all."""
    from servicectl import Service
    svc = Service(mongo, logs, ALLOW_PRIVATE_URLS="0", WORKERS="1").start()
    yield svc
    svc.stop()


def test_strict_service_still_fetches_allowed_network(strict, files):
    r = strict.wait(strict.submit(f"http://files.test:{files.port}/bytes/500"))
    assert r.status_code == 200 and r.json()["md5"] == md5_of(500)


def test_names_resolving_to_blocked_families_fail(strict):
    ids = {name: strict.submit(f"http://{name}.evil.test:8080/x") for name in BLOCKED}
    if_loopback = {"loopback"}  # 127.0.0.1 is the allowed test network
    for name, task_id in ids.items():
        r = strict.wait(task_id)
        if name in if_loopback:
            continue
        assert r.status_code == 502, (name, r.text)
        error = r.json()["error"]
        shown = ipaddress.ip_address(BLOCKED[name])
        assert error == (f"{name}.evil.test resolves to {shown}, which is a private "
                         "or reserved address that this service does not fetch from"), error
        assert strict.task(task_id)["attempts"] == 1  # permanent: not retried


@pytest.fixture(scope="module")
def second_loopback_server():
    """A live server on 127.0.0.2: refused even though it would answer."""
    try:
        return ThreadedServer("127.0.0.2").start()
    except OSError:
        pytest.skip("127.0.0.2 not bindable here")


def test_redirect_to_blocked_address_fails(strict, files, second_loopback_server):
    target = second_loopback_server.url("/bytes/10")
    assert requests.get(target, timeout=5).status_code == 200  # it is really there
    r = strict.wait(strict.submit(files.url(f"/redirect-to?to={target}")))
    assert r.status_code == 502
    assert r.json()["error"] == ("127.0.0.2 is a private or reserved address that this "
                                 "service does not fetch from")


def test_redirect_to_name_resolving_to_metadata_fails(strict, files):
    r = strict.wait(strict.submit(files.url("/redirect-to?to=http://metadata.evil.test/latest")))
    assert r.status_code == 502
    assert "169.254.169.254" in r.json()["error"]


def test_redirect_to_other_scheme_fails(strict, files):
    r = strict.wait(strict.submit(files.url("/redirect-to?to=file:///etc/passwd")))
    assert r.status_code == 502
    assert r.json()["error"] == "redirect to an unsupported URL scheme from 127.0.0.1"


@pytest.mark.parametrize("host", [
    "2130706433", "0x7f000001", "017700000001", "0177.0.0.1", "127.1", "[::1]",
    "[::ffff:127.0.0.1]", "10.0.0.1", "169.254.169.254", "[fe80::1]", "0", "100.64.1.1"])
def test_blocked_literals_refused_at_submit(closed, host):
    r = requests.post(closed.base + "/submit", data={"url": f"http://{host}:8080/file"})
    assert r.status_code == 400, r.text
    assert "private or reserved address" in r.json()["error"]


def test_default_policy_blocks_loopback_names(closed, files):
    """localhost is a name, not a literal: refused when it resolves."""
    r = closed.wait(closed.submit(f"http://localhost:{files.port}/bytes/10"))
    assert r.status_code == 502
    assert "private or reserved address" in r.json()["error"]


# -- hostile requests -------------------------------------------------------

@pytest.mark.parametrize("data,ctype", [
    (b"url=\xff\xfe", "application/x-www-form-urlencoded"),
    (b'{"url": "\xff"}', "application/json"),
    (b'{"url": 5}', "application/json"),
    (b'["http://x"]', "application/json"),
    (b"{not json", "application/json"),
    (b"url=http%3A%2F%2Fa.com%2F&url=http%3A%2F%2Fb.com%2F", "application/x-www-form-urlencoded"),
    (b"url=http%3A%2F%2Fa.com%2F%00", "application/x-www-form-urlencoded"),
    (b"url=http%3A%2F%2Fa.com%2F%0d%0aX-Evil%3A1", "application/x-www-form-urlencoded"),
    (b"url=http%3A%2F%2Fa.com%2F&email=a%40b.com%0d%0aBcc%3Aevil%40x.com",
     "application/x-www-form-urlencoded"),
])
def test_hostile_bodies_get_400(service, data, ctype):
    r = requests.post(service.base + "/submit", data=data, headers={"Content-Type": ctype})
    assert r.status_code == 400, r.text
    assert "error" in r.json()


def test_invalid_utf8_in_query_gets_400(service):
    r = requests.post(service.base + "/submit?url=%ff%fe")
    assert r.status_code == 400 and "error" in r.json()


def test_oversized_chunked_body_gets_413(service):
    def gen():
        for _ in range(100):
            yield b"u" * 1024
    r = requests.post(service.base + "/submit", data=gen(),
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413


def test_100kb_url_gets_4xx(service):
    long_url = "http://example.com/" + "a" * 100_000
    r = requests.post(service.base + "/submit", data={"url": long_url})
    assert 400 <= r.status_code < 500
    r = requests.post(service.base + "/submit", params={"url": long_url})
    assert 400 <= r.status_code < 500


def test_many_params_get_4xx(service):
    body = "&".join(f"p{i}=x" for i in range(10000))
    r = requests.post(service.base + "/submit", data=body,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert 400 <= r.status_code < 500


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "BREW"])
def test_unknown_methods_get_405(service, method):
    r = requests.request(method, service.base + "/submit")
    assert r.status_code == 405
    assert "error" in r.json()


def test_slow_client_does_not_block_others(service):
    slow = socket.create_connection(("127.0.0.1", service.port))
    slow.sendall(b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nurl=")
    try:
        t0 = time.monotonic()
        r = requests.get(service.base + "/check", params={"id": "x"}, timeout=5)
        assert r.status_code == 404
        assert time.monotonic() - t0 < 2
    finally:
        slow.close()


def test_logs_hide_email_addresses(service, files):
    secret = "very.private.person@example.org"
    service.submit(files.url("/bytes/5"), email=secret)
    requests.post(service.base + "/submit", params={"url": "ftp://x", "email": secret})
    time.sleep(0.5)
    assert secret not in service.log()


def test_schemathesis_finds_no_5xx_and_no_schema_violation(closed, tmp_path):
    """Property-based fuzzing of every operation against openapi.yaml. A
    500 is declared nowhere, so status_code_conformance finds any; the
    not_a_server_error check is left out because /check answers a failed
    task with 502 by contract, and schemathesis now finds real task ids
    (GET /tasks lists them) whose downloads this strict service refused."""
    st = [sys.executable, "-m", "schemathesis.cli"]
    cmd = st + ["run", f"{closed.base}/openapi.yaml", "--url", closed.base,
                "--checks", "status_code_conformance,"
                "content_type_conformance,response_schema_conformance,"
                "response_headers_conformance",
                "--max-examples", "40", "--phases", "examples,coverage,fuzzing",
                "--request-timeout", "10", "--seed", "1", "--no-color"]
    # cwd: schemathesis keeps a cache of crashes in ./.schemathesis
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
