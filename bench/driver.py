"""What bench.compare and bench.scaling share: the files, one client
driver for md5-light and the yardstick alike, the curl | md5sum
baseline, the database's operation counters, and a fast fill of
finished tasks. Every digest is checked against md5sum of the file.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

MiB = 1024 * 1024
GiB = 1024 * MiB
CLIENTS = 16
POLL_SLEEP = 0.02
OPS = ("insert", "query", "update", "delete", "getmore", "command")


def make_files(root: Path, small: int, big: bool = True) -> dict[str, str]:
    """``small`` files of 16 KiB (small/s<i>) and, with ``big``, a 1 GiB
    one (f1g); returns each name's md5sum, the reference for every result."""
    root.chmod(0o755)  # nginx's workers run as an unprivileged user
    (root / "small").mkdir(mode=0o755)
    for i in range(small):
        (root / "small" / f"s{i}").write_bytes(os.urandom(16 * 1024))
    names = [f"small/s{i}" for i in range(small)]
    if big:
        block = os.urandom(16 * MiB)
        with open(root / "f1g", "wb") as out:
            for i in range(GiB // len(block)):
                out.write(bytes([i]) + block[1:])  # no two blocks alike
        names.append("f1g")
    sums: dict[str, str] = {}
    for start in range(0, len(names), 500):
        out = subprocess.run(["md5sum", *names[start:start + 500]], cwd=root, check=True,
                             capture_output=True, text=True).stdout
        for line in out.splitlines():
            md5, name = line.split(maxsplit=1)
            sums[name] = md5
    return sums


class Burst:
    """Users of either system: CLIENTS threads each submit their share of
    the URLs, then poll /check for their own tasks one at a time, oldest
    first, 20 ms apart while it answers 202, as a script a user writes
    would. The time is from the first submit to the last answer, and every
    answer must be 200 with the file's md5."""

    def __init__(self, base: str, sums: dict[str, str]):
        self.base, self.sums = base, sums
        # 503s a user waited out (database silent, queue full): counted and
        # reported, as they are part of what users saw.
        self.unavailable = 0
        self._lock = threading.Lock()

    def _ask(self, session: requests.Session, method: str, path: str, **kw) -> requests.Response:
        """One request as a user's script makes it: a 503 is waited out for
        its Retry-After (a minute of them in a row fails the run)."""
        waited = 0.0
        while True:
            r = session.request(method, self.base + path, timeout=60, **kw)
            if r.status_code != 503 or waited > 60:
                return r
            with self._lock:
                self.unavailable += 1
            pause = float(r.headers.get("Retry-After") or 1)
            time.sleep(pause)
            waited += pause

    def __call__(self, urls: list[str]) -> float:
        shares = [urls[k::CLIENTS] for k in range(CLIENTS)]
        t0 = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(self._client, [s for s in shares if s]))
        return time.monotonic() - t0

    def _client(self, urls: list[str]) -> None:
        session = requests.Session()
        ids = []
        for url in urls:
            r = self._ask(session, "POST", "/submit", data={"url": url})
            if r.status_code != 202:
                raise SystemExit(f"submit of {url} refused: {r.status_code} {r.text}")
            ids.append(r.json()["id"])
        for task_id, url in zip(ids, urls, strict=True):
            while True:
                r = self._ask(session, "GET", "/check", params={"id": task_id})
                if r.status_code != 202:
                    break
                time.sleep(POLL_SLEEP)
            md5 = self.sums[url.split("/", 3)[3]]
            if r.status_code != 200 or r.json().get("md5") != md5:
                raise SystemExit(f"WRONG RESULT for {url} from {self.base}: "
                                 f"{r.status_code} {r.text} (md5sum says {md5})")


def curl_md5sum(urls: list[str], parallel: int, sums: dict[str, str]) -> float:
    """Seconds for ``curl -s URL | md5sum`` over urls, ``parallel`` at a
    time through xargs -P; each md5sum writes to its own file (a shell
    redirect, no extra process) so that every digest is checked too."""
    with tempfile.TemporaryDirectory(prefix="md5sums-") as out:
        pairs = "".join(f"{out}/{i} {url}\n" for i, url in enumerate(urls))
        t0 = time.monotonic()
        subprocess.run(f"xargs -P {parallel} -n 2 sh -c 'curl -s \"$1\" | md5sum > \"$0\"'",
                       shell=True, check=True, input=pairs.encode())
        elapsed = time.monotonic() - t0
        for i, url in enumerate(urls):
            got = Path(f"{out}/{i}").read_text().split()[0]
            if got != sums[url.split("/", 3)[3]]:
                raise SystemExit(f"WRONG RESULT for {url} from curl | md5sum: {got}")
    return elapsed


def opcounters(db) -> dict[str, int]:
    return dict(db.command("serverStatus")["opcounters"])


def per_task(before: dict[str, int], after: dict[str, int], tasks: int) -> dict[str, float]:
    out = {op: (after.get(op, 0) - before.get(op, 0)) / tasks for op in OPS}
    out["total"] = sum(out.values())
    return out


def fill_tasks(tasks, n: int, batch: int = 10_000, threads: int = 2) -> float:
    """Store ``n`` finished tasks (9 done, 1 failed in 10) shaped exactly
    like one the service finished: the newest finished task in ``tasks``
    is the template, so the fill follows whatever Task.to_doc writes.
    Returns the seconds it took."""
    template = tasks.find_one({"status": "done"}, sort=[("finished_at", -1)])
    if template is None:
        raise SystemExit("fill_tasks needs one task the service finished, as a template")
    for key in ("_id",):
        template.pop(key)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    lock = threading.Lock()
    counter = iter(range(0, n, batch))

    def make(i: int) -> dict:
        doc = copy.deepcopy(template)
        # A week of history, newest last; spread over a thousand clients
        # and a hundred thousand URLs, as a real store would be.
        at = now - dt.timedelta(seconds=(n - i) * 604_800 / n)
        doc.update(_id=str(uuid.uuid4()), url=f"http://files{i % 97}.example/f/{i % 100_000}",
                   client=f"10.0.{i % 1000 // 250}.{i % 250}",
                   created_at=at, started_at=at, finished_at=at + dt.timedelta(seconds=1))
        if i % 10 == 0:
            doc.update(status="failed", md5=None, digests={},
                       error={"code": "http_status", "message": "the server answered 404"})
        else:
            md5 = uuid.uuid4().hex
            doc.update(md5=md5, digests={"md5": md5})
        return doc

    def worker() -> None:
        while True:
            with lock:
                start = next(counter, None)
            if start is None:
                return
            tasks.insert_many([make(i) for i in range(start, min(n, start + batch))],
                              ordered=False)

    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(worker) for _ in range(threads)]:
            future.result()
    return time.monotonic() - t0
