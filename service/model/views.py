"""What the API shows of a task: the original /check contract, byte for
byte, and the whole task for /tasks/<id> (never the email address, nor the
client's address)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from service.model.task import Status, Task

NOT_FOUND = {"status": "not_found"}


def check_view(task: Task) -> tuple[int, dict[str, Any]]:
    """The HTTP status and body of GET /check for this task."""
    if task.status == Status.DONE:
        return 200, {"md5": task.md5, "status": "done", "url": task.url}
    if task.status == Status.FAILED:
        return 502, {"status": "failed", "url": task.url,
                     "error": task.error.message if task.error else None}
    if task.status == Status.CANCELLED:
        # Gone: the result will never exist (404 would say the task never
        # did, and 502 that the file's server failed).
        return 410, {"status": "cancelled", "url": task.url}
    return 202, {"status": "running"}


def task_view(task: Task) -> dict[str, Any]:
    failed = task.status == Status.FAILED and task.error is not None
    note = task.notification
    return {
        "id": task.id, "status": str(task.status), "url": task.url, "md5": task.md5,
        "error": task.error.message if failed and task.error else None,
        "error_code": task.error.code if failed and task.error else None,
        "bytes_done": task.bytes_done, "bytes_total": task.bytes_total,
        "attempts": task.attempts,
        "created_at": _iso(task.created_at), "started_at": _iso(task.started_at),
        "finished_at": _iso(task.finished_at),
        "notification": {"status": str(note.status), "attempts": note.attempts,
                         "error": note.error, "sent_at": _iso(note.sent_at)},
    }


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.isoformat().replace("+00:00", "Z")
