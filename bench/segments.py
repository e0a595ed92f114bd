#!/usr/bin/env python3
"""Segmented downloads benchmark (#28): a big file from a server that caps
each connection's rate, md5-light at its defaults against ``aria2c -x4 -s4``
followed by ``md5sum`` and against ``curl | md5sum``, in one run, every md5
checked against md5sum of the file.

Two servers. nginx's ``limit_rate``, as the issue names it, judged
against aria2 (<= 0.8) and curl (<= 0.3); it lets each request send a
second's worth at once before it throttles, which favours whoever makes
more, shorter requests. And ``bench.throttled``, which paces every
response from its first byte (a far server's per-connection cap): there
four connections at the cap are a floor for aria2 and for us alike
(``size / (4 x rate)``), so md5-light is judged by its distance from that
floor (<= 1.05) and against curl, and its ratio to aria2 is shown with
the floor's. Also: 8 MiB files, unthrottled, at the defaults against one
connection per download (the code path of every file below
SEGMENT_MIN_SIZE), so that small files are not slower.

    .venv/bin/python -m bench.segments [--size-mib 1024] [--rate 16000000]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench.common import Stack, free_port, table, wait_answering
from bench.perf import Nginx
from bench.resume import ThrottledNginx, make_file

MiB = 1024 * 1024


class PacedServer:
    def __init__(self, root: Path, rate: int):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.throttled", str(root),
                                      str(self.port), str(rate)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_answering(self.url("missing"), "bench.throttled")

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def timed(cmd: str) -> tuple[float, str]:
    t0 = time.monotonic()
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=True).stdout
    return time.monotonic() - t0, out


def curl_md5(url: str) -> tuple[float, str]:
    seconds, out = timed(f"curl -s {url} | md5sum")
    return seconds, out.split()[0]


def aria2_md5(url: str, scratch: Path) -> tuple[float, str]:
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    seconds, out = timed(
        f"aria2c -q -x4 -s4 --file-allocation=none --allow-overwrite=true "
        f"-d {scratch} -o f {url} && md5sum {scratch}/f")
    shutil.rmtree(scratch, ignore_errors=True)
    return seconds, out.split()[0]


def peak_rss(pids: list[int]) -> int:
    peak = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]) * 1024)
    return peak


def md5light(url: str, **env: str) -> tuple[float, str, dict, int]:
    with Stack(**env) as stack:
        t0 = time.monotonic()
        r = requests.post(stack.base + "/submit", data={"url": url}, timeout=30)
        assert r.status_code == 202, r.text
        task_id = r.json()["id"]
        done = stack.wait(task_id, timeout=1800)
        seconds = time.monotonic() - t0
        rss = peak_rss(stack.worker_pids())
        task = stack.task(task_id)
        return seconds, done.json().get("md5", done.text), task, rss


def many_small(url_of, n: int, **env: str) -> float:
    with Stack(**env) as stack:
        t0 = time.monotonic()
        ids = []
        for i in range(n):
            r = requests.post(stack.base + "/submit", data={"url": url_of(i)}, timeout=30)
            ids.append(r.json()["id"])
        for task_id in ids:
            assert stack.wait(task_id, timeout=600).status_code == 200
        return time.monotonic() - t0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rate", type=int, default=16_000_000, help="bytes/s per connection")
    parser.add_argument("--small", type=int, default=48, help="8 MiB files in the last row")
    args = parser.parse_args()
    size = args.size_mib * MiB
    root = Path(tempfile.mkdtemp(prefix="md5seg-"))
    root.chmod(0o755)  # nginx workers run as an unprivileged user
    scratch = Path(tempfile.mkdtemp(prefix="md5seg-aria2-")) / "d"
    rows, verdicts = [], []

    def judge(n: str, what: str, value: float, target: float, shown: str) -> None:
        ok = value <= target
        verdicts.append(ok)
        rows.append((n, what, shown, f"<= {target:g}", "PASS" if ok else "FAIL"))
        print(rows[-1], flush=True)

    try:
        print("making the files...", flush=True)
        md5 = make_file(root, size)
        small = root / "small"
        small.mkdir()
        for i in range(args.small):
            (small / f"s{i}").write_bytes(i.to_bytes(8, "big") * (MiB // 8) * 8)
        paced = PacedServer(root, args.rate)
        try:
            nginx = ThrottledNginx(root, str(args.rate))
        except BaseException:
            paced.stop()
            raise
        try:
            floor = size / (4 * args.rate)
            for label, server in (("nginx", nginx), ("paced", paced)):
                url = server.url("big")
                ours, digest, task, rss = md5light(url)
                assert digest == md5, (digest, task)
                aria, a_md5 = aria2_md5(url, scratch)
                curl, c_md5 = curl_md5(url)
                assert a_md5 == md5 and c_md5 == md5, (a_md5, c_md5)
                conn = task.get("connections") or {}
                print(f"{label}: md5-light {ours:.1f} s ({conn}), aria2c+md5sum {aria:.1f} s, "
                      f"curl|md5sum {curl:.1f} s, worker peak RSS {rss / MiB:.0f} MiB",
                      flush=True)
                if label == "nginx":
                    # The benchmark as written.
                    judge("1", f"{label}: vs aria2c -x4 -s4 + md5sum", ours / aria, 0.8,
                          f"{ours:.1f} / {aria:.1f} s = {ours / aria:.2f}")
                    judge("2", f"{label}: vs curl | md5sum", ours / curl, 0.3,
                          f"{ours:.1f} / {curl:.1f} s = {ours / curl:.2f}")
                    judge("3", f"{label}: worker peak RSS (MiB)", rss / MiB, 200,
                          f"{rss / MiB:.0f}")
                else:
                    # No burst to gain from: four connections at the cap are
                    # the floor, for aria2 as for us, so the figure judged is
                    # the distance from it; 0.8x aria2 would be below it.
                    judge("4", f"{label}: vs the link's floor (size / 4 x rate)", ours / floor,
                          1.05, f"{ours:.1f} / {floor:.1f} s = {ours / floor:.2f}")
                    judge("5", f"{label}: vs curl | md5sum", ours / curl, 0.3,
                          f"{ours:.1f} / {curl:.1f} s = {ours / curl:.2f}")
                    rows.append(("-", f"{label}: vs aria2c -x4 -s4 + md5sum (floor: "
                                 f"{floor / aria:.2f})", f"{ours:.1f} / {aria:.1f} s = "
                                 f"{ours / aria:.2f}", "", ""))
            plain = Nginx(root)
            try:
                url_of = lambda i: plain.url(f"small/s{i}")  # noqa: E731
                # Sub-second figures on a shared machine: the best of three
                # runs each, alternating.
                ones, defaults = [], []
                for _ in range(3):
                    ones.append(many_small(url_of, args.small, CONNECTIONS_PER_DOWNLOAD="1"))
                    defaults.append(many_small(url_of, args.small))
                one, default = min(ones), min(defaults)
                judge("6", f"{args.small} x 8 MiB: defaults vs one connection", default / one,
                      1.1, f"{default:.2f} / {one:.2f} s = {default / one:.2f}")
            finally:
                plain.stop()
        finally:
            paced.stop()
            nginx.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(scratch.parent, ignore_errors=True)
    print(table(rows, ("#", "figure", "measured", "target", "")))
    passed = sum(verdicts)
    print(f"BENCH {'PASS' if passed == len(verdicts) else 'FAIL'}: {passed}/{len(verdicts)} "
          "targets met, every md5 checked against md5sum")
    return 0 if passed == len(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
