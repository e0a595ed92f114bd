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
    body: dict[str, Any]
    if task.status == Status.DONE:
        body = {"md5": task.md5, "status": "done", "url": task.url}
        others = {a: h for a, h in task.digests.items() if a != "md5"}
        if others:
            body["digests"] = others
        if task.expected is not None:
            body["verified"] = task.verified
        return 200, body
    if task.status == Status.FAILED:
        body = {"status": "failed", "url": task.url,
                "error": task.error.message if task.error else None}
        if task.verified is False:
            body["verified"] = False
        return 502, body
    if task.status == Status.CANCELLED:
        # Gone: the result will never exist (404 would say the task never
        # did, and 502 that the file's server failed).
        return 410, {"status": "cancelled", "url": task.url}
    return 202, {"status": "running"}


def task_view(task: Task, links: bool = False) -> dict[str, Any]:
    """The task in full. ``follows`` and ``cached_from`` name another
    task, most often another client's: its id is a capability (to read,
    to cancel), so only an operator (``links``) sees it; anyone else sees
    ``true`` where there is one."""
    failed = task.status == Status.FAILED and task.error is not None
    note = task.notification
    return {
        "id": task.id, "status": str(task.status), "url": task.url, "md5": task.md5,
        "algorithms": task.algorithms, "digests": task.digests,
        "expected": str(task.expected) if task.expected else None, "verified": task.verified,
        "server_digest": task.server_digest.to_doc() if task.server_digest else None,
        "manifest": task.manifest, "line": task.line,
        "follows": _link(task.follows, links),
        "max_age": task.max_age, "cached_from": _link(task.cached_from, links),
        "revalidated": task.revalidated,
        "error": task.error.message if failed and task.error else None,
        "error_code": task.error.code if failed and task.error else None,
        "bytes_done": task.bytes_done, "bytes_total": task.bytes_total,
        "attempts": task.attempts,
        **_mirrors_view(task),
        "created_at": iso(task.created_at), "started_at": iso(task.started_at),
        "finished_at": iso(task.finished_at),
        "notification": {"status": str(note.status), "attempts": note.attempts,
                         "error": note.error, "sent_at": iso(note.sent_at)},
        "history": [_attempt(entry) for entry in task.history],
        "finished_by": _finished_by(task),
        **_resume_view(task),
        "callback": _callback(task),
    }


def _link(task_id: str | None, links: bool) -> str | bool | None:
    if task_id is None:
        return None
    return task_id if links else True


def _callback(task: Task) -> dict[str, Any] | None:
    # Not the URL: it may carry the receiver's own token, and the task's
    # view is for anyone who knows its id.
    hook = task.callback
    if hook is None:
        return None
    return {"status": str(hook.status), "attempts": hook.attempts,
            "last_error": hook.last_error, "delivered_at": iso(hook.delivered_at)}


def _attempt(entry: dict[str, Any]) -> dict[str, Any]:
    # The claim token stays private: it is the fence, not information.
    return {"worker": entry.get("worker"), "started_at": iso(entry.get("started_at")),
            "ended_at": iso(entry.get("ended_at")), "outcome": entry.get("outcome"),
            "resumed_from": entry.get("resumed_from"),
            "bytes_fetched": entry.get("bytes_fetched")}


def _resume_view(task: Task) -> dict[str, Any]:
    """Progress across attempts: the hash states and validator stay
    private; only how far a retry would resume shows."""
    attempt = task.attempt or {}
    checkpoint = task.checkpoint or {}
    return {"bytes_fetched": task.bytes_fetched + (attempt.get("fetched") or 0),
            "resumed_from": attempt.get("resumed_from"),
            "checkpoint_offset": checkpoint.get("offset"),
            "resume_note": attempt.get("note"),
            "connections": attempt.get("connections"),
            # An ftp:// file fetched from its HTTPS copy (FTP_PREFER_HTTPS).
            "fetched_url": attempt.get("fetched_url")}


def _mirrors_view(task: Task) -> dict[str, Any]:
    """The mirrors asked for, and what the last attempt made of them: each
    source's bytes, or why it was dropped (the piece hashes themselves stay
    in the database: a count says enough)."""
    attempt = task.attempt or {}
    pieces = task.pieces
    return {"mirrors": task.mirrors, "size": task.size,
            "pieces": {"algorithm": pieces.algorithm, "length": pieces.length,
                       "count": len(pieces.hashes)} if pieces else None,
            "sources": attempt.get("sources"), "sources_note": attempt.get("sources_note")}


def _finished_by(task: Task) -> str | None:
    if not task.status.finished or not task.history:
        return None
    last = task.history[-1]
    return last.get("worker") if last.get("outcome") == str(task.status) else None


def iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.isoformat().replace("+00:00", "Z")
