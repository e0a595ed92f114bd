#!/usr/bin/env python3
"""Resume benchmark (issue #14: a restart costs no bytes).

A 2 GiB file served by nginx at a throttled rate (``limit_rate``):

1. the worker is SIGKILLed at ~60%: bytes nginx sent in all / file size
   must be <= 1.1 (the lease runs out, another worker resumes from the
   last checkpoint);
2. the whole service gets SIGTERM at ~60% and is started again on the
   same data: <= 1.05 (the drain checkpoints before it stops).

Bytes are nginx's own count (``$bytes_sent`` in its access log); every
digest is checked against md5sum of the file.

    .venv/bin/python -m bench.resume [--rate 40m] [--size-mib 2048]

``--env RESUMABLE_MIN_SIZE=100GiB`` shows the same without resuming.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench.common import Stack, table
from bench.perf import Nginx

MiB = 1024 * 1024


class ThrottledNginx(Nginx):
    """nginx serving ``root`` at ``rate`` per connection, logging the bytes
    it sent for each request."""

    def __init__(self, root: Path, rate: str):
        log = Path(tempfile.mkdtemp(prefix="nginx-log-")) / "access.log"
        super().__init__(root, http=(
            "log_format sent '$request_uri $status $bytes_sent \"$http_range\"';\n"
            f"    access_log {log} sent;"), server=f"limit_rate {rate};")
        self.log = log

    def requests_for(self, uri: str) -> list[tuple[int, int, str]]:
        """(status, bytes sent, Range) of every logged request for ``uri``.
        nginx logs a request when it ends, a cut-off one included."""
        out = []
        for line in self.log.read_text().splitlines():
            path, status, sent, rng = line.split(" ", 3)
            if path == uri:
                out.append((int(status), int(sent), rng.strip('"')))
        return out

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.log.parent, ignore_errors=True)


def make_file(root: Path, size: int) -> str:
    seed = os.urandom(64 * MiB)
    with open(root / "big", "wb") as out:
        for i in range(size // len(seed)):
            out.write(i.to_bytes(8, "big") + seed[8:])  # no two blocks alike
    out = subprocess.run(["md5sum", str(root / "big")], capture_output=True, text=True,
                         check=True).stdout
    return out.split()[0]


def submit(stack: Stack, url: str) -> str:
    r = requests.post(stack.base + "/submit", data={"url": url}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_progress(stack: Stack, task_id: str, at: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while stack.task(task_id)["bytes_done"] < at:
        if time.monotonic() > deadline:
            raise SystemExit(f"no progress to {at} bytes: {stack.task(task_id)}")
        time.sleep(0.2)


def finish(stack: Stack, task_id: str, md5: str) -> dict:
    r = stack.wait(task_id, timeout=900)
    task = stack.task(task_id)
    if r.status_code != 200 or r.json()["md5"] != md5:
        raise SystemExit(f"WRONG RESULT: {r.status_code} {r.text} {task}")
    return task


def worker_killed(nginx: ThrottledNginx, size: int, md5: str,
                  env: dict[str, str]) -> tuple[float, dict]:
    # A 10 s lease instead of 30 s only shortens the wait for the takeover.
    with Stack(WORKERS="1", LEASE_SECONDS="10", **env) as stack:
        task_id = submit(stack, nginx.url("big?kill"))
        wait_progress(stack, task_id, int(0.6 * size))
        for pid in stack.worker_pids():
            os.kill(pid, signal.SIGKILL)
        task = finish(stack, task_id, md5)
    sent = sum(s for _, s, _ in nginx.requests_for("/big?kill"))
    return sent / size, task


def service_restarted(nginx: ThrottledNginx, size: int, md5: str,
                      env: dict[str, str]) -> tuple[float, dict]:
    with Stack(WORKERS="1", **env) as stack:
        task_id = submit(stack, nginx.url("big?term"))
        wait_progress(stack, task_id, int(0.6 * size))
        if stack.stop(signal.SIGTERM, timeout=120) != 0:
            raise SystemExit(f"service did not stop cleanly: {stack.log()[-2000:]}")
        stack.start()
        task = finish(stack, task_id, md5)
    sent = sum(s for _, s, _ in nginx.requests_for("/big?term"))
    return sent / size, task


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", default="40m", help="nginx limit_rate (bytes/s)")
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the service")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    size = args.size_mib * MiB
    root = Path(tempfile.mkdtemp(prefix="md5resume-"))
    root.chmod(0o755)  # nginx workers run as an unprivileged user
    rows, verdicts = [], []
    try:
        print("making the file...", flush=True)
        md5 = make_file(root, size)
        nginx = ThrottledNginx(root, args.rate)
        try:
            for n, what, scenario, target in (
                    (1, "worker SIGKILLed at 60%", worker_killed, 1.1),
                    (2, "service SIGTERM + restart at 60%", service_restarted, 1.05)):
                ratio, task = scenario(nginx, size, md5, env)
                resumed = [h.get("resumed_from") for h in task["history"]]
                rows.append((n, what, f"{ratio:.3f}", f"<= {target}",
                             f"{task['bytes_fetched'] / size:.3f}", str(resumed),
                             "PASS" if ratio <= target else "FAIL"))
                verdicts.append(ratio <= target)
                print(rows[-1], flush=True)
        finally:
            nginx.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(table(rows, ("#", "scenario", "sent/size", "target", "fetched/size (task)",
                       "resumed_from per attempt", "")))
    passed = sum(verdicts)
    print(f"BENCH {'PASS' if passed == len(verdicts) else 'FAIL'}: {passed}/{len(verdicts)} "
          "targets met, every md5 checked against md5sum")
    return 0 if passed == len(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
