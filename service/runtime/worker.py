"""A worker process: claims tasks, downloads and hashes them, has the
outcome recorded (``outcomes``) and sends the mails and webhooks that are
due.

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
from concurrent.futures import ThreadPoolExecutor

import pymongo
from pymongo.errors import PyMongoError

from service.backoff import Backoff
from service.config import Config
from service.fetch.checkpoint import Checkpoint
from service.fetch.client import make_client
from service.fetch.download import FetchError, Interrupted
from service.fetch.loader import Transfer, make_download
from service.fetch.mirrors import Wanted
from service.fetch.segments import HostSlots
from service.model.task import Task
from service.notify.mailer import Mailer
from service.redact import safe_url
from service.runtime import metrics
from service.runtime.mail_sender import MailSender
from service.runtime.outcomes import Announce, Outcomes
from service.runtime.results_pipe import Room
from service.runtime.webhook_sender import WebhookSender
from service.storage.queue import Lease
from service.storage.store import Store

log = logging.getLogger("md5light.worker")

CLAIM_BATCH = 8
# A worker kept busy by the API's handoff still scans this often (at a
# free slot): tasks stored by other API processes must not starve.
SCAN_AT_LEAST = 5.0
# Lease rounds (about a second each) between looks for what a worker that
# died left half done: manifests whose last line ended, coalesced submits
# whose download ended.
SWEEP_ROUNDS = 30
loop_time = time.monotonic  # the clock Download.last_progress is read on

# Waits after failures in a row of the database while claiming.
CLAIM_BACKOFF = Backoff(first=0.4, cap=5.0)


class LeaseLost(Interrupted):
    """Another worker holds the task now: stop, write nothing."""


class TaskCancelled(Interrupted):
    """The task was cancelled (DELETE /tasks/<id>): stop, write nothing."""


class ShuttingDown(Interrupted):
    """This worker is stopping: the task goes back to the queue."""


class Worker:
    def __init__(self, config: Config, store: Store, name: str | None = None,
                 announce: Announce | None = None, room: Room | None = None):
        self.config = config
        self.store = store
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.client = make_client(config)
        # Extra ranged connections per host, across this worker's downloads.
        self.host_slots = HostSlots(config.max_connections_per_host)
        self.hash_executor = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1),
                                                thread_name_prefix="md5")
        mailer = Mailer(config, ThreadPoolExecutor(max_workers=4, thread_name_prefix="smtp"))
        self.mail = MailSender(config, [store.outbox, store.manifest_outbox], mailer,
                               self.name) if mailer.enabled else None
        self.hooks = (WebhookSender(config, store.callbacks, self.name)
                      if config.webhook_secret else None)
        self.outcomes = Outcomes(config, store, self.name, self.mail, self.hooks, announce)
        self.active: dict[str, tuple[Task, Transfer]] = {}
        self._claimed: dict[str, float] = {}  # task id: when (loop_time) it was claimed
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        # Handed over by the API process (runtime.handoff): reports of room
        # go back to it, queued tasks handed over wait here to be claimed
        # by id, and a claim scan runs only when due (woken to scan, the
        # poll interval, or the last scan filled every free slot), not
        # after every end.
        self.room = room
        self._handed: list[dict] = []
        self._seen = 0
        self._scan_due = True
        self._last_scan = 0.0
        self._jobs: set[asyncio.Task] = set()

    # -- lifecycle --------------------------------------------------------

    def stop(self) -> None:
        if self.room is not None:
            self.room(self.name, 0, self._seen)  # no more handoffs
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
            room = len(self.active) < self.config.concurrency
            try:
                await asyncio.wait_for(self.wake.wait(), self.config.poll_interval)
            except TimeoutError:
                # A slot stayed free a whole interval with nothing handed
                # over: look for what others stored. (A busy worker's freed
                # slot is the API's to fill first, in its order.)
                self._scan_due = (self._scan_due or room
                                  and len(self.active) < self.config.concurrency)

    async def _claim_while_free(self) -> None:
        try:
            while not self.stopping.is_set():
                free = self.config.concurrency - len(self.active)
                if free <= 0:
                    return
                if self._handed:
                    docs, self._handed = self._handed[:free], self._handed[free:]
                    for task in await self.store.queue.take_handed(self.name, docs):
                        self._start(task)
                    continue
                if (self.room is not None and not self._scan_due
                        and loop_time() - self._last_scan < SCAN_AT_LEAST):
                    return  # the API hands over what it stores
                # A few at a time: a burst of big files then spreads over the
                # workers instead of all landing on the first awake.
                free = min(free, CLAIM_BATCH)
                self._last_scan = loop_time()
                claimed = await self.store.queue.claim(self.name, free)
                for task in claimed:
                    self._start(task)
                # A full take may have left more behind: scan again at the
                # next free slot.
                self._scan_due = len(claimed) == free
                if len(claimed) < free:
                    return
        finally:
            self._report_room()

    # -- handed over by the API process ------------------------------------

    def handed(self, doc: dict) -> None:
        """A task from the wake pipe: made out to this worker at insert
        (start it), or queued for it to claim by id."""
        self._seen += 1
        if doc.get("status") != "queued":
            task = Task.from_doc(doc)
            if task.worker != self.name:
                log.warning("task %s was handed to %s, not to this worker %s; left to its "
                            "lease", task.id, task.worker, self.name)
            elif self.stopping.is_set() or len(self.active) >= self.config.concurrency:
                self._give_back(task)
            else:
                self._start(task)
                self._report_room()
            return
        self._handed.append(doc)
        self.wake.set()

    def scan_soon(self) -> None:
        """Woken through the pipe: something was stored that a scan finds."""
        self._scan_due = True
        self.wake.set()

    def _report_room(self) -> None:
        if self.room is not None and not self.stopping.is_set():
            free = self.config.concurrency - len(self.active) - len(self._handed)
            self.room(self.name, max(0, free), self._seen)

    def _give_back(self, task: Task) -> None:
        async def give_back() -> None:
            try:
                await self.store.queue.give_back(task, self.name)
            except PyMongoError:
                log.warning("task %s: could not give it back; it runs when its lease ends",
                            task.id)
        job = asyncio.create_task(give_back())
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    def _start(self, task: Task) -> None:
        # An attempt that found pieces of two versions ("changed") is retried
        # over one connection: behind a load balancer whose backends give
        # one file different ETags, pieces would never agree.
        changed = task.error is not None and task.error.code == "changed"
        download = make_download(task.url, self.config, self.client, self.hash_executor,
                                 task.algorithms, Checkpoint.from_doc(task.checkpoint),
                                 revalidate=task.revalidate,
                                 connections=1 if changed else task.connections,
                                 slots=self.host_slots,
                                 wanted=Wanted(task.mirrors, task.expected, task.pieces,
                                               task.size))
        self.active[task.id] = (task, download)
        self._claimed[task.id] = loop_time()
        job = asyncio.create_task(self._process(task, download))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        log.info("task %s started attempt %d: %s", task.id, task.attempts, safe_url(task.url))

    # -- one task -----------------------------------------------------------

    async def _process(self, task: Task, download: Transfer) -> None:
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
                # The slot is free once the bytes are in: the end's writes
                # (batched with other ends) need no connection, and a next
                # task starts meanwhile. Nor is the task renewed any more: a
                # renewal would only find it ended.
                self._free_slot(task)
            await self.outcomes.done(task, download, fetched)
        except LeaseLost:
            log.warning("task %s: lease lost, left to the worker that holds it", task.id)
        except TaskCancelled:
            # The cancel wrote the task's end; its status is no longer
            # running, so no write of ours could land anyway.
            log.info("task %s cancelled while running; download stopped", task.id)
        except ShuttingDown:
            await self.outcomes.shutting_down(task, download)
        except FetchError as exc:
            await self.outcomes.failed_try(task, download, exc)
        except Exception:  # noqa: BLE001 - one task must never take the worker down
            log.exception("task %s: unexpected error", task.id)
            await self.outcomes.internal_error(task)
        finally:
            self._free_slot(task)

    def _free_slot(self, task: Task) -> None:
        if self.active.pop(task.id, None) is not None:
            self._claimed.pop(task.id, None)
            self.wake.set()

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
                if loop_time() - self._claimed.get(task.id, 0.0) < interval / 2:
                    # Its lease is fresh from the claim: small tasks end
                    # within half a second, and their renewal would only
                    # find them finished. A download of a few seconds
                    # still shows progress from its first second on.
                    continue
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
                elif self.config.coalesce and task.manifest is None:
                    # Running a second: other API processes' submits of
                    # the file may follow it (storage.coalescing).
                    try:
                        with pymongo.timeout(interval * 2):
                            await self.store.coalescer.register(task)
                    except PyMongoError:
                        pass
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
