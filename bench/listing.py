"""GET /tasks at scale: the first page of 100 with 1,000,000 tasks stored
must cost at most twice what it costs with 1,000 (docs/design.md, §4).

    .venv/bin/python -m bench.listing [--tasks 1000000]

Runs an embedded SecantusDB of its own in a scratch directory, creates the
service's indexes, loads tasks with insert_many straight into it (one every
2.6 s going back from now, about 30 days for a million; 1 % failed, 1,000
distinct urls), and times ``TaskHistory.page`` (the query behind GET
/tasks) at 1,000 tasks and again at the full count. Loading a million takes
several minutes on two cores; not part of ``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import shutil
import statistics
import sys
import tempfile
import time

from pymongo import AsyncMongoClient

from service.model.task import Status, Task
from service.runtime.embedded_db import EmbeddedDatabase
from service.storage.database import Collections
from service.storage.history import TaskHistory

SMALL = 1000
GAP = dt.timedelta(seconds=2.6)
BATCH = 10_000
RUNS = 30
TARGET = 2.0


def docs(start: int, stop: int, now: dt.datetime) -> list[dict]:
    out = []
    for i in range(start, stop):
        created = now - GAP * i
        task = Task(url=f"http://files.example/{i % 1000}", email="someone@example.org",
                    client="203.0.113.7", created_at=created)
        task.status = Status.FAILED if i % 100 == 0 else Status.DONE
        task.md5 = None if task.status == Status.FAILED else "d41d8cd98f00b204e9800998ecf8427e"
        task.attempts, task.started_at, task.finished_at = 1, created, created
        out.append(task.to_doc())
    return out


async def load(cols: Collections, start: int, stop: int, now: dt.datetime) -> float:
    began = time.perf_counter()
    for i in range(start, stop, BATCH):
        await cols.tasks.insert_many(docs(i, min(stop, i + BATCH), now), ordered=False)
        if (i - start) // BATCH % 10 == 9:
            print(f"  loaded {i + BATCH:,} tasks", file=sys.stderr, flush=True)
    return time.perf_counter() - began


async def timed(call) -> tuple[float, object]:
    """Median seconds of RUNS calls (after one to warm up), and a result."""
    result = await call()
    times = []
    for _ in range(RUNS):
        began = time.perf_counter()
        result = await call()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


async def measure(history: TaskHistory) -> dict[str, float]:
    first, page = await timed(lambda: history.page(100))
    assert len(page.tasks) == 100 and page.next is not None  # type: ignore[attr-defined]
    cursor = page.next  # type: ignore[attr-defined]
    second, _ = await timed(lambda: history.page(100, after=cursor))
    failed, page = await timed(lambda: history.page(100, status=Status.FAILED))
    assert all(t.status == Status.FAILED for t in page.tasks)  # type: ignore[attr-defined]
    url, _ = await timed(lambda: history.page(100, url="http://files.example/7"))
    return {"first page": first, "second page (after=)": second,
            "status=failed": failed, "url=...": url}


async def main(total: int) -> int:
    directory = tempfile.mkdtemp(prefix="md5bench-listing-")
    db = EmbeddedDatabase(directory)
    db.start()
    try:
        client: AsyncMongoClient = AsyncMongoClient(f"mongodb://127.0.0.1:{db.port}/bench",
                                                    tz_aware=True)
        cols = Collections.of(client)
        await cols.ensure_indexes(86400, None)
        now = dt.datetime.now(dt.UTC)
        await load(cols, 0, SMALL, now)
        small = await measure(TaskHistory(cols.tasks))
        print(f"loading {total - SMALL:,} more tasks...", file=sys.stderr, flush=True)
        seconds = await load(cols, SMALL, total, now)
        print(f"  {total - SMALL:,} tasks in {seconds:.0f} s", file=sys.stderr)
        big = await measure(TaskHistory(cols.tasks))
        began = time.perf_counter()
        naive = await cols.tasks.find({}).sort("created_at", -1).limit(100).to_list(None)
        naive_seconds = time.perf_counter() - began
        assert len(naive) == 100
        await client.close()
    finally:
        db.stop()
        shutil.rmtree(directory, ignore_errors=True)
    print(f"{'query (median of ' + str(RUNS) + ')':<26} {SMALL:>10,} {total:>12,}   ratio")
    for name in small:
        print(f"{name:<26} {small[name] * 1000:>8.2f}ms {big[name] * 1000:>10.2f}ms"
              f"   {big[name] / small[name]:.2f}")
    print(f"{'sort+limit, for contrast':<26} {'':>10} {naive_seconds * 1000:>10.0f}ms")
    ratio = big["first page"] / small["first page"]
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"BENCH {verdict}: first page of 100 costs {ratio:.2f}x with {total:,} tasks "
          f"as with {SMALL:,} (target <= {TARGET})")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    sys.exit(asyncio.run(main(parser.parse_args().tasks)))
