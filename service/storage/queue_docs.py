"""The documents of the queue's writes: the condition every write of a
running task is conditioned on (its fence), and the fields an attempt's
end sets, its history entry included."""

from __future__ import annotations

import datetime as dt
from typing import Any

from service.model.task import HISTORY_LIMIT, NoteStatus, Status, Task, TaskError


def _fence(task: Task, worker: str) -> dict[str, Any]:
    # The task must still hold the claim it took, not merely carry the same
    # worker name.
    return {"status": Status.RUNNING, "worker": worker, "claim": task.claim}


def held(task: Task, worker: str) -> dict[str, Any]:
    """The filter of a write of a running task (the fence)."""
    return {"_id": task.id, **_fence(task, worker)}


def held_test(task: Task, worker: str) -> dict[str, Any]:
    """The same fence as an expression, for a write filtered on ``_id``
    alone (storage.conditional)."""
    return {"$and": [{"$eq": [f"${key}", {"$literal": value}]}
                     for key, value in _fence(task, worker).items()]}


def literal(fields: dict[str, Any]) -> dict[str, Any]:
    # In an update pipeline a string starting with "$" is a field path and
    # a dict an expression: values from outside are wrapped.
    return {key: {"$literal": value} for key, value in fields.items()}


def ended(outcome: str) -> dict[str, Any]:
    """Pipeline: append the attempt the document holds (its worker, claim
    and claimed_at, before this update) to the bounded history."""
    entry = {"worker": "$worker", "claim": "$claim", "started_at": "$claimed_at",
             "ended_at": "$$NOW", "outcome": {"$literal": outcome},
             "resumed_from": {"$ifNull": ["$attempt.resumed_from", None]},
             "bytes_fetched": {"$ifNull": ["$attempt.fetched", 0]}}
    # The attempt's bytes join the task's total, and the next attempt
    # starts its own count.
    return {**_appending(entry),
            "bytes_fetched": {"$add": [{"$ifNull": ["$bytes_fetched", 0]},
                                       {"$ifNull": ["$attempt.fetched", 0]}]},
            "attempt": {"$literal": None}}


def history_entry(task: Task, now: dt.datetime, outcome: str, worker: str | None = None,
                   attempt: dict[str, Any] | None = None) -> dict[str, Any]:
    attempt = attempt or task.attempt or {}
    return {"worker": worker or task.worker, "claim": task.claim,
            "started_at": task.claimed_at, "ended_at": now, "outcome": outcome,
            "resumed_from": attempt.get("resumed_from"),
            "bytes_fetched": attempt.get("fetched") or 0}


def pushed(entry: dict[str, Any]) -> dict[str, Any]:
    """``$push``: the entry onto the bounded history."""
    return {"history": {"$each": [entry], "$slice": -HISTORY_LIMIT}}


def appended(entry: dict[str, Any]) -> dict[str, Any]:
    """The same in an update pipeline."""
    return _appending({"$literal": entry})


def _appending(entry: dict[str, Any]) -> dict[str, Any]:
    # An expression: the bounded history with ``entry`` at its end.
    return {"history": {"$slice": [{"$concatArrays": [{"$ifNull": ["$history", []]}, [entry]]},
                                   -HISTORY_LIMIT]}}


def finish_fields(task: Task, now: dt.datetime, status: Status,
                   error: TaskError | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {"status": str(status), "md5": None,
                              "error": error.to_doc() if error else None,
                              "finished_at": now, "lease_until": None, "checkpoint": None}
    if task.notification.status == NoteStatus.PENDING:
        fields["notification.next_at"] = now  # the mail is due now
    if task.callback_pending:
        fields["callback.next_at"] = now  # and so is the webhook
    return fields
