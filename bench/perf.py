#!/usr/bin/env python3
"""Performance benchmarks (issue: hash at the speed of the machine).

Every figure is a ratio against a baseline measured in the same run on
the same machine: `curl -s URL | md5sum` from a local nginx, alone or
through xargs -P. Every md5 is checked against md5sum of the file.

    make bench            # or: .venv/bin/python -m bench.perf [--only 1,2,...]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from pymongo import MongoClient

from bench.common import Stack, free_port, table, wait_answering

MiB = 1024 * 1024
GiB = 1024 * MiB


class Nginx:
    """nginx serving ``root`` on 127.0.0.1; ``http`` and ``server`` add
    directives (a log, a rate limit) for benchmarks that need them."""

    def __init__(self, root: Path, http: str = "access_log off;", server: str = ""):
        self.root = root
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="nginx-"))
        conf = self.dir / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log;
daemon off;
events {{ worker_connections 4096; }}
http {{
    {http}
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {self.dir};
    proxy_temp_path {self.dir};
    fastcgi_temp_path {self.dir};
    uwsgi_temp_path {self.dir};
    scgi_temp_path {self.dir};
    server {{
        listen 127.0.0.1:{self.port};
        root {root};
        {server}
    }}
}}
""")
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(self.dir)])
        wait_answering(self.url("missing"), "nginx")

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def make_files(root: Path) -> dict[str, str]:
    """The files and their md5sum (the reference every result is checked against)."""
    seed = root / "seed256"
    with open(seed, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(MiB))
    for i in range(8):
        # distinct contents: a different leading block in each
        with open(root / f"f256_{i}", "wb") as out, open(seed, "rb") as src:
            out.write(os.urandom(MiB))
            src.seek(MiB)
            shutil.copyfileobj(src, out, 16 * MiB)
    with open(root / "f1g", "wb") as out:
        for i in range(4):
            with open(root / f"f256_{i}", "rb") as src:
                shutil.copyfileobj(src, out, 16 * MiB)
    with open(root / "f4g", "wb") as out:
        for i in range(16):
            with open(root / f"f256_{i % 8}", "rb") as src:
                shutil.copyfileobj(src, out, 16 * MiB)
    small = root / "small"
    small.mkdir(mode=0o755)
    for i in range(2000):
        (small / f"s{i}").write_bytes(os.urandom(16 * 1024))
    names = ["f1g", "f4g"] + [f"f256_{i}" for i in range(8)] + [
        f"small/s{i}" for i in range(2000)]
    sums: dict[str, str] = {}
    for start in range(0, len(names), 200):
        chunk = names[start:start + 200]
        out = subprocess.run(["md5sum", *chunk], cwd=root, capture_output=True, text=True,
                             check=True).stdout
        for line in out.splitlines():
            md5, name = line.split(maxsplit=1)
            sums[name] = md5
    return sums


def baseline(urls: list[str], parallel: int) -> float:
    """Seconds for curl | md5sum over urls, `parallel` at a time (xargs -P)."""
    t0 = time.monotonic()
    if parallel == 1 and len(urls) == 1:
        subprocess.run(f"curl -s {urls[0]} | md5sum", shell=True, check=True,
                       stdout=subprocess.DEVNULL)
    else:
        subprocess.run(f"xargs -P {parallel} -I{{}} sh -c 'curl -s {{}} | md5sum'",
                       shell=True, check=True, input="\n".join(urls).encode(),
                       stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


class Run:
    """Submit URLs to md5-light and wait for all of them, checking md5s."""

    def __init__(self, stack: Stack, expected: dict[str, str]):
        self.stack = stack
        self.expected = expected
        self.session = requests.Session()
        self._local = threading.local()
        self.tasks = MongoClient(stack.mongo_uri()).get_default_database()["tasks"]

    def _submit(self, url: str) -> str:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        r = session.post(self.stack.base + "/submit", data={"url": url}, timeout=30)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def __call__(self, urls: list[str]) -> float:
        t0 = time.monotonic()
        # Submitted 16 at a time, as the xargs -P 16 baseline runs its curls.
        with ThreadPoolExecutor(min(16, len(urls))) as pool:
            ids = list(pool.map(self._submit, urls))
        # Poll like a user would, one GET /check at a time, oldest first:
        # a query over all pending ids would load the database more than
        # the service does.
        pending = list(ids)
        while pending:
            r = self.session.get(self.stack.base + "/check", params={"id": pending[0]},
                                 timeout=30)
            if r.status_code == 202:
                time.sleep(0.02)
            else:
                pending.pop(0)
        elapsed = time.monotonic() - t0
        for task_id, url in zip(ids, urls, strict=True):
            doc = self.tasks.find_one({"_id": task_id})
            name = url.split("/", 3)[3]
            if doc["status"] != "done" or doc["md5"] != self.expected[name]:
                raise SystemExit(f"WRONG RESULT for {url}: {doc}")
        return elapsed


def latency_sampler(base: str, stop, out) -> None:
    session = requests.Session()
    samples = []
    # An id of the service's form that names no task: each probe is a
    # database read, the slowest /check (a malformed id needs none).
    probe = str(uuid.uuid4())
    while not stop.is_set():
        t0 = time.perf_counter()
        session.get(base + "/check", params={"id": probe}, timeout=10)
        samples.append(time.perf_counter() - t0)
        time.sleep(0.005)
    out.send(samples)


def sample_latency(base: str, during) -> list[float]:
    """/check latencies while ``during()`` runs, measured from a process of
    their own: in the load generator's process the sampler waited for its
    sixteen client threads' GIL, and measured that."""
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    receive, send = ctx.Pipe(duplex=False)
    sampler = ctx.Process(target=latency_sampler, args=(base, stop, send))
    sampler.start()
    try:
        during()
    finally:
        stop.set()
        out = receive.recv()
        sampler.join()
    return out


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def peak_rss_of_workers(stack: Stack, run, urls) -> tuple[float, int]:
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            for pid in stack.worker_pids():
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            peak = max(peak, int(line.split()[1]) * 1024)
                except FileNotFoundError:
                    pass
            time.sleep(0.05)

    t = threading.Thread(target=sample)
    t.start()
    try:
        elapsed = run(urls)
    finally:
        stop.set()
        t.join()
    return elapsed, peak


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="1,2,3,4,5,6")
    args = parser.parse_args()
    only = {int(x) for x in args.only.split(",")}
    root = Path(tempfile.mkdtemp(prefix="md5files-"))
    root.chmod(0o755)  # nginx workers run as an unprivileged user
    rows = []
    verdicts = []

    def record(n, what, ours, base, ratio, target, unit="s"):
        ok = ratio <= target
        rows.append((n, what, f"{ours:.3f}{unit}", f"{base:.3f}{unit}", f"{ratio:.2f}",
                     f"<= {target}", "PASS" if ok else "FAIL"))
        verdicts.append(ok)

    try:
        print("making files...", flush=True)
        sums = make_files(root)
        nginx = Nginx(root)
        try:
            # One client sends the whole 2,000-task burst here: lift the
            # per-client cap (1,000 unfinished) above it.
            with Stack(MAX_PENDING_PER_CLIENT="4000") as stack:
                run = Run(stack, sums)
                run([nginx.url("small/s0")])  # warm up
                if 1 in only:
                    url = nginx.url("f1g")
                    base = min(baseline([url], 1) for _ in range(2))
                    ours = min(run([url]) for _ in range(2))
                    record(1, "1 GiB file", ours, base, ours / base, 1.0)
                if 2 in only or 3 in only:
                    urls = [nginx.url(f"f256_{i}") for i in range(8)]
                if 2 in only:
                    base = baseline(urls, 2)
                    ours = run(urls)
                    record(2, "8 x 256 MiB at once", ours, base, ours / base, 1.1)
                if 3 in only:
                    # The same load again, now with a client polling /check
                    # all along (its own run, so it does not slow (2)).
                    idle = sample_latency(stack.base, lambda: time.sleep(2))
                    busy = sample_latency(stack.base, lambda: run(urls))
                    record(3, "p99 GET /check during (2)", p99(busy) * 1000,
                           p99(idle) * 1000, p99(busy) / p99(idle), 5.0, unit="ms")
                small = [nginx.url(f"small/s{i}") for i in range(2000)]
                if 4 in only or 5 in only:
                    base = baseline(small, 16)
                    empty = run(small)
                    if 4 in only:
                        record(4, "2,000 x 16 KiB burst", empty, base, empty / base, 1.5)
                    if 5 in only:
                        fill_history(run.tasks, 100_000)
                        full = run(small)
                        record(5, "(4) with 100,000 finished tasks", full, empty,
                               full / empty, 1.3)
            if 6 in only:
                with Stack(WORKERS="1") as stack:
                    r = Run(stack, sums)
                    _, small_peak = peak_rss_of_workers(stack, r, [nginx.url("f256_0")])
                with Stack(WORKERS="1") as stack:
                    r = Run(stack, sums)
                    _, big_peak = peak_rss_of_workers(stack, r, [nginx.url("f4g")])
                record(6, "worker peak RSS, 4 GiB vs 256 MiB", big_peak / MiB, small_peak / MiB,
                       big_peak / small_peak, 1.1, unit="MiB")
                rows.append((6, "worker peak RSS for 4 GiB", f"{big_peak / MiB:.1f}MiB", "",
                             "", "< 100 MiB", "PASS" if big_peak < 100 * MiB else "FAIL"))
                verdicts.append(big_peak < 100 * MiB)
        finally:
            nginx.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(table(rows, ("#", "benchmark", "md5-light", "baseline", "ratio", "target", "")))
    passed = sum(verdicts)
    print(f"BENCH {'PASS' if passed == len(verdicts) else 'FAIL'}: {passed}/{len(verdicts)} "
          "targets met, every md5 checked")
    return 0 if passed == len(verdicts) else 1


def fill_history(tasks, n: int) -> None:
    import datetime as dt
    now = dt.datetime.now(dt.UTC)
    batch = []
    for i in range(n):
        batch.append({"_id": str(uuid.uuid4()), "url": f"http://history.example/{i}",
                      "email": None, "status": "done" if i % 10 else "failed",
                      "md5": "0" * 32, "error": None, "bytes_done": 1, "bytes_total": 1,
                      "attempts": 1, "lease_until": None, "worker": None,
                      "created_at": now, "started_at": now, "finished_at": now,
                      "notification": {"status": "none", "attempts": 0, "error": None,
                                       "sent_at": None, "next_at": None}})
        if len(batch) == 5000:
            tasks.insert_many(batch, ordered=False)
            batch = []
    if batch:
        tasks.insert_many(batch, ordered=False)


if __name__ == "__main__":
    sys.exit(main())
