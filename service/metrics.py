"""Prometheus metrics, collected across the API and every worker process.

Workers count what only they see (bytes hashed, download and queue-wait
times, outcomes, mail). prometheus-client's multiprocess mode has each
process write its samples to files in PROMETHEUS_MULTIPROC_DIR, which
``run.py`` (role ``all``) creates and hands down to its workers, and
``/metrics`` in the API merges them. Task counts by status and the queue
depth come from the database at scrape time, so they are right whichever
processes or hosts did the work.
"""

from __future__ import annotations

import os

from .metrics_dir import ENV

from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest)
from prometheus_client.core import GaugeMetricFamily

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
        family = GaugeMetricFamily("md5light_tasks", "Unfinished tasks, by status",
                                   labels=["status"])
        for status in ("queued", "running"):
            family.add_metric([status], status_counts.get(status, 0))
        depth = GaugeMetricFamily("md5light_queue_depth", "Tasks waiting to run")
        depth.add_metric([], status_counts.get("queued", 0))
        total = GaugeMetricFamily("md5light_tasks_stored", "Tasks in the database, all states")
        total.add_metric([], status_counts.get("total", 0))
        extra = CollectorRegistry()
        extra.register(_Static([family, depth, total]))
        text += generate_latest(extra)
    return text, CONTENT_TYPE_LATEST


class _Static:
    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families
