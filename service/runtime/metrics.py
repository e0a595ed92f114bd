"""Prometheus metrics, collected across the API and every worker process.

Workers count what only they see (bytes hashed, download and queue-wait
times, outcomes, mail). prometheus-client's multiprocess mode has each
process write its samples to files in PROMETHEUS_MULTIPROC_DIR, which
``run.py`` (role ``all``) creates and hands down to its workers, and
``/metrics`` in the API merges them. Task counts by status and the queue
depth come from the database, so they are right whichever processes or
hosts did the work; they are read at most once per METRICS_DB_INTERVAL
per API process, however many scrapers ask (see ``DatabaseGauges``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from service.runtime.metrics_dir import ENV

TASKS_FINISHED = Counter("md5light_tasks_finished_total",
                         "Tasks that ended, by outcome", ["outcome"])
TASK_RETRIES = Counter("md5light_task_retries_total",
                       "Download attempts that failed and were retried", ["reason"])
BYTES_HASHED = Counter("md5light_bytes_hashed_total", "Bytes downloaded and hashed")
DOWNLOAD_SECONDS = Histogram("md5light_download_seconds", "Duration of one download attempt",
                             buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800))
QUEUE_WAIT_SECONDS = Histogram("md5light_queue_wait_seconds",
                               "Time from submit to the first claim",
                               buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 300))
MAILS = Counter("md5light_mails_total", "Notification attempts, by outcome", ["outcome"])
SUBMISSIONS = Counter("md5light_submissions_total", "Tasks accepted by the API")
WATCH_ROUNDS = Counter("md5light_event_watch_rounds_total",
                       "Rounds of the event streams' database watcher, by kind", ["kind"])
WEBHOOKS = Counter("md5light_webhooks_total", "Webhook attempts, by outcome", ["outcome"])
DATABASE_RESTARTS = Counter("md5light_database_restarts_total",
                            "Times the embedded database died and was started again")


log = logging.getLogger("md5light.metrics")

RUNNING = "running"

# A scrape must not wait long on a database that is down or busy.
DB_GAUGES_TIMEOUT = 2.0


class DatabaseGauges:
    """The database's counts for /metrics, read at most once per
    ``interval`` seconds: concurrent scrapes share one read in flight, and
    later ones get its result until it is ``interval`` old. ``store`` is a
    Store; its recount, when due, runs in the background."""

    def __init__(self, store: Any, interval: float):
        self.store = store
        self.interval = interval
        self._value: dict[str, int] | None = None
        self._read_at = float("-inf")
        self._inflight: asyncio.Future | None = None
        self._recount: asyncio.Task | None = None

    async def get(self) -> dict[str, int] | None:
        """The counts, or None when the database did not answer."""
        if self._value is not None and time.monotonic() - self._read_at < self.interval:
            return self._value
        if self._inflight is None:
            # A fresh context: the read serves many scrapes, not the first.
            self._inflight = asyncio.get_running_loop().create_task(
                self._read(), context=contextvars.Context())
        return await asyncio.shield(self._inflight)

    async def _read(self) -> dict[str, int] | None:
        import pymongo
        try:
            with pymongo.timeout(DB_GAUGES_TIMEOUT):
                counts, recount_due = await self.store.counters.read()
        except Exception as exc:  # noqa: BLE001 - the process metrics still get served
            log.warning("database counts for /metrics failed: %s", type(exc).__name__)
            return None
        finally:
            self._inflight = None
        self._value, self._read_at = counts, time.monotonic()
        if recount_due and self._recount is None:
            self._recount = asyncio.get_running_loop().create_task(
                self._run_recount(), context=contextvars.Context())
        return counts

    async def _run_recount(self) -> None:
        import pymongo
        try:
            with pymongo.timeout(120.0):
                if await self.store.counters.reconcile():
                    self._read_at = float("-inf")  # the next scrape shows the recount
        except Exception as exc:  # noqa: BLE001 - retried when next due
            log.warning("recounting tasks for /metrics failed: %s", type(exc).__name__)
        finally:
            self._recount = None


def render(status_counts: dict[str, int] | None) -> tuple[bytes, str]:
    """The exposition text: every process's samples plus the database's view."""
    registry = CollectorRegistry()
    if os.environ.get(ENV):
        from prometheus_client import multiprocess
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY
        registry = REGISTRY
    text = generate_latest(registry)
    if status_counts is not None:
        families = []
        if RUNNING in status_counts:
            family = GaugeMetricFamily("md5light_tasks", "Unfinished tasks, by status",
                                       labels=["status"])
            for status in ("queued", RUNNING):
                if status in status_counts:
                    family.add_metric([status], status_counts[status])
            families.append(family)
        if "queued" in status_counts:
            depth = GaugeMetricFamily("md5light_queue_depth", "Tasks waiting to run")
            depth.add_metric([], status_counts["queued"])
            families.append(depth)
        if "total" in status_counts:
            total = GaugeMetricFamily("md5light_tasks_stored", "Tasks in the database, all states")
            total.add_metric([], status_counts["total"])
            families.append(total)
        extra = CollectorRegistry()
        extra.register(_Static(families))
        text += generate_latest(extra)
    return text, CONTENT_TYPE_LATEST


class _Static:
    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families
