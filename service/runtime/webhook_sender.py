"""The worker's webhook loop: post the callbacks that are due.

Like the mail loop (``mail_sender.py``): the outbox's claim is a lease, so
delivery is at least once; a refusal by the address policy or a 410 is
final, anything else is retried with back-off up to WEBHOOK_MAX_ATTEMPTS.
Up to ``IN_FLIGHT`` posts run at once, so one receiver that never answers
holds up only its own.
"""

from __future__ import annotations

import asyncio
import logging

from pymongo.errors import PyMongoError
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from service.backoff import Backoff
from service.config import Config
from service.fetch.netpolicy import AddressPolicy, FilteringResolver, parse_overrides
from service.model.task import Task
from service.notify.webhook import WebhookError, WebhookPoster
from service.runtime import metrics
from service.storage.callbacks import CallbackOutbox

log = logging.getLogger("md5light.worker")

IN_FLIGHT = 8


class WebhookSender:
    def __init__(self, config: Config, outbox: CallbackOutbox, worker: str):
        self.config = config
        self.outbox = outbox
        self.worker = worker
        resolver = FilteringResolver(
            policy=AddressPolicy(config.allow_private_urls, config.allow_networks),
            overrides=parse_overrides(config.resolve))
        self.client = SimpleAsyncHTTPClient(force_instance=True, resolver=resolver,
                                            max_clients=IN_FLIGHT)
        self.poster = WebhookPoster(config, self.client)
        self.retry = Backoff(first=config.webhook_retry_base, cap=float("inf"))
        self.wake = asyncio.Event()
        self._slots = asyncio.Semaphore(IN_FLIGHT)
        self._posts: set[asyncio.Task] = set()

    @property
    def lease(self) -> float:
        """How long a claimed post is this sender's: connect, answer, margin."""
        return self.config.connect_timeout + self.config.webhook_timeout + 30

    async def run(self, stopping: asyncio.Event) -> None:
        try:
            while not stopping.is_set():
                self.wake.clear()
                try:
                    await self._claim_due(stopping)
                except PyMongoError:
                    await asyncio.sleep(1.0)
                    continue
                try:
                    await asyncio.wait_for(self.wake.wait(), self.config.poll_interval)
                except TimeoutError:
                    pass
        finally:
            self.client.close()

    async def _claim_due(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self._slots.acquire()
            try:
                task = await self.outbox.claim(self.worker, self.lease)
            except BaseException:
                self._slots.release()
                raise
            if task is None:
                self._slots.release()
                return
            post = asyncio.create_task(self._send(task))
            self._posts.add(post)
            post.add_done_callback(self._posts.discard)

    async def _send(self, task: Task) -> None:
        try:
            await self.send(task)
        except PyMongoError:
            pass  # the claim's lease runs out and the post comes due again
        finally:
            self._slots.release()

    async def send(self, task: Task) -> None:
        assert task.callback is not None
        attempts = task.callback.attempts
        try:
            await self.poster.post(task)
        except WebhookError as exc:
            if exc.permanent or attempts >= self.config.webhook_max_attempts:
                metrics.WEBHOOKS.labels("failed").inc()
                log.warning("task %s: webhook failed for good after %d attempts: %s",
                            task.id, attempts, exc)
                await self.outbox.failed(task.id, str(exc), None)
            else:
                metrics.WEBHOOKS.labels("retry").inc()
                delay = self.retry.delay(attempts)
                log.info("task %s: webhook attempt %d failed (%s); retrying in %.1f s",
                         task.id, attempts, exc, delay)
                await self.outbox.failed(task.id, str(exc), delay)
            return
        metrics.WEBHOOKS.labels("delivered").inc()
        await self.outbox.delivered(task.id)
        log.info("task %s: webhook delivered", task.id)
