"""The task: what a user asked for, and how far it got.

A task is stored as one MongoDB document (collection ``tasks``), readable
as it is in the Mongo shell; ``Task.from_doc`` and ``Task.to_doc`` are the
only places that know its field names.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import uuid
from typing import Any


class Status(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    # Stopped on request (DELETE /tasks/<id>), queued or running; final.
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (Status.DONE, Status.FAILED, Status.CANCELLED)


class NoteStatus(enum.StrEnum):
    """Where the task's mail stands."""
    NONE = "none"        # no email address given
    PENDING = "pending"  # to be sent (or being sent) once the task ends
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"  # mail is off on this service
    CANCELLED = "cancelled"  # the task was cancelled and no mail was asked for


@dataclasses.dataclass
class TaskError:
    code: str
    message: str

    def to_doc(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_doc(cls, doc: dict | None) -> TaskError | None:
        return None if not doc else cls(doc.get("code", "unknown"), doc.get("message", ""))


@dataclasses.dataclass
class Notification:
    status: NoteStatus = NoteStatus.NONE
    attempts: int = 0
    error: str | None = None
    sent_at: dt.datetime | None = None
    # When the mail is due; a sender's claim moves it forward (its lease).
    next_at: dt.datetime | None = None
    worker: str | None = None

    def to_doc(self) -> dict[str, Any]:
        return {"status": str(self.status), "attempts": self.attempts, "error": self.error,
                "sent_at": self.sent_at, "next_at": self.next_at, "worker": self.worker}

    @classmethod
    def from_doc(cls, doc: dict | None) -> Notification:
        doc = doc or {}
        return cls(status=NoteStatus(doc.get("status", "none")),
                   attempts=doc.get("attempts", 0), error=doc.get("error"),
                   sent_at=doc.get("sent_at"), next_at=doc.get("next_at"),
                   worker=doc.get("worker"))


def utcnow() -> dt.datetime:
    # Millisecond precision: BSON dates hold no more, and a compare-and-set
    # must compare equal to what it read back.
    now = dt.datetime.now(dt.UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


@dataclasses.dataclass
class Task:
    url: str
    email: str | None = None
    id: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))
    status: Status = Status.QUEUED
    md5: str | None = None
    error: TaskError | None = None
    bytes_done: int = 0
    bytes_total: int | None = None
    attempts: int = 0
    # Queued: runnable from then on. Running: the worker's lease.
    lease_until: dt.datetime | None = None
    worker: str | None = None
    # The token of the batched claim that took a fresh task (tells the
    # claimer which of its batch it won). Later writes of a running task are
    # conditioned on the worker's name.
    claim: str | None = None
    client: str | None = None
    # The fairness lane, from how many unfinished tasks its client had
    # when it was submitted (see storage.queue_scan).
    lane: int = 0
    created_at: dt.datetime = dataclasses.field(default_factory=utcnow)
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    notification: Notification = dataclasses.field(default_factory=Notification)

    @classmethod
    def new(cls, url: str, email: str | None, mail_enabled: bool,
            client: str | None = None) -> Task:
        note = (NoteStatus.NONE if not email
                else NoteStatus.PENDING if mail_enabled else NoteStatus.SKIPPED)
        task = cls(url=url, email=email, client=client, notification=Notification(note))
        task.lease_until = task.created_at
        return task

    @property
    def mail_pending(self) -> bool:
        return self.notification.status == NoteStatus.PENDING

    def to_doc(self) -> dict[str, Any]:
        return {
            "_id": self.id, "url": self.url, "email": self.email, "status": str(self.status),
            "md5": self.md5, "error": self.error.to_doc() if self.error else None,
            "bytes_done": self.bytes_done, "bytes_total": self.bytes_total,
            "attempts": self.attempts, "lease_until": self.lease_until, "worker": self.worker,
            "claim": self.claim, "client": self.client, "lane": self.lane,
            "created_at": self.created_at,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "notification": self.notification.to_doc(),
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Task:
        return cls(
            id=doc["_id"], url=doc["url"], email=doc.get("email"),
            status=Status(doc["status"]), md5=doc.get("md5"),
            error=TaskError.from_doc(doc.get("error")),
            bytes_done=doc.get("bytes_done", 0), bytes_total=doc.get("bytes_total"),
            attempts=doc.get("attempts", 0), lease_until=doc.get("lease_until"),
            worker=doc.get("worker"), claim=doc.get("claim"), client=doc.get("client"),
            lane=doc.get("lane", 0),
            created_at=doc.get("created_at") or utcnow(), started_at=doc.get("started_at"),
            finished_at=doc.get("finished_at"),
            notification=Notification.from_doc(doc.get("notification")))
