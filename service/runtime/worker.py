"""A worker process: claims tasks, downloads and hashes them, records the
outcome and sends the mails that are due.

Each worker runs its own IOLoop with up to WORKER_CONCURRENCY downloads at
once. It renews the leases of its running tasks (and records their
progress) once a second; a worker that dies stops renewing, and its tasks
are claimed again when their leases run out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable

from pymongo.errors import PyMongoError

from service.config import Config
from service.fetch.download import Download, FetchError, make_client
from service.runtime import metrics
from service.notify.mailer import Mailer, MailError
from service.redact import safe_url
from service.storage.store import NOTE_PENDING, TaskStore, open_store

log = logging.getLogger("md5light.worker")

MAX_RETRY_DELAY = 300.0
loop_time = time.monotonic  # the clock Download.last_progress is read on
WORKER_NICENESS = 10
CLAIM_BATCH = 4


class LeaseLost(Exception):
    pass


class Worker:
    def __init__(self, config: Config, store: TaskStore, name: str | None = None):
        self.config = config
        self.store = store
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.client = make_client(config)
        self.hash_executor = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1),
                                                thread_name_prefix="md5")
        self.mailer = Mailer(config, ThreadPoolExecutor(max_workers=4, thread_name_prefix="smtp"))
        self.active: dict[str, tuple[dict, Download]] = {}
        self.wake = asyncio.Event()
        self.mail_wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self._jobs: set[asyncio.Task] = set()

    # -- lifecycle --------------------------------------------------------

    def stop(self) -> None:
        if not self.stopping.is_set():
            log.info("worker %s draining: no new claims, %d downloads running",
                     self.name, len(self.active))
            self.stopping.set()
            self.wake.set()
            self.mail_wake.set()

    async def run(self) -> None:
        log.info("worker %s started (concurrency %d)", self.name, self.config.concurrency)
        loops = [asyncio.create_task(self._claim_loop()),
                 asyncio.create_task(self._lease_loop())]
        if self.mailer.enabled:
            loops.append(asyncio.create_task(self._mail_loop()))
        await self.stopping.wait()
        await self._drain()
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        try:
            await self.store.flush_counts()
        except PyMongoError:
            log.warning("worker %s could not record its last queue counts", self.name)
        self.client.close()
        self.hash_executor.shutdown(wait=True)
        log.info("worker %s stopped", self.name)

    async def _drain(self) -> None:
        if self._jobs:
            await asyncio.wait(self._jobs, timeout=self.config.drain_seconds)
        for task, download in list(self.active.values()):
            download.abort(FetchError("shutdown", "worker shutting down", True))
        if self._jobs:
            await asyncio.wait(self._jobs, timeout=10)

    # -- claiming ---------------------------------------------------------

    async def _claim_loop(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            self.wake.clear()
            try:
                while not self.stopping.is_set():
                    free = self.config.concurrency - len(self.active)
                    if free <= 0:
                        break
                    # A few at a time: a burst of big files then spreads over
                    # the workers instead of all landing on the first awake.
                    free = min(free, CLAIM_BATCH)
                    claimed = await self.store.claim(self.name, free)
                    for task in claimed:
                        self._start(task)
                    if len(claimed) < free:
                        break
                failures = 0
            except PyMongoError as exc:
                failures += 1
                log.warning("worker %s cannot reach the database (%s); retrying", self.name,
                            type(exc).__name__)
                await asyncio.sleep(min(5.0, 0.2 * 2 ** failures))
                continue
            try:
                await asyncio.wait_for(self.wake.wait(), self.config.poll_interval)
            except asyncio.TimeoutError:
                pass

    def _start(self, task: dict) -> None:
        download = Download(task["url"], self.config, self.client, self.hash_executor)
        self.active[task["_id"]] = (task, download)
        job = asyncio.create_task(self._process(task, download))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        log.info("task %s started attempt %d: %s", task["_id"], task["attempts"],
                 safe_url(task["url"]))

    async def _process(self, task: dict, download: Download) -> None:
        task_id = task["_id"]
        if task["attempts"] == 1 and task.get("created_at") and task.get("started_at"):
            metrics.QUEUE_WAIT_SECONDS.observe(
                (task["started_at"] - task["created_at"]).total_seconds())
        started = asyncio.get_running_loop().time()
        try:
            try:
                md5 = await download.run()
            except FetchError as exc:
                metrics.DOWNLOAD_SECONDS.observe(asyncio.get_running_loop().time() - started)
                metrics.BYTES_HASHED.inc(download.bytes_done)
                await self._on_error(task, download, exc)
            else:
                metrics.DOWNLOAD_SECONDS.observe(asyncio.get_running_loop().time() - started)
                metrics.BYTES_HASHED.inc(download.bytes_done)
                metrics.TASKS_FINISHED.labels("done").inc()
                if await self._persist(lambda: self.store.finish(
                        task, self.name, md5=md5, bytes_done=download.bytes_done,
                        bytes_total=download.bytes_total)):
                    log.info("task %s done: md5 %s, %d bytes", task_id, md5,
                             download.bytes_done)
                    self._after_finish(task)
        except LeaseLost:
            log.warning("task %s: lease lost, left to the worker that holds it", task_id)
        except Exception:  # noqa: BLE001 - one task must never take the worker down
            log.exception("task %s: unexpected error", task_id)
            await self._persist(lambda: self.store.finish(task, self.name, error={
                "code": "internal", "message": "internal error while processing the task"}))
        finally:
            self.active.pop(task_id, None)
            self.wake.set()

    async def _on_error(self, task: dict, download: Download, exc: FetchError) -> None:
        task_id = task["_id"]
        if exc.code == "lease_lost":
            raise LeaseLost()
        if exc.code == "shutdown":
            await self._persist(lambda: self.store.retry_later(task, self.name, 0, exc.as_doc(),
                                                       count_attempt=False))
            log.info("task %s returned to the queue (worker shutting down)", task_id)
            return
        if exc.transient and task["attempts"] < self.config.max_attempts:
            delay = exc.retry_after if exc.retry_after is not None else (
                self.config.retry_base * 2 ** (task["attempts"] - 1))
            delay = min(delay, MAX_RETRY_DELAY)
            if await self._persist(lambda: self.store.retry_later(task, self.name, delay,
                                                          exc.as_doc())):
                metrics.TASK_RETRIES.labels(exc.code).inc()
                log.info("task %s attempt %d failed (%s); retrying in %.1f s", task_id,
                         task["attempts"], exc.message, delay)
            return
        if await self._persist(lambda: self.store.finish(task, self.name, error=exc.as_doc(),
                                                 bytes_done=download.bytes_done,
                                                 bytes_total=download.bytes_total)):
            metrics.TASKS_FINISHED.labels("failed").inc()
            log.info("task %s failed: %s", task_id, exc.message)
            self._after_finish(task)

    def _after_finish(self, task: dict) -> None:
        if (task.get("notification") or {}).get("status") == NOTE_PENDING:
            self.mail_wake.set()

    async def _persist(self, operation: Callable[[], Awaitable[bool]]) -> bool:
        """Write an outcome, waiting out a database outage: the work is done
        and must not be lost to a blip. Gives up when the lease would have
        expired anyway (another worker will redo the task)."""
        deadline = asyncio.get_running_loop().time() + max(self.config.lease_seconds, 5)
        delay = 0.2
        while True:
            try:
                return await operation()
            except PyMongoError as exc:
                if asyncio.get_running_loop().time() > deadline:
                    log.error("giving up a database write: %s", exc)
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- leases and progress ------------------------------------------------

    async def _lease_loop(self) -> None:
        interval = min(1.0, self.config.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            for task_id, (task, download) in list(self.active.items()):
                try:
                    held = await self.store.renew(task_id, self.name, download.bytes_done,
                                                  download.bytes_total)
                except PyMongoError:
                    continue
                if not held:
                    download.abort(FetchError("lease_lost", "lease lost", False))
            try:
                await self.store.heartbeat(self.name, len(self.active), self._stuck())
                await self.store.flush_counts()
            except PyMongoError:
                pass

    def _stuck(self) -> int:
        """Downloads with no progress for twice IDLE_TIMEOUT. The watchdog
        ends a download idle for IDLE_TIMEOUT, so any such one means a
        fault in this worker, which /health then reports."""
        limit = loop_time() - 2 * self.config.idle_timeout
        return sum(1 for _, download in self.active.values() if download.last_progress < limit)

    # -- mail ---------------------------------------------------------------

    async def _mail_loop(self) -> None:
        lease = self.config.smtp_timeout * 4 + 30
        while not self.stopping.is_set():
            self.mail_wake.clear()
            try:
                while not self.stopping.is_set():
                    task = await self.store.claim_notification(self.name, lease)
                    if task is None:
                        break
                    await self._send_mail(task)
            except PyMongoError:
                await asyncio.sleep(1.0)
                continue
            try:
                await asyncio.wait_for(self.mail_wake.wait(), self.config.poll_interval * 5)
            except asyncio.TimeoutError:
                pass

    async def _send_mail(self, task: dict) -> None:
        attempts = task["notification"]["attempts"]
        try:
            await self.mailer.send(task)
        except MailError as exc:
            if exc.permanent or attempts >= self.config.mail_max_attempts:
                metrics.MAILS.labels("failed").inc()
                log.warning("task %s: mail to %s failed for good: %s", task["_id"],
                            redact_email(task["email"]), exc)
                await self.store.notification_failed(task["_id"], str(exc), None)
            else:
                metrics.MAILS.labels("retry").inc()
                delay = self.config.mail_retry_base * 2 ** (attempts - 1)
                log.info("task %s: mail attempt %d failed (%s); retrying in %.0f s",
                         task["_id"], attempts, exc, delay)
                await self.store.notification_failed(task["_id"], str(exc), delay)
            return
        metrics.MAILS.labels("sent").inc()
        await self.store.notification_sent(task["_id"])
        log.info("task %s: mail sent to %s", task["_id"], redact_email(task["email"]))


def redact_email(address: str | None) -> str:
    if not address:
        return "-"
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}"


async def main(config: Config) -> None:
    """Entry point of the 'worker' role."""
    # Hashing may take every core. A lower priority keeps the API (whose
    # answers must stay quick) and the database ahead of it; the work is
    # no slower for that when nothing else wants the CPU.
    try:
        os.nice(WORKER_NICENESS)
    except OSError:
        pass
    store = open_store(config, config.mongodb_uri)
    worker = Worker(config, store)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    _watch_wake_pipe(worker)
    try:
        await worker.run()
    finally:
        await store.client.close()


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
