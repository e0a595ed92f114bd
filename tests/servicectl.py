"""Start and drive a real md5-light (``run.py``) as a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent

# Quick settings so failure paths finish in seconds, not minutes.
TEST_ENV = {
    "ALLOW_PRIVATE_URLS": "1", "WORKERS": "2", "WORKER_CONCURRENCY": "16",
    "LEASE_SECONDS": "3", "IDLE_TIMEOUT": "3", "CONNECT_TIMEOUT": "3",
    "RETRY_BASE": "0.2", "POLL_INTERVAL": "0.5", "DRAIN_SECONDS": "3",
    "MAIL_RETRY_BASE": "0.5", "LOG_LEVEL": "INFO",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 30, what: str = "condition"):
    """The predicate's first true value, polled every 50 ms."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Service:
    def __init__(self, mongo_base: str | None, log_dir: Path, role: str = "all",
                 db_name: str | None = None, quick: bool = True, **env: str):
        self.port = free_port()
        self.db_name = db_name or f"t_{uuid.uuid4().hex[:10]}"
        self.env = dict(os.environ)
        if quick:  # short timeouts for tests; benchmarks run the defaults
            self.env.update(TEST_ENV)
        self.env["PORT"] = str(self.port)
        if mongo_base:
            self.env["MONGODB_URI"] = f"{mongo_base}/{self.db_name}"
        self.env.update({k: str(v) for k, v in env.items()})
        self.role = role
        self.log_path = log_dir / f"service-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.base = f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> "Service":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), self.role],
                                     cwd=ROOT, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"service exited: {self.log()[-3000:]}")
            try:
                if requests.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"service not healthy in time: {self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    @staticmethod
    def stop_all(services: list[Service]) -> None:
        """Stop every one, even after one fails to stop (which is raised
        once all are down): a process left running outlives the test run."""
        failure: BaseException | None = None
        for svc in services:
            try:
                svc.stop()
            except Exception as exc:  # noqa: BLE001
                failure = failure or exc
        if failure is not None:
            raise failure

    # -- API helpers ----------------------------------------------------

    def submit(self, url: str, email: str | None = None, **kwargs) -> str:
        data = {"url": url}
        if email:
            data["email"] = email
        r = requests.post(self.base + "/submit", data=data, timeout=10, **kwargs)
        assert r.status_code == 202, (r.status_code, r.text)
        return r.json()["id"]

    def check(self, task_id: str) -> requests.Response:
        return requests.get(self.base + "/check", params={"id": task_id}, timeout=10)

    def task(self, task_id: str) -> dict:
        r = requests.get(f"{self.base}/tasks/{task_id}", timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, task_id: str, timeout: float = 60) -> requests.Response:
        deadline = time.monotonic() + timeout
        while True:
            r = self.check(task_id)
            if r.status_code != 202:
                return r
            if time.monotonic() > deadline:
                raise AssertionError(f"task {task_id} still running after {timeout} s: "
                                     f"{self.task(task_id)}")
            time.sleep(0.05)

    def wait_all(self, ids: list[str], timeout: float = 120) -> dict[str, requests.Response]:
        deadline = time.monotonic() + timeout
        out: dict[str, requests.Response] = {}
        pending = list(ids)
        while pending:
            still = []
            for task_id in pending:
                r = self.check(task_id)
                if r.status_code == 202:
                    still.append(task_id)
                else:
                    out[task_id] = r
            pending = still
            if pending:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{len(pending)} tasks unfinished, e.g. "
                                         f"{self.task(pending[0])}")
                time.sleep(0.2)
        return out
