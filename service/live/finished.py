"""The /check answers of tasks that have ended, kept in the API process.

A finished task's /check answer never changes, so it need not come from
the database: the pool's workers report every end they record through a
pipe (``runtime.results_pipe``), and /check answers those from here. In a
burst of small files that was a database read per task, the largest share
of the database's work once the workers' own writes were batched. A task
this process did not hear of (ended by a worker on another host, before a
restart, or followed a coalesced download) is read from the database as
before. Entries are dropped after ``KEEP_SECONDS``, far inside the tasks'
retention, and at most ``MAX_ENTRIES`` are kept, the oldest going first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

MAX_ENTRIES = 100_000
KEEP_SECONDS = 600.0

Answer = tuple[int, dict[str, Any]]


class FinishedChecks:
    def __init__(self, max_entries: int = MAX_ENTRIES, keep_seconds: float = KEEP_SECONDS):
        self.max_entries = max_entries
        self.keep_seconds = keep_seconds
        self._answers: OrderedDict[str, tuple[float, Answer]] = OrderedDict()

    def put(self, task_id: str, status: int, body: dict[str, Any]) -> None:
        self._answers[task_id] = (time.monotonic(), (status, body))
        self._answers.move_to_end(task_id)
        while len(self._answers) > self.max_entries:
            self._answers.popitem(last=False)

    def get(self, task_id: str) -> Answer | None:
        entry = self._answers.get(task_id)
        if entry is None:
            return None
        if time.monotonic() - entry[0] > self.keep_seconds:
            del self._answers[task_id]
            return None
        return entry[1]

    def __len__(self) -> int:
        return len(self._answers)
