"""The worker role as a process: a lower priority, signals, the wake pipe
from the parent and the results pipe to it, and one Worker on its own
store."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
from collections.abc import Callable

from service.config import Config
from service.runtime.results_pipe import ResultsPipe
from service.runtime.wake_pipe import WakeReader
from service.runtime.worker import Worker
from service.storage.store import open_store

log = logging.getLogger("md5light.worker")

WORKER_NICENESS = 10

# How long after the drain a stopping worker may take for its last writes.
# The pool kills a worker still there a second later; the worker goes
# first, so that what held it is in its log.
STOP_GRACE = 14.0


async def main(config: Config) -> None:
    """Entry point of the 'worker' role."""
    # Hashing may take every core. A lower priority keeps the API (whose
    # answers must stay quick) and the database ahead of it; the work is
    # no slower for that when nothing else wants the CPU.
    try:
        os.nice(WORKER_NICENESS)
    except OSError:
        pass
    store = open_store(config, str(config.mongodb_uri))
    results = ResultsPipe.from_environ()
    worker = Worker(config, store, announce=results.send if results else None,
                    room=results.room if results and config.handoff else None)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        # A worker told to stop must stop, whatever it waits on: past the
        # limit it writes every thread's stack to its log and exits. Its
        # unfinished tasks' leases run out and other workers take them.
        # Armed once: a second signal must not push the limit back.
        if not worker.stopping.is_set():
            faulthandler.dump_traceback_later(config.drain_seconds + STOP_GRACE, exit=True)
        worker.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    _watch_wake_pipe(worker, stop)
    try:
        await worker.run()
    finally:
        await store.close()


def _watch_wake_pipe(worker: Worker, stop: Callable[[], None]) -> None:
    """The 'all' role hands its workers tasks, or wakes them to scan,
    through a pipe (runtime.wake_pipe). End of file means the parent died:
    drain and exit rather than linger."""
    fd_text = os.environ.get("MD5LIGHT_WAKE_FD")
    if not fd_text:
        return
    fd = int(fd_text)
    os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()
    messages = WakeReader()

    def readable() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not data:
            loop.remove_reader(fd)
            log.warning("parent process gone; worker %s stopping", worker.name)
            stop()
            return
        for message in messages.feed(data):
            if message is None:
                worker.scan_soon()
            else:
                worker.handed(message)

    loop.add_reader(fd, readable)
