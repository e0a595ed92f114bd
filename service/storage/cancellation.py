"""Cancelling a task (DELETE /tasks/<id>).

A queued or running task becomes ``cancelled`` by one compare-and-set on
the status just read, so it races safely with claims and finishes: a claim
takes only ``queued`` tasks, and every write of a running task (renew,
finish, retry_later) is conditioned on ``running`` and its worker's name.
Whichever write lands first wins; a cancel that loses reads the task again.
The worker of a running task learns of it at its next lease renewal (at
most a second later, see ``TaskQueue.renew``) and closes the download.
Submits coalesced with a cancelled task are not cancelled with it: the
oldest of them takes over the download (storage.coalescing).
"""

from __future__ import annotations

import enum
from typing import Any

from service.model.task import NoteStatus, Status, Task
from service.storage.coalescing import Coalescer
from service.storage.counters import TaskCounters
from service.storage.database import Collections, utcnow

# A task changes state a handful of times in its life: a cancel that keeps
# losing the race is a task that keeps moving, and one re-read per move is
# enough.
_TRIES = 8


class Outcome(enum.Enum):
    CANCELLED = "cancelled"          # by this call
    ALREADY_CANCELLED = "already"    # by an earlier one
    FINISHED = "finished"            # done or failed: too late
    NOT_FOUND = "not_found"
    BUSY = "busy"                    # changed state under every try


class Cancellations:
    def __init__(self, cols: Collections, counters: TaskCounters, coalescer: Coalescer):
        self.tasks = cols.tasks
        self.counters = counters
        self.coalescer = coalescer

    async def cancel(self, task_id: str, notify: bool = False) -> tuple[Outcome, Task | None]:
        """Cancel a queued or running task. ``notify``: still send the mail
        the task asked for (saying it was cancelled); by default a
        cancelled task sends none, and its notification says so."""
        for _ in range(_TRIES):
            doc = await self.tasks.find_one({"_id": task_id})
            if doc is None:
                return Outcome.NOT_FOUND, None
            task = Task.from_doc(doc)
            if task.status == Status.CANCELLED:
                return Outcome.ALREADY_CANCELLED, task
            if task.status.finished:
                return Outcome.FINISHED, task
            now = utcnow()
            changes: dict[str, Any] = {"status": str(Status.CANCELLED), "finished_at": now,
                                       "lease_until": None}
            if task.mail_pending:
                if notify:
                    changes["notification.next_at"] = now  # the mail is due now
                else:
                    changes["notification.status"] = str(NoteStatus.CANCELLED)
            if task.callback_pending:
                # A program waiting on the webhook learns of the cancel too.
                changes["callback.next_at"] = now
            result = await self.tasks.update_one({"_id": task_id, "status": str(task.status)},
                                                 {"$set": changes})
            if result.modified_count:
                if task.status == Status.QUEUED:
                    self.counters.count(queued=-1)
                after = await self.tasks.find_one({"_id": task_id})
                if task.follows is None and task.manifest is None:
                    # Submits that share its download go on without it: no
                    # more join a cancelled task, so the list read is final.
                    self.coalescer.ended(task_id)
                    await self.coalescer.settle_followers(
                        task, list((after or {}).get("followers") or []))
                return Outcome.CANCELLED, Task.from_doc(after) if after else task
        return Outcome.BUSY, None
