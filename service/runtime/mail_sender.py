"""The worker's mail loop: send the notifications that are due.

Delivery is at least once: the outbox's claim is a lease, so a worker that
dies mid-send leaves the mail due for another. A 5xx answer (unknown
mailbox, bad password) is final; anything else is retried with back-off up
to MAIL_MAX_ATTEMPTS.
"""

from __future__ import annotations

import asyncio
import logging

from pymongo.errors import PyMongoError

from service.backoff import Backoff
from service.config import Config
from service.model.task import Task
from service.notify.mailer import Mailer, MailError
from service.redact import redact_email
from service.runtime import metrics
from service.storage.outbox import MailOutbox

log = logging.getLogger("md5light.worker")

# How long a claimed mail is this sender's: every SMTP step may take
# SMTP_TIMEOUT, and a margin.
def _lease(config: Config) -> float:
    return config.smtp_timeout * 4 + 30


class MailSender:
    def __init__(self, config: Config, outbox: MailOutbox, mailer: Mailer, worker: str):
        self.config = config
        self.outbox = outbox
        self.mailer = mailer
        self.worker = worker
        self.retry = Backoff(first=config.mail_retry_base, cap=float("inf"))
        self.wake = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self.wake.clear()
            try:
                while not stopping.is_set():
                    task = await self.outbox.claim(self.worker, _lease(self.config))
                    if task is None:
                        break
                    await self.send(task)
            except PyMongoError:
                await asyncio.sleep(1.0)
                continue
            try:
                await asyncio.wait_for(self.wake.wait(), self.config.poll_interval * 5)
            except TimeoutError:
                pass

    async def send(self, task: Task) -> None:
        attempts = task.notification.attempts
        try:
            await self.mailer.send(task)
        except MailError as exc:
            if exc.permanent or attempts >= self.config.mail_max_attempts:
                metrics.MAILS.labels("failed").inc()
                log.warning("task %s: mail to %s failed for good: %s", task.id,
                            redact_email(task.email), exc)
                await self.outbox.failed(task.id, str(exc), None)
            else:
                metrics.MAILS.labels("retry").inc()
                delay = self.retry.delay(attempts)
                log.info("task %s: mail attempt %d failed (%s); retrying in %.0f s",
                         task.id, attempts, exc, delay)
                await self.outbox.failed(task.id, str(exc), delay)
            return
        metrics.MAILS.labels("sent").inc()
        await self.outbox.sent(task.id)
        log.info("task %s: mail sent to %s", task.id, redact_email(task.email))
