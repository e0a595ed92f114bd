"""Shared bench helpers: start the service and file servers as processes,
time things, print tables. Benchmarks talk only to 127.0.0.1."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from tests.servicectl import ROOT, Service, free_port

__all__ = ["ROOT", "Stack", "FileServerProcess", "free_port", "table", "wait_answering"]


class Stack(Service):
    """md5-light as `make run` starts it (embedded database, default
    settings), in a scratch DATA_DIR; the tests' harness underneath."""

    def __init__(self, **env: str):
        self.dir = Path(tempfile.mkdtemp(prefix="md5bench-"))
        settings = dict(DATA_DIR=str(self.dir / "data"), ALLOW_PRIVATE_URLS="1",
                        LOG_LEVEL="WARNING")
        settings.update(env)
        super().__init__(None, self.dir, quick=False, **settings)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc) -> None:
        try:
            self.stop(timeout=60)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def mongo_uri(self) -> str:
        return (self.dir / "data" / "mongodb.uri").read_text().strip()

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-f", "run.py worker"],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def database_pid(self) -> int:
        out = subprocess.run(["pgrep", "-f", f"(secantusd-py|embedded_patches.py).*{self.dir}"],
                             capture_output=True, text=True).stdout.split()
        return int(out[0])


class FileServerProcess:
    """tests/fileserver.py's app in its own process, so serving files does
    not compete with the benchmark's own GIL."""

    def __init__(self):
        self.port = free_port()
        code = ("import asyncio, logging; from tests import fileserver; "
                "logging.disable(logging.CRITICAL); "
                "from tornado.httpserver import HTTPServer\n"
                "async def main():\n"
                f"    HTTPServer(fileserver.make_app()).listen({self.port}, '127.0.0.1')\n"
                "    await asyncio.Event().wait()\n"
                "asyncio.run(main())")
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
        wait_answering(self.url("/bytes/1"), "file server", 20)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def wait_answering(url: str, what: str, seconds: float = 10) -> None:
    """Return once ``url`` answers at all (any status); RuntimeError after
    ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start")


def table(rows: list[tuple], headers: tuple) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=False))  # noqa: E731
    return "\n".join([line(headers), line(tuple("-" * w for w in widths))] +
                     [line(r) for r in rows])
