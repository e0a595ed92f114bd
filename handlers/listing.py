"""GET /tasks: the task history, newest first, a page at a time: the
caller's own (its API key's), every task for an operator, or the tasks
whose ids it names (``id``, repeated: an id is a capability)."""

from __future__ import annotations

import datetime as dt
import urllib.parse

from tornado import web

from service.model.ids import could_be_ours
from service.model.numbers import whole_number
from service.model.task import Status
from service.model.views import task_view
from service.storage.history import PAGE_DEFAULT, PAGE_MAX, BadCursor, Cursor, TaskHistory

from .base import SUBMIT_PATIENCE, JsonHandler

# The longest url /submit accepts: a longer filter matches nothing anyway.
MAX_URL = 2048
# Ids one request may name (the page asks for the tasks it submitted).
MAX_IDS = 100


class TaskListHandler(JsonHandler):
    def initialize(self, history: TaskHistory) -> None:
        self.history = history

    async def get(self) -> None:
        args = self.arguments()
        caller = await self.caller()
        status, url, since = (self.one(args, name) for name in ("status", "url", "since"))
        limit, after = self.one(args, "limit"), self.one(args, "after")
        ids = _ids(args.get("id", []))
        if ids is None and not caller.operator and caller.key_id is None:
            raise web.HTTPError(401, log_message=(
                "listing tasks needs an API key (Authorization: Bearer <key>): a key lists "
                "the tasks it submitted; name tasks with id=<task id> to see those"))
        owner = None if caller.operator or ids is not None else caller.key_id
        # A page is a few queries, not one: it gets the submit's patience.
        page = await self.db(self.history.page(
            _limit(limit), _status(status), _url(url), _since(since), _cursor(after),
            owner=owner, ids=ids),
            patience=SUBMIT_PATIENCE)
        token = page.next.token() if page.next else None
        link = None
        if token:
            given = {"status": status, "url": url, "since": since, "limit": limit}
            query = [(k, v) for k, v in given.items() if v is not None]
            query += [("id", i) for i in ids or []]
            link = "/tasks?" + urllib.parse.urlencode([*query, ("after", token)])
            self.set_header("Link", f'<{link}>; rel="next"')
        self.send(200, {"tasks": [task_view(t, links=caller.operator) for t in page.tasks],
                        "next": link, "after": token})


def _bad(message: str) -> web.HTTPError:
    return web.HTTPError(400, log_message=message.replace("%", "%%"))


def _ids(values: list[str]) -> list[str] | None:
    if not values:
        return None
    if len(values) > MAX_IDS:
        raise _bad(f"id may be given at most {MAX_IDS} times")
    return [v for v in values if could_be_ours(v)]


def _limit(value: str | None) -> int:
    if value is None:
        return PAGE_DEFAULT
    text = value.strip()
    number = whole_number(text)
    if number is None or not 1 <= number <= PAGE_MAX:
        raise _bad(f"limit must be a whole number from 1 to {PAGE_MAX}")
    return number


def _status(value: str | None) -> Status | None:
    if value is None:
        return None
    try:
        return Status(value)
    except ValueError:
        raise _bad("status must be one of " + ", ".join(s.value for s in Status)) from None


def _url(value: str | None) -> str | None:
    if value is not None and len(value) > MAX_URL:
        raise _bad(f"url is longer than {MAX_URL} characters; no task has such a url")
    return value


def _since(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        when = dt.datetime.fromisoformat(value.strip())
        # A time without a zone is taken as UTC, the zone every task date is in.
        return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)
    except (ValueError, OverflowError):  # overflow: 9999-12-31T23:59-05:00 is past year 9999
        raise _bad("since must be a date or time in ISO 8601, such as 2025-01-31 or "
                   "2025-01-31T12:00:00Z") from None


def _cursor(value: str | None) -> Cursor | None:
    if value is None:
        return None
    try:
        return Cursor.parse(value)
    except BadCursor:
        raise _bad("after is not a cursor from this service: pass the after (or next) "
                   "of the previous page unchanged, or leave it out to start from the "
                   "newest task") from None
