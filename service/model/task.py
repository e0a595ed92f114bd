"""The task: what a user asked for, and how far it got.

A task is stored as one MongoDB document (collection ``tasks``), readable
as it is in the Mongo shell; ``Task.from_doc`` and ``Task.to_doc`` are the
only places that know its field names.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import os
from typing import Any, Protocol

from service.model.digests import ALWAYS, Checksum, ServerDigest
from service.model.ids import new_id
from service.model.pieces import PieceHashes
from service.model.same_file import KnownFile


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


class CallbackStatus(enum.StrEnum):
    """Where the task's webhook stands."""
    PENDING = "pending"      # to be posted (or being posted) once the task ends
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"        # refused for good, or out of attempts


@dataclasses.dataclass
class Callback:
    """The webhook a submit asked for (``callback_url``), posted when the
    task ends; the outbox's fields mirror the mail's."""
    url: str
    status: CallbackStatus = CallbackStatus.PENDING
    attempts: int = 0
    last_error: str | None = None
    delivered_at: dt.datetime | None = None
    # When the post is due; a sender's claim moves it forward (its lease).
    next_at: dt.datetime | None = None
    worker: str | None = None

    def to_doc(self) -> dict[str, Any]:
        return {"url": self.url, "status": str(self.status), "attempts": self.attempts,
                "last_error": self.last_error, "delivered_at": self.delivered_at,
                "next_at": self.next_at, "worker": self.worker}

    @classmethod
    def from_doc(cls, doc: dict | None) -> Callback | None:
        if not doc:
            return None
        return cls(url=doc["url"], status=CallbackStatus(doc.get("status", "pending")),
                   attempts=doc.get("attempts", 0), last_error=doc.get("last_error"),
                   delivered_at=doc.get("delivered_at"), next_at=doc.get("next_at"),
                   worker=doc.get("worker"))


class Notifiable(Protocol):
    """What a mail is about: a task, or a manifest."""
    id: str
    email: str | None
    notification: Notification


# A test hook, not a setting: MD5LIGHT_CLOCK_OFFSET (seconds) moves this
# process's clock, so that a test can run a worker whose host clock is
# wrong. Leases must hold anyway (storage.dbclock).
_CLOCK_OFFSET = dt.timedelta(seconds=float(os.environ.get("MD5LIGHT_CLOCK_OFFSET") or 0))

# Attempts kept in a task's history (oldest dropped first).
HISTORY_LIMIT = 10


def utcnow() -> dt.datetime:
    # Millisecond precision: BSON dates hold no more, and a compare-and-set
    # must compare equal to what it read back.
    now = dt.datetime.now(dt.UTC) + _CLOCK_OFFSET
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


@dataclasses.dataclass
class Task:
    url: str
    email: str | None = None
    id: str = dataclasses.field(default_factory=new_id)
    status: Status = Status.QUEUED
    md5: str | None = None
    # What to compute (md5 always among them) and, once hashed, the results.
    algorithms: list[str] = dataclasses.field(default_factory=lambda: [ALWAYS])
    digests: dict[str, str] = dataclasses.field(default_factory=dict)
    # The checksum the user expects; verified once the file is hashed.
    expected: Checksum | None = None
    verified: bool | None = None
    server_digest: ServerDigest | None = None
    # A line of a manifest: its id and the line's number (from 1).
    manifest: str | None = None
    line: int | None = None
    # A coalesced submit: the task whose download this one shares
    # (storage.coalescing); kept once ended, to say where the result came from.
    follows: str | None = None
    # How old an earlier download's result may be to answer this task
    # (storage.known_files); the task it was answered from, at once or
    # after the server said 304 Not Modified to ``revalidate``'s validators.
    max_age: int = 0
    cached_from: str | None = None
    revalidated: bool | None = None
    revalidate: KnownFile | None = None
    error: TaskError | None = None
    bytes_done: int = 0
    bytes_total: int | None = None
    attempts: int = 0
    # Queued: runnable from then on. Running: the worker's lease.
    lease_until: dt.datetime | None = None
    worker: str | None = None
    # The fencing token: every claim sets a fresh one, and every later write
    # of the running task is conditioned on it, so a worker whose lease was
    # taken over (even by itself) writes nothing. A batched claim also reads
    # it back to learn which of its batch it won.
    claim: str | None = None
    claimed_at: dt.datetime | None = None
    client: str | None = None
    # The API key that submitted it (service.model.keys), or None. Stored
    # only when set: the sparse list_owner index then holds keyed tasks only.
    owner: str | None = None
    # Ranged connections asked for (None: CONNECTIONS_PER_DOWNLOAD); stored
    # only when set.
    connections: int | None = None
    # Other URLs of the same file (a submit's ``mirrors``, a Metalink's
    # urls), the length it must have and a Metalink's piece hashes
    # (fetch.mirrors); each stored only when set.
    mirrors: list[str] = dataclasses.field(default_factory=list)
    size: int | None = None
    pieces: PieceHashes | None = None
    # The fairness lane, from how many unfinished tasks its client had
    # when it was submitted (see storage.queue_scan).
    lane: int = 0
    created_at: dt.datetime = dataclasses.field(default_factory=utcnow)
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    notification: Notification = dataclasses.field(default_factory=Notification)
    # The last HISTORY_LIMIT attempts that ended: {worker, claim,
    # started_at, ended_at, outcome, resumed_from, bytes_fetched}, outcome
    # one of done, failed, retry, shutdown, lease_lost.
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # Where a retry resumes a long download (fetch.checkpoint writes and
    # reads it; here it is an opaque document), or None: from byte 0.
    checkpoint: dict[str, Any] | None = None
    # The current (or last) attempt as its worker last reported it:
    # {resumed_from, fetched, note}; and the bytes received by the
    # attempts before it, so that re-fetched bytes show.
    attempt: dict[str, Any] | None = None
    bytes_fetched: int = 0
    callback: Callback | None = None

    @classmethod
    def new(cls, url: str, email: str | None, mail_enabled: bool,
            client: str | None = None, algorithms: list[str] | None = None,
            expected: Checksum | None = None, callback_url: str | None = None,
            owner: str | None = None, connections: int | None = None,
            mirrors: list[str] | None = None, size: int | None = None,
            pieces: PieceHashes | None = None) -> Task:
        note = (NoteStatus.NONE if not email
                else NoteStatus.PENDING if mail_enabled else NoteStatus.SKIPPED)
        task = cls(url=url, email=email, client=client, owner=owner, connections=connections,
                   mirrors=list(mirrors or []), size=size, pieces=pieces,
                   notification=Notification(note),
                   algorithms=list(algorithms or [ALWAYS]), expected=expected,
                   callback=Callback(callback_url) if callback_url else None)
        task.lease_until = task.created_at
        return task

    def assign(self, worker: str, claim: str, now: dt.datetime, lease_until: dt.datetime) -> None:
        """Stored already claimed by ``worker`` (assign-at-insert): the same
        fields a claim would write, so no claim write is needed."""
        self.status, self.worker, self.claim, self.attempts = Status.RUNNING, worker, claim, 1
        # On the database's clock, which may run a little behind this
        # host's: never started before it was created.
        self.started_at = self.claimed_at = max(now, self.created_at)
        self.lease_until = lease_until

    def unassign(self) -> None:
        """Undo ``assign`` before the task is stored."""
        self.status, self.worker, self.claim, self.attempts = Status.QUEUED, None, None, 0
        self.started_at = self.claimed_at = None
        self.lease_until = self.created_at

    def follow(self, leader: str) -> None:
        """Wait for ``leader``'s download instead of running: no claim
        takes a queued task without a ``lease_until``."""
        self.follows, self.lease_until = leader, None

    @property
    def mail_pending(self) -> bool:
        return self.notification.status == NoteStatus.PENDING

    @property
    def callback_pending(self) -> bool:
        return self.callback is not None and self.callback.status == CallbackStatus.PENDING

    def to_doc(self) -> dict[str, Any]:
        return {
            "_id": self.id, "url": self.url, "email": self.email, "status": str(self.status),
            "md5": self.md5, "algorithms": self.algorithms, "digests": self.digests,
            "expected": self.expected.to_doc() if self.expected else None,
            "verified": self.verified,
            "server_digest": self.server_digest.to_doc() if self.server_digest else None,
            "follows": self.follows,
            "max_age": self.max_age, "cached_from": self.cached_from,
            "revalidated": self.revalidated,
            "revalidate": self.revalidate.to_doc() if self.revalidate else None,
            "error": self.error.to_doc() if self.error else None,
            "bytes_done": self.bytes_done, "bytes_total": self.bytes_total,
            "attempts": self.attempts, "lease_until": self.lease_until, "worker": self.worker,
            "claim": self.claim, "claimed_at": self.claimed_at, "client": self.client,
            "lane": self.lane, "created_at": self.created_at,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "notification": self.notification.to_doc(), "history": self.history,
            "checkpoint": self.checkpoint, "attempt": self.attempt,
            "bytes_fetched": self.bytes_fetched,
            "callback": self.callback.to_doc() if self.callback else None,
            # Absent, not null, outside a manifest: the manifests' sparse
            # indexes then hold manifest lines alone, where a null entered
            # every task (and ended it with a rewrite).
            **({"manifest": self.manifest, "line": self.line} if self.manifest else {}),
            **({"owner": self.owner} if self.owner else {}),
            **({"connections": self.connections} if self.connections else {}),
            **({"mirrors": self.mirrors} if self.mirrors else {}),
            **({"size": self.size} if self.size is not None else {}),
            **({"pieces": self.pieces.to_doc()} if self.pieces else {}),
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Task:
        return cls(
            id=doc["_id"], url=doc["url"], email=doc.get("email"),
            status=Status(doc["status"]), md5=doc.get("md5"),
            # Tasks stored before digests existed asked for md5 alone.
            algorithms=doc.get("algorithms") or [ALWAYS],
            digests=doc["digests"] if "digests" in doc
            else {ALWAYS: doc["md5"]} if doc.get("md5") else {},
            expected=Checksum.from_doc(doc.get("expected")), verified=doc.get("verified"),
            server_digest=ServerDigest.from_doc(doc.get("server_digest")),
            manifest=doc.get("manifest"), line=doc.get("line"), follows=doc.get("follows"),
            max_age=doc.get("max_age", 0), cached_from=doc.get("cached_from"),
            revalidated=doc.get("revalidated"),
            revalidate=KnownFile.from_doc(doc.get("revalidate")),
            error=TaskError.from_doc(doc.get("error")),
            bytes_done=doc.get("bytes_done", 0), bytes_total=doc.get("bytes_total"),
            attempts=doc.get("attempts", 0), lease_until=doc.get("lease_until"),
            worker=doc.get("worker"), claim=doc.get("claim"), claimed_at=doc.get("claimed_at"),
            client=doc.get("client"), owner=doc.get("owner"),
            connections=doc.get("connections"),
            mirrors=list(doc.get("mirrors") or []), size=doc.get("size"),
            pieces=PieceHashes.from_doc(doc.get("pieces")),
            lane=doc.get("lane", 0),
            created_at=doc.get("created_at") or utcnow(), started_at=doc.get("started_at"),
            finished_at=doc.get("finished_at"),
            notification=Notification.from_doc(doc.get("notification")),
            history=list(doc.get("history") or []),
            checkpoint=doc.get("checkpoint"), attempt=doc.get("attempt"),
            bytes_fetched=doc.get("bytes_fetched", 0),
            callback=Callback.from_doc(doc.get("callback")))
