"""The worker role as a process: a lower priority, signals, the wake pipe
from the parent and the results pipe to it, and one Worker on its own
store."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from service.config import Config
from service.runtime.results_pipe import ResultsPipe
from service.runtime.worker import Worker
from service.storage.store import open_store

log = logging.getLogger("md5light.worker")

WORKER_NICENESS = 10


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
    worker = Worker(config, store, announce=results.send if results else None)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    _watch_wake_pipe(worker)
    try:
        await worker.run()
    finally:
        await store.close()


def _watch_wake_pipe(worker: Worker) -> None:
    """The 'all' role wakes its workers through a pipe after each submit.
    End of file means the parent died: drain and exit rather than linger."""
    fd_text = os.environ.get("MD5LIGHT_WAKE_FD")
    if not fd_text:
        return
    fd = int(fd_text)
    os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        if not data:
            loop.remove_reader(fd)
            log.warning("parent process gone; worker %s stopping", worker.name)
            worker.stop()
            return
        worker.wake.set()

    loop.add_reader(fd, readable)
