"""Everything md5-light keeps in MongoDB, in one object with one part per
job: task records (and idempotency keys), the queue, manifests, the mail
outboxes, worker liveness and the counters /metrics reads. Every role builds it the
same way, with ``open_store``."""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient

from service.config import Config
from service.model.manifest import Manifest
from service.model.task import Task
from service.storage.callbacks import CallbackOutbox
from service.storage.cancellation import Cancellations
from service.storage.coalescing import Coalescer
from service.storage.counters import TaskCounters
from service.storage.database import Collections, connect
from service.storage.dbclock import DatabaseClock
from service.storage.history import TaskHistory
from service.storage.keys import KeyRecords
from service.storage.known_files import KnownFiles
from service.storage.live_reads import LiveReads
from service.storage.liveness import WorkerLiveness
from service.storage.manifests import ManifestRecords
from service.storage.outbox import MailOutbox
from service.storage.queue import TaskQueue
from service.storage.records import TaskRecords


class Store:
    def __init__(self, client: AsyncMongoClient, config: Config):
        self.client = client
        self.cols = Collections.of(client)
        self.config = config
        self.counters = TaskCounters(self.cols)
        self.clock = DatabaseClock(self.cols.db)
        self.records = TaskRecords(self.cols, self.counters, config.idempotency_ttl)
        self.queue = TaskQueue(self.cols, self.counters, config.max_attempts,
                               config.lease_seconds, self.clock)
        self.manifests = ManifestRecords(self.cols, self.counters)
        self.outbox = MailOutbox(self.cols.tasks, Task.from_doc)
        self.manifest_outbox = MailOutbox(self.cols.manifests, Manifest.from_doc)
        self.callbacks = CallbackOutbox(self.cols.tasks)
        self.live = LiveReads(self.cols)
        self.history = TaskHistory(self.cols.tasks)
        self.coalescer = Coalescer(self.cols, self.counters)
        self.known_files = KnownFiles(self.cols)
        self.cancellations = Cancellations(self.cols, self.counters, self.coalescer)
        self.liveness = WorkerLiveness(self.cols.workers)
        self.keys = KeyRecords(self.cols.db["api_keys"])

    async def ensure_indexes(self) -> None:
        await self.cols.ensure_indexes(self.config.idempotency_ttl, self.config.task_ttl_days)

    async def ping(self) -> None:
        await self.cols.ping()

    async def close(self) -> None:
        await self.client.close()


def open_store(config: Config, uri: str, **client_options: Any) -> Store:
    """The one way every role builds its store from the configuration."""
    return Store(connect(uri, **client_options), config)
