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

from tornado import httputil
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.simple_httpclient import HTTPTimeoutError

from service.config import Config, webhook_key
from service.fetch.errors import classify
from service.model.task import Task
from service.model.views import task_view

USER_AGENT = "md5-light-webhooks/1.0"
# Only the receiver's status matters: a 2xx is delivery as soon as its
# headers arrive. Its body is read up to this much and then cut off (a
# large or endless body once made a delivered post look like a failure).
ANSWER_CAP = 64 * 1024


class _Enough(Exception):
    """The receiver's body is past ANSWER_CAP: stop reading it."""


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
        answered: list[int] = []  # the status line's code, once it came
        received = 0

        def on_header(line: str) -> None:
            if line.startswith("HTTP/"):
                answered[:] = [httputil.parse_response_start_line(line.strip()).code]

        def on_chunk(chunk: bytes) -> None:
            nonlocal received
            received += len(chunk)
            if received > ANSWER_CAP:
                raise _Enough()  # Tornado ends the fetch (599) and closes it

        request = HTTPRequest(
            url, method="POST", body=body, follow_redirects=False,
            connect_timeout=self.config.connect_timeout,
            request_timeout=self.config.webhook_timeout, decompress_response=False,
            header_callback=on_header, streaming_callback=on_chunk,
            headers={"Content-Type": "application/json", "User-Agent": USER_AGENT,
                     "webhook-id": task.id, "webhook-timestamp": str(timestamp),
                     "webhook-signature": sign(self.key, task.id, timestamp, body)})
        try:
            response = await self.client.fetch(request, raise_error=False)
        except Exception as exc:  # noqa: BLE001 - resolve and connect errors come raised
            if answered and 200 <= answered[0] < 300:
                return
            raise _failure(exc, host, self.config) from None
        if response.code == 599 and answered and 200 <= answered[0] < 300:
            return  # a 2xx whose body was cut off, or never ended: delivered
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
