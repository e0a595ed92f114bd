"""Shared bench helpers: start the service and file servers as processes,
time things, print tables. Benchmarks talk only to 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from servicectl import free_port  # noqa: E402


class Stack:
    """md5-light with its embedded database, in a scratch DATA_DIR."""

    def __init__(self, **env: str):
        self.dir = Path(tempfile.mkdtemp(prefix="md5bench-"))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ, PORT=str(self.port), DATA_DIR=str(self.dir / "data"),
                        ALLOW_PRIVATE_URLS="1", LOG_LEVEL="WARNING")
        self.env.update(env)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Stack":
        log = open(self.dir / "service.log", "wb")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "run.py")], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(self.base + "/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError((self.dir / "service.log").read_text()[-3000:])

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def mongo_uri(self) -> str:
        return (self.dir / "data" / "mongodb.uri").read_text().strip()

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-f", "run.py worker"],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


class FileServerProcess:
    """tests/fileserver.py's app in its own process, so serving files does
    not compete with the benchmark's own GIL."""

    def __init__(self):
        self.port = free_port()
        code = ("import asyncio, logging, sys; sys.path.insert(0, %r); import fileserver; "
                "logging.disable(logging.CRITICAL); "
                "from tornado.httpserver import HTTPServer\n"
                "async def main():\n"
                "    HTTPServer(fileserver.make_app()).listen(%d, '127.0.0.1')\n"
                "    await asyncio.Event().wait()\n"
                "asyncio.run(main())") % (str(ROOT / "tests"), self.port)
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                requests.get(self.url("/bytes/1"), timeout=1)
                return
            except requests.RequestException:
                time.sleep(0.1)
        raise RuntimeError("file server did not start")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def table(rows: list[tuple], headers: tuple) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(headers), line(tuple("-" * w for w in widths))] +
                     [line(r) for r in rows])
