"""The Celery app: Redis as broker and result backend, one task that
streams a URL with requests into hashlib.md5.

Written as a competent team would write it, with Celery's defaults
(prefetch, acks, serializer) left alone: the point is what the usual
stack costs, not what a tuned one could do.
"""

from __future__ import annotations

import hashlib
import os

import requests
from celery import Celery

REDIS_URL = os.environ.get("YARDSTICK_REDIS_URL", "redis://127.0.0.1:6379/0")
CHUNK = 1024 * 1024

celery = Celery("yardstick", broker=REDIS_URL, backend=REDIS_URL)
celery.conf.update(
    # One line in a worker's log per task would be the loudest thing in a burst.
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@celery.task(name="yardstick.md5_of_url")
def md5_of_url(url: str) -> str:
    digest = hashlib.md5()
    with requests.get(url, stream=True, timeout=(10, 60)) as response:
        response.raise_for_status()
        for chunk in response.iter_content(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
