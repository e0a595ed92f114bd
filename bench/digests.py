#!/usr/bin/env python3
"""Benchmarks for several digests and manifests (issue #13), each a ratio
measured in one run against the service's own md5-only path:

    7. md5 + sha256 of a 1 GiB file in one task vs md5 alone (<= 1.15)
    8. a 1,000-line manifest of 16 KiB files vs 1,000 separate submits of
       the same files with the same expected sha256 (<= 1.2)

Every digest is checked against sha256sum / md5sum of the file.

    .venv/bin/python -m bench.digests [--only 7,8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from pymongo import MongoClient

from bench.common import Stack, table
from bench.perf import GiB, MiB, Nginx

SMALL = 1000


def make_files(root: Path) -> dict[str, dict[str, str]]:
    with open(root / "f1g", "wb") as out:
        block = os.urandom(16 * MiB)
        for i in range(GiB // len(block)):
            out.write(bytes([i]) + block[1:])
    small = root / "small"
    small.mkdir(mode=0o755)
    for i in range(SMALL):
        (small / f"s{i}").write_bytes(os.urandom(16 * 1024))
    names = ["f1g"] + [f"small/s{i}" for i in range(SMALL)]
    sums: dict[str, dict[str, str]] = {name: {} for name in names}
    for tool, algorithm in (("md5sum", "md5"), ("sha256sum", "sha256")):
        for start in range(0, len(names), 200):
            out = subprocess.run([tool, *names[start:start + 200]], cwd=root,
                                 capture_output=True, text=True, check=True).stdout
            for line in out.splitlines():
                digest, name = line.split(maxsplit=1)
                sums[name][algorithm] = digest
    return sums


class Bench:
    def __init__(self, stack: Stack, nginx: Nginx, sums: dict[str, dict[str, str]]):
        self.stack, self.nginx, self.sums = stack, nginx, sums
        self.tasks = MongoClient(stack.mongo_uri()).get_default_database()["tasks"]
        self.session = requests.Session()

    def one(self, name: str, algorithms: str) -> float:
        t0 = time.monotonic()
        r = self.session.post(self.stack.base + "/submit", timeout=30,
                              data={"url": self.nginx.url(name), "algorithms": algorithms})
        task_id = r.json()["id"]
        while self.session.get(self.stack.base + "/check", params={"id": task_id},
                               timeout=30).status_code == 202:
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
        self.verify([task_id], [name])
        return elapsed

    def separate(self, names: list[str]) -> float:
        t0 = time.monotonic()

        def submit(name: str) -> str:
            r = requests.post(self.stack.base + "/submit", timeout=30, data={
                "url": self.nginx.url(name), "expected": f"sha256:{self.sums[name]['sha256']}"})
            return r.json()["id"]

        with ThreadPoolExecutor(16) as pool:
            ids = list(pool.map(submit, names))
        for task_id in ids:
            while self.session.get(self.stack.base + "/check", params={"id": task_id},
                                   timeout=30).status_code == 202:
                time.sleep(0.02)
        elapsed = time.monotonic() - t0
        self.verify(ids, names)
        return elapsed

    def manifest(self, names: list[str]) -> float:
        text = "".join(f"{self.sums[n]['sha256']}  {self.nginx.url(n)}\n" for n in names)
        t0 = time.monotonic()
        r = self.session.post(self.stack.base + "/manifests", data=text.encode(), timeout=60)
        if r.status_code != 202:
            raise SystemExit(f"manifest refused: {r.status_code} {r.text}")
        manifest_id = r.json()["id"]
        while self.session.get(f"{self.stack.base}/manifests/{manifest_id}", timeout=30,
                               params={"limit": 1}).json()["status"] != "done":
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        ids = [d["_id"] for d in self.tasks.find({"manifest": manifest_id},
                                                 sort=[("line", 1)])]
        self.verify(ids, names)
        return elapsed

    def verify(self, ids: list[str], names: list[str]) -> None:
        for task_id, name in zip(ids, names, strict=True):
            doc = self.tasks.find_one({"_id": task_id})
            for algorithm, value in doc["digests"].items():
                if doc["status"] != "done" or self.sums[name].get(algorithm, value) != value:
                    raise SystemExit(f"WRONG RESULT for {name}: {doc}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="7,8")
    only = {int(x) for x in parser.parse_args().only.split(",")}
    root = Path(tempfile.mkdtemp(prefix="md5digests-"))
    root.chmod(0o755)
    rows, verdicts = [], []

    def record(n, what, ours, base, target):
        ratio = ours / base
        rows.append((n, what, f"{ours:.3f}s", f"{base:.3f}s", f"{ratio:.2f}", f"<= {target}",
                     "PASS" if ratio <= target else "FAIL"))
        verdicts.append(ratio <= target)

    try:
        print("making files...", flush=True)
        sums = make_files(root)
        nginx = Nginx(root)
        try:
            with Stack(MAX_PENDING_PER_CLIENT="4000") as stack:
                bench = Bench(stack, nginx, sums)
                bench.one("small/s0", "md5")  # warm up
                if 7 in only:
                    # Interleaved, best of three each: drift hits both alike.
                    alone, both = [], []
                    for _ in range(3):
                        alone.append(bench.one("f1g", "md5"))
                        both.append(bench.one("f1g", "md5,sha256"))
                    record(7, "1 GiB md5+sha256 vs md5 alone", min(both), min(alone), 1.15)
                if 8 in only:
                    names = [f"small/s{i}" for i in range(SMALL)]
                    separate = bench.separate(names)
                    manifest = bench.manifest(names)
                    record(8, "1,000-line manifest vs 1,000 submits", manifest, separate, 1.2)
        finally:
            nginx.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(table(rows, ("#", "benchmark", "md5-light", "baseline", "ratio", "target", "")))
    print(f"BENCH {'PASS' if all(verdicts) else 'FAIL'}: {sum(verdicts)}/{len(verdicts)} "
          "targets met, every digest checked")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
