"""Webhooks: a finished task's JSON, posted to its ``callback_url`` and
signed as Standard Webhooks 1.0 describes.

The signature is ``v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>``
under the key WEBHOOK_SECRET encodes; ``webhook-id`` is the task's id, the
same on every try, so a receiver can drop a copy it already has. The
callback's address goes through the same policy as a download's (the
client's resolver filters it), so a callback cannot reach what a task may
not fetch.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import urllib.parse
from dataclasses import dataclass

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.simple_httpclient import HTTPTimeoutError

from service.config import Config, webhook_key
from service.fetch.errors import classify
from service.model.task import Task
from service.model.views import task_view

USER_AGENT = "md5-light-webhooks/1.0"
# The receiver's answer is read and dropped: only its status matters.


@dataclass
class WebhookError(Exception):
    message: str
    permanent: bool

    def __str__(self) -> str:
        return self.message


def payload(task: Task) -> bytes:
    """What /tasks/<id> shows, minus the callback's own bookkeeping (which
    changes on every try, while the message must not)."""
    view = task_view(task)
    view.pop("callback", None)
    # The API's own spelling: compact, keys sorted.
    return json.dumps(view, separators=(",", ":"), sort_keys=True).encode("utf-8")


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


class WebhookPoster:
    def __init__(self, config: Config, client: AsyncHTTPClient):
        assert config.webhook_secret is not None
        key = webhook_key(config.webhook_secret)
        assert key is not None  # checked when the configuration was loaded
        self.key = key
        self.config = config
        self.client = client

    async def post(self, task: Task) -> None:
        """Deliver once; raises WebhookError unless the receiver said 2xx."""
        assert task.callback is not None
        url = task.callback.url
        host = urllib.parse.urlsplit(url).hostname or url
        body = payload(task)
        timestamp = int(time.time())
        request = HTTPRequest(
            url, method="POST", body=body, follow_redirects=False,
            connect_timeout=self.config.connect_timeout,
            request_timeout=self.config.webhook_timeout, decompress_response=False,
            streaming_callback=lambda chunk: None,
            headers={"Content-Type": "application/json", "User-Agent": USER_AGENT,
                     "webhook-id": task.id, "webhook-timestamp": str(timestamp),
                     "webhook-signature": sign(self.key, task.id, timestamp, body)})
        try:
            response = await self.client.fetch(request, raise_error=False)
        except Exception as exc:  # noqa: BLE001 - resolve and connect errors come raised
            raise _failure(exc, host, self.config) from None
        if response.code == 599:  # a timeout, which Tornado returns as an answer
            raise _failure(response.error, host, self.config)
        if 200 <= response.code < 300:
            return
        # 410 is the receiver saying this endpoint is gone for good.
        raise WebhookError(f"the receiver at {host} answered {response.code}"
                           + (" (not followed: webhooks do not follow redirects)"
                              if 300 <= response.code < 400 else ""),
                           permanent=response.code == 410)


def _failure(exc: BaseException | None, host: str, config: Config) -> WebhookError:
    if isinstance(exc, HTTPTimeoutError) and "connecting" not in str(exc):
        return WebhookError(f"the receiver at {host} did not answer within "
                            f"{config.webhook_timeout:g} s (WEBHOOK_TIMEOUT)", permanent=False)
    # A download's reasons (refused, unresolvable, blocked by the address
    # policy...), and whether trying again may help.
    error = classify(exc, host, connect_timeout=config.connect_timeout)
    message = error.message.replace("does not fetch from", "does not send webhooks to")
    return WebhookError(f"callback not delivered: {message}", permanent=not error.transient)
