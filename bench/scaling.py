#!/usr/bin/env python3
"""Issues #17 and #25: how md5-light's throughput and cost grow with
workers and as tasks pile up. Tasks/s and CPU per task (the whole
system's, and its database's) of a 2,000 x 16 KiB burst (bench.driver's
users polling /check, every md5 checked) at WORKERS=1, 2 and 4 on an
empty store, and at 1k, 10k, 100k and 1M stored finished tasks with the
default WORKERS; the Celery yardstick's tasks/s at its default shape as
a reference. Writes bench/results/scaling.md and scaling.png.

    .venv/bin/python -m bench.scaling [--n 2000] [--workers 1,2,4]
                                      [--stored 1000,10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, Stack, table
from bench.cpu import CpuMeter
from bench.driver import Burst, fill_tasks, make_files
from bench.history import store, tasks_of
from bench.perf import Nginx
from bench.yardstick.stack import Yardstick

RESULTS = ROOT / "bench" / "results"
# Fills past this size go through bench.history's kept copy.
FILL_LIMIT = 100_000


# 503 answers the users waited out, per measurement that had any.
WAITED: list[str] = []


@dataclasses.dataclass
class Figure:
    """One burst: its throughput and the CPU it cost per task."""
    rate: float      # tasks/s
    cpu_ms: float    # the whole system's CPU per task (every process of it)
    db_ms: float     # of which the database's (SecantusDB; Redis for Celery)


def measure(base: str, sums: dict[str, str], urls: list[str], what: str,
            system: list[int], database: list[int]) -> Figure:
    burst = Burst(base, sums)
    burst(urls[:16])  # warm up
    with CpuMeter({"system": system, "database": database}) as meter:
        rate = len(urls) / burst(urls)
    if burst.unavailable:
        WAITED.append(f"{what}: {burst.unavailable} answers 503 waited out")
    n = len(urls)
    return Figure(rate, 1000 * meter.used["system"] / n, 1000 * meter.used["database"] / n)


def ours(stack: Stack) -> tuple[list[int], list[int]]:
    assert stack.proc is not None
    return [stack.proc.pid], [stack.database_pid()]


def plot(by_workers: list[tuple[int, Figure]], by_stored: list[tuple[int, Figure]],
         celery: Figure, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex="col")
    for col, (series, xlabel) in enumerate(((by_workers, "WORKERS (empty store)"),
                                             (by_stored, "finished tasks stored"))):
        xs = [x for x, _ in series]
        top, bottom = axes[0][col], axes[1][col]
        top.plot(xs, [f.rate for _, f in series], marker="o", label="md5-light")
        top.axhline(celery.rate, color="grey", linestyle="--", label="Celery stack")
        top.set(ylabel="tasks/s", title=f"tasks/s vs {xlabel.split(' (')[0].lower()}")
        bottom.plot(xs, [f.cpu_ms for _, f in series], marker="o", label="md5-light, system")
        bottom.plot(xs, [f.db_ms for _, f in series], marker="s",
                    label="md5-light, its database")
        bottom.axhline(celery.cpu_ms, color="grey", linestyle="--", label="Celery stack, system")
        bottom.axhline(celery.db_ms, color="grey", linestyle=":", label="Celery stack, Redis")
        bottom.set(xlabel=xlabel, ylabel="CPU ms per task")
        if col == 0:
            bottom.set_xticks(xs)
        else:
            bottom.set_xscale("log")
        for ax in (top, bottom):
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize="small")
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
                celery = measure(yardstick.base, sums, urls, "Celery stack", yardstick.pids(),
                                 [yardstick.redis_pid()])
            print(f"Celery stack: {celery.rate:.1f} tasks/s", flush=True)
            for w in workers:
                with Stack(WORKERS=str(w), MAX_PENDING_PER_CLIENT=cap) as stack:
                    by_workers.append((w, measure(stack.base, sums, urls, f"WORKERS={w}",
                                                  *ours(stack))))
                print(f"WORKERS={w}: {by_workers[-1][1].rate:.1f} tasks/s", flush=True)
            with Stack(MAX_PENDING_PER_CLIENT=cap) as stack:
                Burst(stack.base, sums)(urls[:1])  # a finished task: the fill's template
                count = tasks_of(stack).count_documents({})
                for n in stored:
                    if n > FILL_LIMIT:
                        notes.append(store(stack, n))
                    elif n > count:
                        fill_tasks(tasks_of(stack), n - count)
                    by_stored.append((n, measure(stack.base, sums, urls, f"{n:,} stored",
                                                 *ours(stack))))
                    count = max(n, count) + args.n + 16
                    print(f"{n:,} stored: {by_stored[-1][1].rate:.1f} tasks/s", flush=True)
        finally:
            nginx.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    notes += WAITED
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(by_workers, by_stored, celery, RESULTS / "scaling.png")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    def cells(f: Figure) -> tuple[str, str, str]:
        return f"{f.rate:.1f}", f"{f.cpu_ms:.2f}", f"{f.db_ms:.2f}"

    rows = ([(f"WORKERS={w}", "empty", *cells(f)) for w, f in by_workers] +
            [("default", f"{n:,}", *cells(f)) for n, f in by_stored] +
            [("Celery stack", "(Redis)", *cells(celery))])
    text = (f"# md5-light scaling\n\n{dt.date.today()}, commit {commit}, "
            f"{os.cpu_count()} CPUs (`python -m bench.scaling`), a burst of {args.n:,} "
            "x 16 KiB files, every md5 checked. CPU per task: every process of the "
            "system over the burst (/proc), and of that its database's (the embedded "
            "SecantusDB; Redis for the Celery stack).\n\n"
            "| workers | finished tasks stored | tasks/s | CPU ms/task | database CPU ms/task |\n"
            "|---|---|---|---|---|\n" +
            "".join(f"| {' | '.join(row)} |\n" for row in rows) +
            "".join(f"\n{note}\n" for note in notes) + "\n![scaling](scaling.png)\n")
    (RESULTS / "scaling.md").write_text(text)
    print(table(rows, ("workers", "stored", "tasks/s", "CPU ms/task", "database ms/task")))
    for note in notes:
        print(note)
    print(f"wrote {RESULTS / 'scaling.md'} and {RESULTS / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
