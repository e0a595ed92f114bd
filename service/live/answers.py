"""/check answers the API process can give without the database.

- **Ended tasks.** A finished task's answer never changes. The pool's
  workers report every end they record through a pipe
  (``runtime.results_pipe``), and /check answers those from here. In a
  burst of small files that was a database read per task, the largest
  share of the database's work once the workers' own writes were batched.
- **Unfinished tasks.** Their answer is always ``202 {"status":
  "running"}`` (with ``Retry-After: 1``) until they end. Once the database
  said a task is unfinished, that answer is repeated for ``FRESH_SECONDS``
  without asking again: users poll far more often than once a second, and
  each poll was a read competing with the workers' writes. An end reported
  by a worker replaces it at once; an end this process does not hear of
  (a worker on another host, a coalesced follower, a cancel through
  another API process) shows at most ``FRESH_SECONDS`` late.

A task this process knows nothing of is read from the database as
before. Ended answers are dropped after ``KEEP_SECONDS``, far inside the
tasks' retention, and at most ``MAX_ENTRIES`` are kept, the oldest going
first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

MAX_ENTRIES = 100_000
KEEP_SECONDS = 600.0
FRESH_SECONDS = 1.0

Answer = tuple[int, dict[str, Any]]
UNFINISHED: Answer = (202, {"status": "running"})


class CheckAnswers:
    def __init__(self, max_entries: int = MAX_ENTRIES, keep_seconds: float = KEEP_SECONDS,
                 fresh_seconds: float = FRESH_SECONDS):
        self.max_entries = max_entries
        self.keep_seconds = keep_seconds
        self.fresh_seconds = fresh_seconds
        self._answers: OrderedDict[str, tuple[float, Answer]] = OrderedDict()

    def ended(self, task_id: str, status: int, body: dict[str, Any]) -> None:
        """A worker recorded this task's end; ``status`` and ``body`` are
        its /check answer from now on."""
        self._put(task_id, (status, body), time.monotonic() + self.keep_seconds)

    def unfinished(self, task_id: str) -> None:
        """The database just said this task has not ended."""
        self._put(task_id, UNFINISHED, time.monotonic() + self.fresh_seconds)

    def forget(self, task_id: str) -> None:
        """This process changed the task (a cancel): ask the database."""
        self._answers.pop(task_id, None)

    def get(self, task_id: str) -> Answer | None:
        entry = self._answers.get(task_id)
        if entry is None:
            return None
        if time.monotonic() > entry[0]:
            del self._answers[task_id]
            return None
        return entry[1]

    def _put(self, task_id: str, answer: Answer, until: float) -> None:
        current = self._answers.get(task_id)
        if answer is UNFINISHED and current is not None and current[1] is not UNFINISHED \
                and time.monotonic() <= current[0]:
            return  # an end heard of stays, whatever a slower read said
        self._answers[task_id] = (until, answer)
        self._answers.move_to_end(task_id)
        while len(self._answers) > self.max_entries:
            self._answers.popitem(last=False)

    def __len__(self) -> int:
        return len(self._answers)
