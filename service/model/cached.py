"""A task answered from an earlier download of its file, at submit: the
earlier digests, judged by this task's own expected checksum."""

from __future__ import annotations

from service.model.digests import mismatch
from service.model.same_file import KnownFile
from service.model.task import Status, Task, TaskError, utcnow


def answer_from(task: Task, known: KnownFile) -> None:
    now = utcnow()
    wrong = mismatch(task.expected, known.digests) if task.expected else None
    task.status = Status.FAILED if wrong else Status.DONE
    task.digests = {a: known.digests[a] for a in task.algorithms}
    task.md5 = None if wrong else task.digests.get("md5")
    task.verified = None if task.expected is None else not wrong
    task.error = TaskError("mismatch", wrong) if wrong else None
    task.cached_from = known.task
    task.bytes_done = task.bytes_total = known.bytes or 0
    task.started_at = task.finished_at = now
    task.lease_until = None
    if task.mail_pending:
        task.notification.next_at = now  # the mail is due now
    if task.callback_pending and task.callback is not None:
        task.callback.next_at = now  # and so is the webhook
