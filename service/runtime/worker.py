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
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pymongo
from pymongo.errors import PyMongoError

from service.backoff import Backoff
from service.config import Config
from service.fetch.checkpoint import Checkpoint
from service.fetch.client import make_client
from service.fetch.download import Download, Fetched, FetchError, Interrupted
from service.model.digests import mismatch
from service.model.task import Task, TaskError
from service.notify.mailer import Mailer
from service.redact import safe_url
from service.runtime import metrics
from service.runtime.mail_sender import MailSender
from service.runtime.webhook_sender import WebhookSender
from service.storage.queue import Lease
from service.storage.store import Store

log = logging.getLogger("md5light.worker")

CLAIM_BATCH = 4
# Lease rounds (about a second each) between looks for what a worker that
# died left half done: manifests whose last line ended, coalesced submits
# whose download ended.
SWEEP_ROUNDS = 30
loop_time = time.monotonic  # the clock Download.last_progress is read on

# Waits after failures in a row: of a download (unless the server said how
# long, with Retry-After), of the database while claiming, and of a result
# write during an outage.
DOWNLOAD_RETRY_CAP = 300.0
CLAIM_BACKOFF = Backoff(first=0.4, cap=5.0)
WRITE_BACKOFF = Backoff(first=0.2, cap=5.0)


class LeaseLost(Interrupted):
    """Another worker holds the task now: stop, write nothing."""


class TaskCancelled(Interrupted):
    """The task was cancelled (DELETE /tasks/<id>): stop, write nothing."""


class ShuttingDown(Interrupted):
    """This worker is stopping: the task goes back to the queue."""


class Worker:
    def __init__(self, config: Config, store: Store, name: str | None = None):
        self.config = config
        self.store = store
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.client = make_client(config)
        self.hash_executor = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1),
                                                thread_name_prefix="md5")
        mailer = Mailer(config, ThreadPoolExecutor(max_workers=4, thread_name_prefix="smtp"))
        self.mail = MailSender(config, [store.outbox, store.manifest_outbox], mailer,
                               self.name) if mailer.enabled else None
        self.hooks = (WebhookSender(config, store.callbacks, self.name)
                      if config.webhook_secret else None)
        self.download_retry = Backoff(first=config.retry_base, cap=DOWNLOAD_RETRY_CAP)
        self.active: dict[str, tuple[Task, Download]] = {}
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self._jobs: set[asyncio.Task] = set()

    # -- lifecycle --------------------------------------------------------

    def stop(self) -> None:
        if not self.stopping.is_set():
            log.info("worker %s draining: no new claims, %d downloads running",
                     self.name, len(self.active))
            self.stopping.set()
            self.wake.set()
            if self.mail:
                self.mail.wake.set()

    async def run(self) -> None:
        log.info("worker %s started (concurrency %d)", self.name, self.config.concurrency)
        try:
            await self.store.clock.sync()  # before the first claim compares leases
        except PyMongoError:
            pass  # the local clock until a heartbeat gets through
        log.info("worker %s: database clock offset %+.3f s", self.name,
                 self.store.clock.offset.total_seconds())
        loops = [asyncio.create_task(self._claim_loop()),
                 asyncio.create_task(self._lease_loop())]
        if self.mail:
            loops.append(asyncio.create_task(self.mail.run(self.stopping)))
        if self.hooks:
            loops.append(asyncio.create_task(self.hooks.run(self.stopping)))
        await self.stopping.wait()
        await self._drain()
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        try:
            await self.store.counters.flush()
        except PyMongoError:
            log.warning("worker %s could not record its last queue counts", self.name)
        self.client.close()
        self.hash_executor.shutdown(wait=True)
        log.info("worker %s stopped", self.name)

    async def _drain(self) -> None:
        if self._jobs:
            await asyncio.wait(self._jobs, timeout=self.config.drain_seconds)
        for _, download in list(self.active.values()):
            download.abort(ShuttingDown("worker shutting down"))
        if self._jobs:
            await asyncio.wait(self._jobs, timeout=10)

    # -- claiming ---------------------------------------------------------

    async def _claim_loop(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            self.wake.clear()
            try:
                await self._claim_while_free()
                failures = 0
            except PyMongoError as exc:
                failures += 1
                log.warning("worker %s cannot reach the database (%s); retrying", self.name,
                            type(exc).__name__)
                await asyncio.sleep(CLAIM_BACKOFF.delay(failures))
                continue
            try:
                await asyncio.wait_for(self.wake.wait(), self.config.poll_interval)
            except TimeoutError:
                pass

    async def _claim_while_free(self) -> None:
        while not self.stopping.is_set():
            free = self.config.concurrency - len(self.active)
            if free <= 0:
                return
            # A few at a time: a burst of big files then spreads over the
            # workers instead of all landing on the first awake.
            free = min(free, CLAIM_BATCH)
            claimed = await self.store.queue.claim(self.name, free)
            for task in claimed:
                self._start(task)
            if len(claimed) < free:
                return

    def _start(self, task: Task) -> None:
        download = Download(task.url, self.config, self.client, self.hash_executor,
                            task.algorithms, Checkpoint.from_doc(task.checkpoint))
        self.active[task.id] = (task, download)
        job = asyncio.create_task(self._process(task, download))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        log.info("task %s started attempt %d: %s", task.id, task.attempts, safe_url(task.url))

    # -- one task -----------------------------------------------------------

    async def _process(self, task: Task, download: Download) -> None:
        if task.attempts == 1 and task.started_at:
            metrics.QUEUE_WAIT_SECONDS.observe(
                (task.started_at - task.created_at).total_seconds())
        started = loop_time()
        try:
            try:
                fetched = await download.run()
            finally:
                metrics.DOWNLOAD_SECONDS.observe(loop_time() - started)
                metrics.BYTES_HASHED.inc(download.fetched)
            await self._done(task, download, fetched)
        except LeaseLost:
            log.warning("task %s: lease lost, left to the worker that holds it", task.id)
        except TaskCancelled:
            # The cancel wrote the task's end; its status is no longer
            # running, so no write of ours could land anyway.
            log.info("task %s cancelled while running; download stopped", task.id)
        except ShuttingDown:
            # Checkpointed as it stops, so that a deploy costs no bytes.
            await self._persist(partial(self.store.queue.retry_later, task, self.name, 0,
                                        TaskError("shutdown", "worker shutting down"),
                                        count_attempt=False, **_resume_fields(download)))
            log.info("task %s returned to the queue (worker shutting down)", task.id)
        except FetchError as exc:
            await self._failed_try(task, download, exc)
        except Exception:  # noqa: BLE001 - one task must never take the worker down
            log.exception("task %s: unexpected error", task.id)
            await self._persist(partial(self.store.queue.finish, task, self.name, error=TaskError(
                "internal", "internal error while processing the task")))
        finally:
            self.active.pop(task.id, None)
            self.wake.set()

    async def _done(self, task: Task, download: Download, fetched: Fetched) -> None:
        # A file that is not the expected one will not change on a retry.
        wrong = mismatch(task.expected, fetched.digests) if task.expected else None
        error = TaskError("mismatch", wrong) if wrong else None
        if await self._persist(partial(
                self.store.queue.finish, task, self.name, digests=fetched.digests,
                error=error, verified=None if task.expected is None else not wrong,
                server_digest=fetched.server, bytes_done=download.bytes_done,
                bytes_total=download.bytes_total, attempt=download.progress())):
            # Counted once recorded: a task cancelled meanwhile is not done.
            metrics.TASKS_FINISHED.labels("failed" if wrong else "done").inc()
            log.info("task %s %s: md5 %s, %d bytes", task.id, "mismatch" if wrong else "done",
                     fetched.digests["md5"], download.bytes_done)
            await self._after_finish(task, "mismatch" if wrong else "ok", download)

    async def _failed_try(self, task: Task, download: Download, exc: FetchError) -> None:
        if exc.transient and task.attempts < self.config.max_attempts:
            delay = exc.retry_after if exc.retry_after is not None else \
                self.download_retry.delay(task.attempts)
            delay = min(delay, DOWNLOAD_RETRY_CAP)
            if await self._persist(partial(self.store.queue.retry_later, task, self.name,
                                           delay, exc.as_task_error(),
                                           **_resume_fields(download))):
                metrics.TASK_RETRIES.labels(exc.code).inc()
                log.info("task %s attempt %d failed (%s); retrying in %.1f s", task.id,
                         task.attempts, exc.message, delay)
            return
        if await self._persist(partial(self.store.queue.finish, task, self.name,
                                       error=exc.as_task_error(), server_digest=exc.server,
                                       bytes_done=download.bytes_done,
                                       bytes_total=download.bytes_total,
                                       attempt=download.progress())):
            metrics.TASKS_FINISHED.labels("failed").inc()
            log.info("task %s failed: %s", task.id, exc.message)
            await self._after_finish(task, "failed", download)

    async def _after_finish(self, task: Task, ended_as: str, download: Download) -> None:
        manifest, followers = None, 0
        if task.manifest is None:
            try:
                followers = await self.store.coalescer.settle(task)
            except PyMongoError:
                pass  # the periodic sweep will end them
        if task.manifest:
            try:
                manifest = await self.store.manifests.line_ended(
                    task.manifest, ended_as, download.bytes_done, download.bytes_total)
            except PyMongoError:
                pass  # the periodic sweep will finish it
        if self.mail and (task.mail_pending or followers or (manifest and manifest.mail_pending)):
            self.mail.wake.set()
        if self.hooks and (task.callback_pending or followers):
            self.hooks.wake.set()

    async def _persist(self, operation: Callable[[], Awaitable[bool]]) -> bool:
        """Write an outcome, waiting out a database outage: the work is done
        and must not be lost to a blip. Gives up when the lease would have
        expired anyway (another worker will redo the task)."""
        deadline = loop_time() + max(self.config.lease_seconds, 5)
        failures = 0
        while True:
            try:
                return await operation()
            except PyMongoError as exc:
                if loop_time() > deadline:
                    log.error("giving up a database write: %s", exc)
                    return False
                failures += 1
                await asyncio.sleep(WRITE_BACKOFF.delay(failures))

    # -- leases and progress ------------------------------------------------

    async def _lease_loop(self) -> None:
        interval = min(1.0, self.config.lease_seconds / 3)
        rounds = 0
        while True:
            await asyncio.sleep(interval)
            rounds += 1
            if rounds % SWEEP_ROUNDS == 0:
                await self._sweep()
            for task, download in list(self.active.values()):
                try:
                    # A renewal later than this is no use (the lease may be
                    # gone), and one hung on a dead link would hold up the
                    # others and the moment this worker learns it lost them.
                    due = download.checkpoint(due=True)
                    with pymongo.timeout(interval * 2):
                        lease = await self.store.queue.renew(
                            task, self.name, download.bytes_done, download.bytes_total,
                            due.to_doc() if due else None, download.progress())
                except PyMongoError:
                    continue
                if lease is Lease.CANCELLED:
                    download.abort(TaskCancelled("task cancelled"))
                elif lease is Lease.LOST:
                    download.abort(LeaseLost("lease lost"))
            try:
                with pymongo.timeout(max(interval * 2, 2.0)):
                    await self.store.clock.sync()
                    await self.store.liveness.heartbeat(self.name, len(self.active),
                                                        self._stuck())
                    await self.store.counters.flush()
            except PyMongoError:
                pass

    async def _sweep(self) -> None:
        """Finish what a crash left half done: manifests and coalesced
        submits whose downloads ended."""
        try:
            ended = await self.store.manifests.sweep() + await self.store.coalescer.sweep()
            if ended and self.mail:
                self.mail.wake.set()
        except PyMongoError:
            pass

    def _stuck(self) -> int:
        """Downloads with no progress for twice IDLE_TIMEOUT. The watchdog
        ends a download idle for IDLE_TIMEOUT, so any such one means a
        fault in this worker, which /health then reports."""
        limit = loop_time() - 2 * self.config.idle_timeout
        return sum(1 for _, download in self.active.values() if download.last_progress < limit)


def _resume_fields(download: Download) -> dict:
    """Where the retry of a download resumes, and how this attempt went."""
    latest = download.checkpoint()
    return {"checkpoint": latest.to_doc() if latest else None,
            "attempt": download.progress()}
