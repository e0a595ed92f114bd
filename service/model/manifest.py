"""A manifest: a list of files to verify at once, like ``sha256sum -c``.

Each line becomes a task of its own (``manifest`` and ``line`` on the task
point back here); the manifest keeps what is about the list as a whole:
who sent it, how many lines, when the last one ended, and the one mail
with the summary.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from service.model.ids import new_id
from service.model.task import NoteStatus, Notification, utcnow

# Where a line stands, as a manifest counts them.
OUTCOMES = ("queued", "running", "ok", "mismatch", "failed")
ENDED = ("ok", "mismatch", "failed")
MAX_LINES = 10_000


@dataclasses.dataclass
class Manifest:
    lines: int
    # The number of its last line: blank and comment lines are numbered too.
    last_line: int = 0
    email: str | None = None
    client: str | None = None
    id: str = dataclasses.field(default_factory=new_id)
    created_at: dt.datetime = dataclasses.field(default_factory=utcnow)
    finished_at: dt.datetime | None = None
    # Set once every line has ended, counted from the tasks.
    totals: dict[str, int] | None = None
    # Until then: lines ended by outcome, and their bytes, added as each
    # line ends (a worker that dies in between leaves them one short until
    # the final count).
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    # The first lines that did not end well (for the mail), once finished.
    problems: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notification: Notification = dataclasses.field(default_factory=Notification)

    @classmethod
    def new(cls, lines: int, last_line: int, email: str | None, mail_enabled: bool,
            client: str | None = None) -> Manifest:
        note = (NoteStatus.NONE if not email
                else NoteStatus.PENDING if mail_enabled else NoteStatus.SKIPPED)
        return cls(lines=lines, last_line=last_line, email=email, client=client,
                   notification=Notification(note))

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    @property
    def mail_pending(self) -> bool:
        return self.notification.status == NoteStatus.PENDING

    def to_doc(self) -> dict[str, Any]:
        return {"_id": self.id, "lines": self.lines, "last_line": self.last_line,
                "email": self.email,
                "client": self.client, "created_at": self.created_at,
                "finished_at": self.finished_at, "totals": self.totals,
                "problems": self.problems, "counts": self.counts,
                "notification": self.notification.to_doc()}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Manifest:
        return cls(id=doc["_id"], lines=doc["lines"], last_line=doc.get("last_line", 0),
                   email=doc.get("email"),
                   client=doc.get("client"), created_at=doc["created_at"],
                   finished_at=doc.get("finished_at"), totals=doc.get("totals"),
                   problems=doc.get("problems") or [], counts=doc.get("counts") or {},
                   notification=Notification.from_doc(doc.get("notification")))


def outcome(status: str, verified: bool | None) -> str:
    """A line's place in the totals, from its task's status."""
    if status in ("queued", "running"):
        return status
    if status == "done":
        return "ok"
    return "mismatch" if verified is False else "failed"
