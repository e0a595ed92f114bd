#!/usr/bin/env python3
"""Soak test: many tasks of mixed sizes and failure modes against local
servers; every one must end done (with the right md5) or failed, none lost.

    .venv/bin/python -m bench.soak [--tasks 10000]

Not part of `make test`: it runs for minutes. Exit status 0 only when
lost == 0, wrong md5 == 0 and every outcome is the expected one.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import requests
from pymongo import MongoClient

from bench.common import FileServerProcess, Stack, table
from tests.fileserver import md5_of


def plan(files: FileServerProcess, n: int, rng: random.Random) -> list[tuple[str, str | None]]:
    """(url, expected md5 or None for an expected failure)."""
    kinds = [
        (40, lambda i: (files.url(f"/bytes/{s}?seed={i}"), md5_of(s, i))
         if (s := rng.choice([0, 1, 100, 4096, 65536, 300_000])) is not None else None),
        (15, lambda i: (files.url(f"/chunked/{s}?seed={i}"), md5_of(s, i))
         if (s := rng.choice([10, 50_000, 200_000])) is not None else None),
        (10, lambda i: (files.url(f"/redirect/2/bytes/{500 + i % 100}?seed={i}"),
                        md5_of(500 + i % 100, i))),
        (5, lambda i: (files.url(f"/bytes/{2_000_000}?seed={i % 5}"), md5_of(2_000_000, i % 5))),
        (10, lambda i: (files.url("/status/404"), None)),
        (5, lambda i: (files.url("/status/503"), None)),
        (8, lambda i: (files.url(f"/flaky/{uuid.uuid4().hex}/1000?fails=1&seed={i}"),
                       md5_of(1000, i))),
        (5, lambda i: (files.url("/short/100000"), None)),
        (1, lambda i: (files.url("/stall"), None)),
        (1, lambda i: (files.url("/redirect/9/bytes/10"), None)),
    ]
    weights = [w for w, _ in kinds]
    out = []
    for i in range(n):
        _, make = rng.choices(kinds, weights)[0]
        out.append(make(i))
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    rng = random.Random(42)
    files = FileServerProcess()
    # One client submits everything: lift the per-client cap above it.
    env = dict(IDLE_TIMEOUT="3", RETRY_BASE="0.2", CONNECT_TIMEOUT="3", WORKER_CONCURRENCY="32",
               MAX_PENDING_PER_CLIENT=str(max(1000, 2 * args.tasks)))
    try:
        with Stack(**env) as stack:
            work = plan(files, args.tasks, rng)
            t0 = time.monotonic()
            session = requests.Session()

            def submit(item):
                for _ in range(5):
                    try:
                        r = session.post(stack.base + "/submit", data={"url": item[0]},
                                         timeout=30)
                        if r.status_code == 202:
                            return r.json()["id"]
                    except requests.RequestException:
                        pass
                    time.sleep(0.5)
                return None

            with ThreadPoolExecutor(8) as pool:
                ids = list(pool.map(submit, work))
            submitted = sum(1 for i in ids if i)
            submit_s = time.monotonic() - t0
            tasks = MongoClient(stack.mongo_uri()).get_default_database()["tasks"]
            deadline = time.monotonic() + args.timeout
            while tasks.count_documents({"status": {"$in": ["queued", "running"]}}):
                if time.monotonic() > deadline:
                    break
                time.sleep(2)
            total_s = time.monotonic() - t0
            done = failed = lost = wrong = unexpected = 0
            for task_id, (url, expected) in zip(ids, work, strict=True):
                if task_id is None:
                    continue
                r = session.get(stack.base + "/check", params={"id": task_id}, timeout=30)
                if r.status_code == 200:
                    done += 1
                    if expected is None:
                        unexpected += 1
                    elif r.json()["md5"] != expected:
                        wrong += 1
                elif r.status_code == 502:
                    failed += 1
                    if expected is not None:
                        unexpected += 1
                        print("unexpected failure:", url, r.json()["error"], file=sys.stderr)
                else:
                    lost += 1
    finally:
        files.stop()
    rows = [("planned", len(work)), ("submitted", submitted), ("done", done),
            ("failed", failed), ("lost", lost), ("wrong md5", wrong),
            ("unexpected outcome", unexpected), ("submit s", f"{submit_s:.1f}"),
            ("total s", f"{total_s:.1f}")]
    print(table(rows, ("figure", "value")))
    ok = lost == 0 and wrong == 0 and unexpected == 0 and submitted == len(work)
    print(f"SOAK {'PASS' if ok else 'FAIL'}: {submitted} submitted, {done} done, "
          f"{failed} failed, {lost} lost, {wrong} wrong md5")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
