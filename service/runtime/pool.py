"""The pool of worker processes that the 'all' role runs beside the API.

Each worker is ``run.py worker`` in its own process (its own IOLoop and
GIL), given the same configuration through its environment. The API hands
them tasks (or wakes them to scan) through a pipe per worker, so a task
starts at once instead of at the next poll (``handoff``, ``wake_pipe``),
and hears through another of every task end they record and of their room
(``results_pipe``); a dead worker is started again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from service.backoff import Backoff
from service.config import Config, to_environ
from service.runtime.handoff import Handoff
from service.runtime.procutil import die_with_parent
from service.runtime.results_pipe import ENV as RESULTS_ENV
from service.runtime.results_pipe import OnResult, ResultsReader
from service.runtime.worker_process import STOP_GRACE

log = logging.getLogger("md5light.pool")

# A worker that dies within 10 s of its start is restarted after a growing
# delay (one that crashes at once must not spin); otherwise at once.
RESTART_BACKOFF = Backoff(first=1.0, cap=30.0)

RUN_PY = str(Path(__file__).resolve().parents[2] / "run.py")


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen | None = None
    wake_fd: int | None = None
    results: ResultsReader | None = None
    started: float = 0.0
    quick_deaths: int = 0
    restart_at: float = 0.0


class WorkerPool:
    def __init__(self, config: Config, mongodb_uri: str, count: int,
                 on_result: OnResult | None = None, handoff: Handoff | None = None):
        self.config = config
        self.on_result = on_result
        # Hands tasks to the workers through their wake pipes; the workers
        # report their room through their results pipes.
        self.handoff = handoff
        self.mongodb_uri = mongodb_uri
        self.slots = [_Slot(i) for i in range(count)]
        self.stopping = False
        self._next_wake = -1
        self._supervisor: asyncio.Task | None = None

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    def _spawn(self, slot: _Slot) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        env = dict(os.environ)
        env.update(to_environ(self.config))
        env["MONGODB_URI"] = self.mongodb_uri
        env["MD5LIGHT_WAKE_FD"] = str(read_fd)
        passed = [read_fd]
        if self.on_result is not None or self.handoff is not None:
            results_read, results_write = os.pipe()
            env[RESULTS_ENV] = str(results_write)
            passed.append(results_write)
        # Own session: Ctrl-C reaches only run.py, which drains the workers
        # in order (stop claiming, let downloads finish, requeue the rest).
        slot.process = subprocess.Popen(
            [sys.executable, RUN_PY, "worker"], env=env, pass_fds=passed,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        for fd in passed:
            os.close(fd)
        if len(passed) > 1:
            if slot.results is not None:
                slot.results.close()
            handoff = self.handoff
            on_room = (None if handoff is None
                       else lambda message, index=slot.index: handoff.report(index, message))
            slot.results = ResultsReader(results_read, self.on_result or _ignore, on_room)
        if slot.wake_fd is not None:
            os.close(slot.wake_fd)
        slot.wake_fd = write_fd
        if self.handoff is not None:
            self.handoff.attach(slot.index, write_fd)
        slot.started = time.monotonic()
        log.info("worker process %d started (pid %d)", slot.index, slot.process.pid)

    async def _supervise(self) -> None:
        while not self.stopping:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for slot in self.slots:
                proc = slot.process
                if self.stopping or proc is None or proc.poll() is None:
                    continue
                if slot.restart_at == 0.0:
                    if self.handoff is not None:
                        self.handoff.detach(slot.index)
                    lived = now - slot.started
                    slot.quick_deaths = slot.quick_deaths + 1 if lived < 10 else 0
                    delay = RESTART_BACKOFF.delay(slot.quick_deaths)
                    slot.restart_at = now + delay
                    log.error("worker process %d (pid %d) exited with %s; restarting in %.1f s",
                              slot.index, proc.pid, proc.returncode, delay)
                if now >= slot.restart_at:
                    slot.restart_at = 0.0
                    self._spawn(slot)

    async def stop(self) -> None:
        self.stopping = True
        if self.handoff is not None:
            self.handoff.stop()
        if self._supervisor is not None:
            self._supervisor.cancel()
        running = [s.process for s in self.slots if s.process and s.process.poll() is None]
        for proc in running:
            proc.terminate()
        # A second past the workers' own limit (worker_process.STOP_GRACE).
        deadline = time.monotonic() + self.config.drain_seconds + STOP_GRACE + 1
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for proc in running:
            if proc.poll() is None:
                log.warning("worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()
        for slot in self.slots:
            if slot.wake_fd is not None:
                os.close(slot.wake_fd)
                slot.wake_fd = None
            if slot.results is not None:
                slot.results.close()
                slot.results = None


def _ignore(task_id: str, status: int, body: dict) -> None:
    pass
