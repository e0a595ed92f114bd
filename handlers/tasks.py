"""The public API: submit a URL, check a task, read a task in full."""

from __future__ import annotations

from typing import Any


from tornado import web

from service.runtime.metrics import SUBMISSIONS
from service.intake.admission import (RETRY_AFTER_CLIENT, RETRY_AFTER_FULL, QueueFull, QuotaExceeded,
                           Verdict, client_address)
from service.storage.store import DONE, FAILED, IdempotencyConflict
from service.intake.validation import InvalidInput, check_email, check_idempotency_key, check_url

from .base import JsonHandler

NOT_FOUND = {"status": "not_found"}


class SubmitHandler(JsonHandler):
    async def post(self) -> None:
        args = self.arguments()
        policy = self.services["policy"]
        try:
            url = check_url(self.one(args, "url"), policy)
            email = check_email(self.one(args, "email"))
            key = check_idempotency_key(self.request.headers.get("Idempotency-Key"))
        except InvalidInput as exc:
            return self.send(400, {"error": str(exc)})
        store, admission = self.services["store"], self.services["admission"]
        client = client_address(self.request, self.services["client_ip_header"])
        verdict: Verdict | None = None

        async def admit() -> int:
            nonlocal verdict
            verdict = await admission.admit(client)
            return verdict.lane

        try:
            task_id = await self.db(lambda: store.create(
                url, email, notify=self.services["mail_enabled"], idempotency_key=key,
                client=client, admit=admit))
        except IdempotencyConflict:
            return self.send(422, {"error": "Idempotency-Key was already used "
                                            "for a different url or email"})
        except QuotaExceeded as exc:
            self.rate_limit_headers(exc.verdict, reset=RETRY_AFTER_CLIENT)
            self.set_header("Retry-After", str(RETRY_AFTER_CLIENT))
            return self.send(429, {"error": (
                f"too many unfinished tasks from your address: {exc.verdict.pending} are "
                f"queued or running and the limit is {exc.verdict.limit}; submit more "
                f"when some have finished")})
        except QueueFull as exc:
            self.set_header("Retry-After", str(RETRY_AFTER_FULL))
            return self.send(503, {"error": (
                f"the service is at capacity with {exc.queued} tasks waiting (limit "
                f"{exc.limit}); try again in a minute")})
        except web.HTTPError:
            if verdict is not None:
                admission.release(client)
            raise
        SUBMISSIONS.inc()
        self.services["wake"]()
        # This task now holds a place; an idempotent retry takes none.
        standing = (Verdict(verdict.limit, verdict.pending + 1, verdict.lane)
                    if verdict is not None else admission.peek(client))
        self.rate_limit_headers(standing)
        self.set_header("Location", f"/check?id={task_id}")
        self.send(202, {"id": task_id})

    def rate_limit_headers(self, verdict: Verdict, reset: int | None = None) -> None:
        """draft-ietf-httpapi-ratelimit-headers-11: the quota is of
        unfinished tasks at once, hence the unit concurrent-requests and no
        window. Nothing is sent when there is no per-client limit."""
        if not verdict.limit:
            return
        self.set_header("RateLimit-Policy",
                        f'"pending";q={verdict.limit};qu="concurrent-requests"')
        self.set_header("RateLimit", f'"pending";r={verdict.remaining}'
                        + (f";t={reset}" if reset is not None else ""))


class CheckHandler(JsonHandler):
    async def get(self) -> None:
        args = self.arguments()
        task_id = self.one(args, "id")
        if not task_id:
            return self.send(400, {"error": "id is required"})
        task = await self._find(task_id)
        if task is None:
            return self.send(404, NOT_FOUND)
        if task["status"] == DONE:
            return self.send(200, {"md5": task["md5"], "status": "done", "url": task["url"]})
        if task["status"] == FAILED:
            return self.send(502, {"status": "failed", "url": task["url"],
                                   "error": (task.get("error") or {}).get("message")})
        self.set_header("Retry-After", "1")
        self.send(202, {"status": "running"})

    async def _find(self, task_id: str) -> dict | None:
        if len(task_id) > 100:
            return None
        store = self.services["store"]
        return await self.db(lambda: store.get(task_id))


class TaskHandler(CheckHandler):
    async def get(self, task_id: str) -> None:  # type: ignore[override]
        task = await self._find(task_id)
        if task is None:
            return self.send(404, NOT_FOUND)
        self.send(200, public_view(task))


def public_view(task: dict) -> dict[str, Any]:
    """The whole task minus what is private (the email address) or internal."""
    note = task.get("notification") or {}
    return {
        "id": task["_id"], "status": task["status"], "url": task["url"],
        "md5": task.get("md5"), "error": (task.get("error") or {}).get("message")
        if task["status"] == FAILED else None,
        "error_code": (task.get("error") or {}).get("code") if task["status"] == FAILED
        else None,
        "bytes_done": task.get("bytes_done", 0), "bytes_total": task.get("bytes_total"),
        "attempts": task.get("attempts", 0),
        "created_at": _iso(task.get("created_at")), "started_at": _iso(task.get("started_at")),
        "finished_at": _iso(task.get("finished_at")),
        "notification": {"status": note.get("status", "none"),
                         "attempts": note.get("attempts", 0), "error": note.get("error"),
                         "sent_at": _iso(note.get("sent_at"))},
    }


def _iso(value) -> str | None:
    if value is None:
        return None
    return value.isoformat().replace("+00:00", "Z")
