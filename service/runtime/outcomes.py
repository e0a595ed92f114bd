"""What a worker writes when a download ends: done (or a mismatch), a
retry later, failed for good, or back to the queue at shutdown; then what
follows from it (coalesced followers, the manifest, the file's record for
max_age, due mails and webhooks). Every write waits out a database blip."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

from pymongo.errors import PyMongoError

from service.backoff import Backoff
from service.config import Config
from service.fetch.download import Fetched, FetchError
from service.fetch.loader import Transfer
from service.model.digests import mismatch
from service.model.same_file import KnownFile
from service.model.task import Status, Task, TaskError, utcnow
from service.model.views import check_view
from service.runtime import metrics
from service.runtime.mail_sender import MailSender
from service.runtime.webhook_sender import WebhookSender
from service.storage.store import Store

log = logging.getLogger("md5light.worker")

loop_time = time.monotonic
# Waits after failures in a row: of a download (unless the server said how
# long, with Retry-After), and of a result write during an outage.
DOWNLOAD_RETRY_CAP = 300.0
WRITE_BACKOFF = Backoff(first=0.2, cap=5.0)

# Told of each end recorded: the task's id and its /check answer.
Announce = Callable[[str, int, dict[str, Any]], None]
T = TypeVar("T")


class Outcomes:
    def __init__(self, config: Config, store: Store, worker: str,
                 mail: MailSender | None, hooks: WebhookSender | None,
                 announce: Announce | None = None):
        self.config = config
        self.announce = announce
        self.store = store
        self.name = worker
        self.mail = mail
        self.hooks = hooks
        self.download_retry = Backoff(first=config.retry_base, cap=DOWNLOAD_RETRY_CAP)

    async def done(self, task: Task, download: Transfer, fetched: Fetched) -> None:
        # A file that is not the expected one will not change on a retry.
        wrong = mismatch(task.expected, fetched.digests) if task.expected else None
        error = TaskError("mismatch", wrong) if wrong else None
        # The file's record first: whoever sees the task done and then asks
        # with max_age must find this download (its end is written in a
        # batch, after the record's own batch).
        await self._remember(task, download, fetched)
        followers = await self._end(task, partial(
            self.store.queue.finish, task, self.name, digests=fetched.digests,
            error=error, verified=None if task.expected is None else not wrong,
            server_digest=fetched.server, bytes_done=download.bytes_done,
            bytes_total=download.bytes_total, attempt=download.progress(),
            revalidated_from=task.revalidate.task
            if fetched.not_modified and task.revalidate else None))
        if followers is None:
            return
        self._announce(task, Status.FAILED if wrong else Status.DONE, error,
                       digests=fetched.digests, md5=None if wrong else fetched.digests["md5"],
                       verified=None if task.expected is None else not wrong)
        # Counted once recorded: a task cancelled meanwhile is not done.
        metrics.TASKS_FINISHED.labels("failed" if wrong else "done").inc()
        log.info("task %s %s: md5 %s, %d bytes", task.id, "mismatch" if wrong else "done",
                 fetched.digests["md5"], download.bytes_done)
        await self._after_finish(task, "mismatch" if wrong else "ok", download, followers)

    async def _remember(self, task: Task, download: Transfer, fetched: Fetched) -> None:
        """Record the file's digests for later submits with max_age."""
        if task.manifest is not None:
            return
        size = (task.revalidate.bytes if fetched.not_modified and task.revalidate
                else download.bytes_total or download.bytes_done)
        try:
            await self.store.known_files.remember(task, KnownFile(
                task.id, utcnow(), fetched.digests, fetched.etag, fetched.last_modified, size))
        except Exception as exc:  # noqa: BLE001 - best effort, before the end that matters
            log.warning("task %s: the file's record for max_age was not stored (%s)", task.id,
                        type(exc).__name__)

    async def failed_try(self, task: Task, download: Transfer, exc: FetchError) -> None:
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
        followers = await self._end(task, partial(
            self.store.queue.finish, task, self.name, error=exc.as_task_error(),
            server_digest=exc.server, bytes_done=download.bytes_done,
            bytes_total=download.bytes_total, attempt=download.progress()))
        if followers is None:
            return
        self._announce(task, Status.FAILED, exc.as_task_error())
        metrics.TASKS_FINISHED.labels("failed").inc()
        log.info("task %s failed: %s", task.id, exc.message)
        await self._after_finish(task, "failed", download, followers)

    async def _end(self, task: Task, finish: Callable[[], Awaitable[list[str] | None]]
                   ) -> list[str] | None:
        """Write the task's end: the followers to end after it
        (storage.coalescing), or None when the end was refused (no longer
        this worker's task: a cancel hands its followers on, a worker that
        took it over ends them)."""
        followers = await self._persist(finish)
        if task.manifest is None:
            try:
                await self.store.coalescer.unregister(task)
            except PyMongoError:
                pass  # the sweep removes the entry of an ended download
        return followers

    async def _settle(self, task: Task, followers: list[str]) -> int:
        try:
            return await self.store.coalescer.settle_followers(task, followers)
        except PyMongoError:
            return 0  # the periodic sweep will end them

    async def _after_finish(self, task: Task, ended_as: str, download: Transfer,
                            following: list[str]) -> None:
        manifest, followers = None, 0
        if task.manifest is None:
            followers = await self._settle(task, following)
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

    async def _persist(self, operation: Callable[[], Awaitable[T]]) -> T | None:
        """Write an outcome, waiting out a database outage: the work is done
        and must not be lost to a blip. Gives up (None) when the lease would
        have expired anyway (another worker will redo the task)."""
        deadline = loop_time() + max(self.config.lease_seconds, 5)
        failures = 0
        while True:
            try:
                return await operation()
            except PyMongoError as exc:
                if loop_time() > deadline:
                    log.error("giving up a database write: %s", exc)
                    return None
                failures += 1
                await asyncio.sleep(WRITE_BACKOFF.delay(failures))

    async def shutting_down(self, task: Task, download: Transfer) -> None:
        # Checkpointed as it stops, so that a deploy costs no bytes.
        await self._persist(partial(self.store.queue.retry_later, task, self.name, 0,
                                    TaskError("shutdown", "worker shutting down"),
                                    count_attempt=False, **_resume_fields(download)))
        log.info("task %s returned to the queue (worker shutting down)", task.id)

    async def internal_error(self, task: Task) -> None:
        error = TaskError("internal", "internal error while processing the task")
        followers = await self._end(task, partial(self.store.queue.finish, task, self.name,
                                                  error=error))
        if followers is not None:
            self._announce(task, Status.FAILED, error)
            await self._settle(task, followers)

    def _announce(self, task: Task, status: Status, error: TaskError | None,
                  **result: Any) -> None:
        """Tell the API process the /check answer of an end just recorded."""
        if self.announce is not None:
            self.announce(task.id, *check_view(
                dataclasses.replace(task, status=status, error=error, **result)))


def _resume_fields(download: Transfer) -> dict:
    """Where the retry of a download resumes, and how this attempt went."""
    latest = download.checkpoint()
    return {"checkpoint": latest.to_doc() if latest else None,
            "attempt": download.progress()}
