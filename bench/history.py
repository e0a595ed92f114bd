"""A service with a million finished tasks stored, made once.

SecantusDB stores about 1,300 task documents a second here whatever the
batch size, index count or number of client threads (its server is one
Python process; py-spy shows it in BSON decoding and WiredTiger cursor
packing), so 1,000,000 take 12 to 13 minutes. The first fill is kept:
the database's directory is copied, once the service has stopped, to
bench/results/cache/<key>, where the key covers the document's fields,
the collection's indexes and the SecantusDB version. A later run (or
the other benchmark) copies it back in seconds; a change of schema makes
a new key, hence a new fill.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

from pymongo import MongoClient

from bench.common import ROOT, Stack
from bench.driver import fill_tasks
from service.storage.counters import RECONCILE_EVERY, STATS_ID

CACHE = ROOT / "bench" / "results" / "cache"


def tasks_of(stack: Stack):
    return MongoClient(stack.mongo_uri()).get_default_database()["tasks"]


def cache_key(tasks, n: int) -> str:
    template = tasks.find_one({"status": "done"})
    if template is None:
        raise SystemExit("stored tasks: run one task first, to learn the document's shape")
    shape = {"fields": sorted(template), "n": n, "secantusdb": version("secantusdb"),
             "indexes": sorted((k, json.dumps(v["key"])) for k, v in
                               tasks.index_information().items())}
    return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]


def _restart(stack: Stack) -> None:
    stack.stop(timeout=60)
    stack.start()


def store(stack: Stack, n: int, log=print) -> str:
    """Bring ``stack`` (started, one task done) to ``n`` stored finished
    tasks: from the cache when it has them, else by filling and then
    keeping a copy. Returns what happened, for the report."""
    tasks = tasks_of(stack)
    key = cache_key(tasks, n)
    cached = CACHE / key
    db_dir = stack.dir / "data" / "db"
    if (cached / "complete").exists():
        t0 = time.monotonic()
        stack.stop(timeout=60)
        shutil.rmtree(db_dir)
        subprocess.run(["cp", "-a", "--reflink=auto", str(cached / "db"), str(db_dir)],
                       check=True)
        _read_through(db_dir)
        stack.start()
        _counted(stack)
        return f"{n:,} tasks copied from {cached.relative_to(ROOT)} in " \
               f"{time.monotonic() - t0:.0f} s"
    log(f"filling {n:,} finished tasks (about {n / 1300 / 60:.0f} min the first time)...")
    filled = n - tasks.count_documents({})
    seconds = fill_tasks(tasks, filled)
    stack.stop(timeout=60)
    shutil.rmtree(cached, ignore_errors=True)
    cached.mkdir(parents=True)
    subprocess.run(["cp", "-a", "--reflink=auto", str(db_dir), str(cached / "db")], check=True)
    (cached / "complete").write_text(f"{n} tasks, filled in {seconds:.0f} s\n")
    stack.start()
    _counted(stack)
    return f"{filled:,} tasks filled in {seconds:.0f} s ({filled / seconds:,.0f}/s), kept in " \
           f"{cached.relative_to(ROOT)}"


def _counted(stack: Stack, timeout: float = 300) -> None:
    """Wait out the recount of the queue counters that a restart on a store
    last counted more than 10 minutes ago starts (storage.counters): it
    reads every stored task, and a burst measured during it measures that."""
    stats = MongoClient(stack.mongo_uri(), tz_aware=True).get_default_database()["stats"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        at = (stats.find_one({"_id": STATS_ID}) or {}).get("reconciled_at")
        if at is not None and at > dt.datetime.now(dt.UTC) - RECONCILE_EVERY:
            return
        time.sleep(1)


def _read_through(directory: Path) -> None:
    """Read every file of the copied store once, so that the burst after it
    finds them in the page cache as it would on a server that has been
    running: a copy (reflinked, or just written) is read from the disk by
    the first queries, and a burst measured then measures the disk (1M
    stored: 35 tasks/s and 503s, against 120 tasks/s once read)."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 22):
                    pass
