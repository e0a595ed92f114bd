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
from service.model.task import Notifiable
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
    def __init__(self, config: Config, outboxes: list[MailOutbox], mailer: Mailer,
                 worker: str):
        self.config = config
        self.outboxes = outboxes
        self.mailer = mailer
        self.worker = worker
        self.retry = Backoff(first=config.mail_retry_base, cap=float("inf"))
        self.wake = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self.wake.clear()
            try:
                for outbox in self.outboxes:
                    while not stopping.is_set():
                        item = await outbox.claim(self.worker, _lease(self.config))
                        if item is None:
                            break
                        await self.send(outbox, item)
            except PyMongoError:
                await asyncio.sleep(1.0)
                continue
            try:
                await asyncio.wait_for(self.wake.wait(), self.config.poll_interval * 5)
            except TimeoutError:
                pass

    async def send(self, outbox: MailOutbox, task: Notifiable) -> None:
        attempts = task.notification.attempts
        try:
            await self.mailer.send(task)
        except MailError as exc:
            if exc.permanent or attempts >= self.config.mail_max_attempts:
                metrics.MAILS.labels("failed").inc()
                log.warning("%s: mail to %s failed for good: %s", _name(task),
                            redact_email(task.email), exc)
                await outbox.failed(task.id, str(exc), None)
            else:
                metrics.MAILS.labels("retry").inc()
                delay = self.retry.delay(attempts)
                log.info("%s: mail attempt %d failed (%s); retrying in %.0f s",
                         _name(task), attempts, exc, delay)
                await outbox.failed(task.id, str(exc), delay)
            return
        metrics.MAILS.labels("sent").inc()
        await outbox.sent(task.id)
        log.info("%s: mail sent to %s", _name(task), redact_email(task.email))


def _name(item: Notifiable) -> str:
    return f"{type(item).__name__.lower()} {item.id}"
