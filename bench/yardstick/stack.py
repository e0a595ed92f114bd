"""Start and stop the yardstick: redis-server, two Celery workers and
gunicorn, all on 127.0.0.1 in a scratch directory.

Two ``celery worker`` processes of 16 threads each, not one of 32: that
is md5-light's default shape on this machine (WORKERS = CPU count, 16
downloads each), and threads in one process share one GIL, so a team on
a 2-core box would run a worker per core. gunicorn runs as issue #17
says, 2 workers x 8 threads (gthread).
"""

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

from bench.common import ROOT, free_port

CELERY_WORKERS = 2
CELERY_THREADS = 16


class Yardstick:
    def __init__(self, workers: int = CELERY_WORKERS, threads: int = CELERY_THREADS):
        self.workers, self.threads = workers, threads
        self.dir = Path(tempfile.mkdtemp(prefix="yardstick-"))
        self.redis_port = free_port()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ,
                        YARDSTICK_REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0")
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Yardstick:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "ab")
        # Its own session, so that stop() reaches children (gunicorn's workers).
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("redis-server not found: apt-get install redis-server "
                             "(make bench does it)")
        # Persistence off: a cache-and-queue Redis, as such stacks run it.
        self._spawn("redis", ["redis-server", "--bind", "127.0.0.1",
                              "--port", str(self.redis_port), "--dir", str(self.dir),
                              "--save", "", "--appendonly", "no", "--daemonize", "no"])
        self._wait(lambda: self._redis_ping(), "redis-server")
        for i in range(self.workers):
            self._spawn(f"celery{i}", [
                sys.executable, "-m", "celery", "-A", "bench.yardstick.tasks", "worker",
                "--pool", "threads", "--concurrency", str(self.threads),
                "--hostname", f"w{i}@yardstick", "--loglevel", "WARNING"])
        self._spawn("gunicorn", [
            sys.executable, "-m", "gunicorn", "--workers", "2", "--threads", "8", "-k", "gthread",
            "--bind", f"127.0.0.1:{self.port}", "--log-level", "warning",
            "bench.yardstick.web:app"])
        self._wait(self._web_up, "gunicorn")
        from celery import Celery
        control = Celery("yardstick-bench", broker=self.env["YARDSTICK_REDIS_URL"]).control
        self._wait(lambda: len(control.ping(timeout=1.0)) >= self.workers, "the celery workers")

    def _redis_ping(self) -> bool:
        import redis
        try:
            return bool(redis.Redis(port=self.redis_port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def _web_up(self) -> bool:
        try:
            return requests.get(self.base + "/check", params={"id": "x"},
                                timeout=2).status_code == 404
        except requests.RequestException:
            return False

    def _wait(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{what}: a yardstick process exited; logs in {self.dir}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start in {timeout:.0f} s; logs in {self.dir}")
            time.sleep(0.1)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def redis_pid(self) -> int:
        return self.procs[0].pid  # started first

    def stop(self) -> None:
        # Web and workers first, Redis last, so nothing logs a lost broker.
        for proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
