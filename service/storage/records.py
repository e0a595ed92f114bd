"""Task records, as the API sees them: store a new task, read one back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from pymongo.errors import DuplicateKeyError

from service.model.digests import ALWAYS
from service.model.task import Status, Task
from service.storage.batching import InsertBatcher
from service.storage.counters import TaskCounters
from service.storage.database import Collections
from service.storage.idempotency import IdempotencyKeys


class TaskRecords:
    def __init__(self, cols: Collections, counters: TaskCounters, idempotency_ttl: float):
        self.cols = cols
        self.counters = counters
        self.keys = IdempotencyKeys(cols.idempotency, idempotency_ttl)
        self._inserts = InsertBatcher(cols.tasks)

    async def create(self, task: Task, idempotency_key: str | None = None,
                     admit: Callable[[], Awaitable[int]] | None = None) -> str:
        """Store a new task; its id, or that of the task an earlier request
        with the same Idempotency-Key created. ``admit`` is asked only when
        the task is new: it raises to refuse the task or returns its lane."""
        task_id = task.id
        if idempotency_key:
            # Scoped to its client (address or API key): a key another
            # client chose alike must not hand out that client's task id.
            idempotency_key = f"{task.client or ''} {idempotency_key}"
            task_id = await self.keys.reserve(idempotency_key, task.id, task.url, task.email,
                                              _options(task))
        retry = task_id != task.id
        # A retry inserts too: should its first try have died between the
        # key and the task, this stores the task the key promises.
        task.id = task_id
        if admit is not None and not retry:
            try:
                task.lane = await admit()
            except Exception:
                if idempotency_key:
                    await self.keys.release(idempotency_key, task.id)
                raise
        try:
            await self._inserts.insert(task.to_doc())
        except DuplicateKeyError:
            # Only an idempotent retry reuses an id; its task is already there.
            return task_id
        # A task answered from an earlier download is born finished, one
        # assigned at insert running.
        self.counters.count(queued=1 if task.status == Status.QUEUED else 0, total=1)
        return task_id

    async def get(self, task_id: str) -> Task | None:
        doc = await self.cols.tasks.find_one({"_id": task_id})
        return Task.from_doc(doc) if doc else None

    async def pending_of(self, client: str) -> int:
        """Unfinished tasks of one client (indexed; costs in proportion to
        their number, about 25 ms at 1,000 on SecantusDB)."""
        return await self.cols.tasks.count_documents(
            {"client": client, "status": {"$in": [Status.QUEUED, Status.RUNNING]}})


def _options(task: Task) -> dict:
    """What a submit asked for besides url and email; empty for the plain
    md5 request, as keys stored before these options existed are."""
    options: dict = {}
    if task.algorithms != [ALWAYS]:
        options["algorithms"] = task.algorithms
    if task.expected is not None:
        options["expected"] = str(task.expected)
    if task.max_age:
        options["max_age"] = task.max_age
    if task.callback is not None:
        options["callback_url"] = task.callback.url
    if task.mirrors:
        options["mirrors"] = list(task.mirrors)
    if task.pieces is not None:
        options["pieces"] = task.pieces.to_doc()
    if task.size is not None:
        options["size"] = task.size
    return options
