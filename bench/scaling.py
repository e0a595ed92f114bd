#!/usr/bin/env python3
"""Issue #17: how md5-light's throughput grows with workers and holds up
as tasks pile up. Tasks/s of a 2,000 x 16 KiB burst (bench.driver's
users polling /check, every md5 checked) at WORKERS=1, 2 and 4 on an
empty store, and at 1k, 10k, 100k and 1M stored finished tasks with the
default WORKERS; the Celery yardstick's tasks/s at its default shape as
a reference. Writes bench/results/scaling.md and scaling.png.

    .venv/bin/python -m bench.scaling [--n 2000] [--workers 1,2,4]
                                      [--stored 1000,10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, Stack, table
from bench.driver import Burst, fill_tasks, make_files
from bench.history import store, tasks_of
from bench.perf import Nginx
from bench.yardstick.stack import Yardstick

RESULTS = ROOT / "bench" / "results"
# Fills past this size go through bench.history's kept copy.
FILL_LIMIT = 100_000


# 503 answers the users waited out, per measurement that had any.
WAITED: list[str] = []


def measure(base: str, sums: dict[str, str], urls: list[str], what: str) -> float:
    burst = Burst(base, sums)
    burst(urls[:16])  # warm up
    rate = len(urls) / burst(urls)
    if burst.unavailable:
        WAITED.append(f"{what}: {burst.unavailable} answers 503 waited out")
    return rate


def plot(by_workers: list[tuple[int, float]], by_stored: list[tuple[int, float]],
         celery: float | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    left.plot(*zip(*by_workers, strict=True), marker="o", label="md5-light")
    left.set(xlabel="WORKERS", ylabel="tasks/s", title="tasks/s vs workers (empty store)",
             xticks=[w for w, _ in by_workers])
    right.plot(*zip(*by_stored, strict=True), marker="o", label="md5-light")
    right.set(xscale="log", xlabel="finished tasks stored", title="tasks/s vs stored tasks")
    for ax in (left, right):
        if celery is not None:
            ax.axhline(celery, color="grey", linestyle="--", label="Celery stack (default)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000, help="files in the burst")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--stored", default="1000,10000,100000,1000000")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    stored = sorted(int(s) for s in args.stored.split(","))
    cap = str(2 * args.n + 100)  # one client sends the whole burst
    by_workers, by_stored, notes = [], [], []
    root = Path(tempfile.mkdtemp(prefix="md5scaling-"))
    try:
        print("making files...", flush=True)
        sums = make_files(root, args.n, big=False)
        nginx = Nginx(root)
        try:
            urls = [nginx.url(f"small/s{i}") for i in range(args.n)]
            with Yardstick() as yardstick:
                celery = measure(yardstick.base, sums, urls, "Celery stack")
            print(f"Celery stack: {celery:.1f} tasks/s", flush=True)
            for w in workers:
                with Stack(WORKERS=str(w), MAX_PENDING_PER_CLIENT=cap) as stack:
                    by_workers.append((w, measure(stack.base, sums, urls, f"WORKERS={w}")))
                print(f"WORKERS={w}: {by_workers[-1][1]:.1f} tasks/s", flush=True)
            with Stack(MAX_PENDING_PER_CLIENT=cap) as stack:
                Burst(stack.base, sums)(urls[:1])  # a finished task: the fill's template
                count = tasks_of(stack).count_documents({})
                for n in stored:
                    if n > FILL_LIMIT:
                        notes.append(store(stack, n))
                    elif n > count:
                        fill_tasks(tasks_of(stack), n - count)
                    by_stored.append((n, measure(stack.base, sums, urls, f"{n:,} stored")))
                    count = max(n, count) + args.n + 16
                    print(f"{n:,} stored: {by_stored[-1][1]:.1f} tasks/s", flush=True)
        finally:
            nginx.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    notes += WAITED
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(by_workers, by_stored, celery, RESULTS / "scaling.png")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    rows = ([(f"WORKERS={w}", "empty", f"{r:.1f}") for w, r in by_workers] +
            [("default", f"{n:,}", f"{r:.1f}") for n, r in by_stored] +
            [("Celery stack", "(Redis)", f"{celery:.1f}")])
    text = (f"# md5-light scaling\n\n{dt.date.today()}, commit {commit}, "
            f"{os.cpu_count()} CPUs (`python -m bench.scaling`), a burst of {args.n:,} "
            "x 16 KiB files, every md5 checked.\n\n"
            "| workers | finished tasks stored | tasks/s |\n|---|---|---|\n" +
            "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows) +
            "".join(f"\n{note}\n" for note in notes) + "\n![scaling](scaling.png)\n")
    (RESULTS / "scaling.md").write_text(text)
    print(table(rows, ("workers", "stored", "tasks/s")))
    for note in notes:
        print(note)
    print(f"wrote {RESULTS / 'scaling.md'} and {RESULTS / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
