"""Would tornado.curl_httpclient remove the private hooks at no cost?
1 GiB from a local nginx into md5, three fetches per round, two rounds:
Tornado's simple client with md5-light's hooks, or CurlAsyncHTTPClient
(pycurl), each beside `curl | md5sum`. Wall time and CPU seconds of the
fetching process. pycurl is not a dependency of the service; give the
client to measure, in a venv that has what it needs:

    .venv/bin/python -m bench.http_clients ours
    python -m venv /tmp/cv && /tmp/cv/bin/pip install pycurl tornado requests pymongo
    PYTHONPATH=. /tmp/cv/bin/python -m bench.http_clients curl
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.perf import MiB, Nginx


async def fetch(client, url: str, cpu: list[float]) -> tuple[float, str]:
    from tornado.httpclient import HTTPRequest
    md5 = hashlib.md5()
    wall, used = time.perf_counter(), time.process_time()
    await client.fetch(HTTPRequest(url, streaming_callback=md5.update, request_timeout=120))
    cpu.append(time.process_time() - used)
    return time.perf_counter() - wall, md5.hexdigest()


def hooked_client():
    from tornado.netutil import DefaultExecutorResolver

    from service.fetch import tornado_hooks
    return tornado_hooks.make_client(DefaultExecutorResolver(), 4, 65536)


def curl_client():
    from tornado.curl_httpclient import CurlAsyncHTTPClient
    # Its max_body_size applies to streamed bodies too (default 100 MB).
    return CurlAsyncHTTPClient(force_instance=True, max_clients=4, max_body_size=1 << 40)


def main() -> None:
    make = {"ours": hooked_client, "curl": curl_client}[sys.argv[1]]
    root = Path(tempfile.mkdtemp(prefix="clients-"))
    root.chmod(0o755)
    with open(root / "f1g", "wb") as out:
        block = os.urandom(16 * MiB)
        for i in range(64):
            out.write(bytes([i]) + block[1:])
    nginx = Nginx(root)
    url, cpu, times = nginx.url("f1g"), [], {}
    try:
        for _ in range(2):
            started = time.perf_counter()
            expected = subprocess.run(f"curl -s {url} | md5sum", shell=True, check=True,
                                      capture_output=True, text=True).stdout.split()[0]
            times.setdefault("curl | md5sum", []).append(time.perf_counter() - started)

            async def three():
                client = make()
                return [await fetch(client, url, cpu) for _ in range(3)]
            for took, digest in asyncio.run(three()):
                if digest != expected:
                    raise SystemExit(f"WRONG md5 from {sys.argv[1]}: {digest} != {expected}")
                times.setdefault(sys.argv[1], []).append(took)
    finally:
        nginx.stop()
        shutil.rmtree(root, ignore_errors=True)
    for name, runs in times.items():
        print(f"{name:14s} best {min(runs):.3f}s  runs {[round(t, 2) for t in runs]}")
    print(f"CPU seconds per GiB in the fetching process: best {min(cpu):.3f}")


if __name__ == "__main__":
    main()
