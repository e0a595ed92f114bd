"""The public API: submit a URL, check a task, read a task in full, cancel it."""

from __future__ import annotations

import logging

from tornado import web

from service.intake.admission import (
    RETRY_AFTER_CLIENT,
    RETRY_AFTER_FULL,
    QueueFull,
    QuotaExceeded,
    Verdict,
)
from service.intake.callers import Caller
from service.intake.metalink import MEDIA_TYPE as METALINK
from service.intake.submissions import Submissions
from service.intake.validation import InvalidInput
from service.live.answers import CheckAnswers
from service.model.ids import could_be_ours
from service.model.task import Task
from service.model.views import NOT_FOUND, check_view, task_view
from service.runtime.metrics import SUBMISSIONS, TASKS_FINISHED
from service.storage.cancellation import Cancellations, Outcome
from service.storage.idempotency import IdempotencyConflict
from service.storage.records import TaskRecords

from .base import SUBMIT_PATIENCE, JsonHandler

log = logging.getLogger("md5light.api")

class SubmitHandler(JsonHandler):
    def initialize(self, submissions: Submissions) -> None:
        self.submissions = submissions

    async def post(self) -> None:
        args = self.arguments()
        caller = await self.caller()
        try:
            accepted = await self.db(self.submissions.submit(
                self.one(args, "url"), self.one(args, "email"),
                self.request.headers.get("Idempotency-Key"), caller.client,
                algorithms=args.get("algorithms", []), expected=self.one(args, "expected"),
                callback_url=self.one(args, "callback_url"),
                max_age=self.one(args, "max_age"), owner=caller.key_id,
                connections=self.one(args, "connections"),
                mirrors=args.get("mirrors", []), metalink=self._metalink(args)),
                patience=SUBMIT_PATIENCE)
        except InvalidInput as exc:
            return self.send(400, {"error": str(exc)})
        except IdempotencyConflict:
            return self.send(422, {"error": "Idempotency-Key was already used for a "
                                            "different url, email, algorithms, expected, "
                                            "callback_url or max_age"})
        except QuotaExceeded as exc:
            self.rate_limit_headers(exc.verdict, reset=RETRY_AFTER_CLIENT)
            self.set_header("Retry-After", str(RETRY_AFTER_CLIENT))
            return self.send(429, {"error": (
                f"too many unfinished tasks from {_whose(caller)}: {exc.verdict.pending} are "
                f"queued or running and the limit is {exc.verdict.limit}; submit more "
                f"when some have finished")})
        except QueueFull as exc:
            self.set_header("Retry-After", str(RETRY_AFTER_FULL))
            return self.send(503, {"error": (
                f"the service is at capacity with {exc.queued} tasks waiting (limit "
                f"{exc.limit}); try again in a minute")})
        SUBMISSIONS.inc()
        self.rate_limit_headers(accepted.standing)
        self.set_header("Location", f"/check?id={accepted.task_id}")
        self.send(202, {"id": accepted.task_id})

    def _metalink(self, args: dict[str, list[str]]) -> str | None:
        """A Metalink document: the ``metalink`` field, or the whole body
        sent as application/metalink4+xml (the other fields then in the
        query string)."""
        field = self.one(args, "metalink")
        ctype = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != METALINK:
            return field
        if field is not None:
            raise web.HTTPError(400, log_message="metalink given twice: as the body and as "
                                                 "a parameter")
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError:
            raise web.HTTPError(400, log_message="the Metalink document is not valid "
                                                 "UTF-8") from None

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


class TaskReader(JsonHandler):
    """A handler that looks a task up by its id."""

    def initialize(self, records: TaskRecords) -> None:
        self.records = records

    async def find(self, task_id: str) -> Task | None:
        if not could_be_ours(task_id):
            return None
        return await self.db(self.records.get(task_id))


class CheckHandler(TaskReader):
    def initialize(self, records: TaskRecords,  # type: ignore[override]
                   answers: CheckAnswers) -> None:
        super().initialize(records)
        self.answers = answers

    async def get(self) -> None:
        task_id = self.one(self.arguments(), "id")
        if not task_id:
            return self.send(400, {"error": "id is required"})
        known = self.answers.get(task_id)
        if known is None:
            task = await self.find(task_id)
            if task is None:
                return self.send(404, NOT_FOUND)
            known = check_view(task)
            if known[0] == 202:
                self.answers.unfinished(task_id)
        status, body = known
        if status == 202:
            self.set_header("Retry-After", "1")
        self.send(status, body)


class TaskHandler(TaskReader):
    def initialize(self, records: TaskRecords,  # type: ignore[override]
                   cancellations: Cancellations, answers: CheckAnswers) -> None:
        super().initialize(records)
        self.cancellations = cancellations
        self.answers = answers

    async def get(self, task_id: str) -> None:
        task = await self.find(task_id)
        if task is None:
            return self.send(404, NOT_FOUND)
        self.send(200, task_view(task, links=(await self.caller()).operator))

    async def delete(self, task_id: str) -> None:
        """Cancel: 200 with the cancelled task (again on a repeat), 409 when
        it already ended otherwise, 403 when another API key owns it, 404
        when there is no such task."""
        notify = _flag(self.one(self.arguments(), "notify"))
        caller = await self.caller()
        task = await self.find(task_id)
        if task is None:
            return self.send(404, NOT_FOUND)
        if not caller.may_act_on(task.owner):
            return self.send(403, {"error": "this task was submitted with another API key; "
                                            "only that key (or an operator's) may cancel it"})
        outcome, task = await self.db(self.cancellations.cancel(task_id, notify))
        self.answers.forget(task_id)
        if outcome is Outcome.BUSY:
            return self.send(409, {"error": "the task changed state while it was being "
                                            "cancelled; try again"})
        if task is None:
            return self.send(404, NOT_FOUND)
        if outcome is Outcome.FINISHED:
            return self.send(409, {"error": f"the task already ended as {task.status}; only "
                                            "a queued or running task can be cancelled"})
        if outcome is Outcome.CANCELLED:
            TASKS_FINISHED.labels("cancelled").inc()
            log.info("task %s cancelled", task.id)
        self.send(200, task_view(task, links=caller.operator))


def _whose(caller: Caller) -> str:
    return f"your API key {caller.key_id}" if caller.key_id else "your address"


def _flag(value: str | None) -> bool:
    if value is None or value.lower() in ("0", "false", "no"):
        return False
    if value.lower() in ("1", "true", "yes"):
        return True
    raise web.HTTPError(400, log_message="notify must be true or false")
