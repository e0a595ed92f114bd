"""The last complete download of each file (collection ``files``, keyed by
``model.same_file.file_key``): what a submit with ``max_age`` is answered
from, or revalidated against.

One record per finished download, on a collection with no index but
``_id`` (and, with TASK_TTL_DAYS, the TTL index that deletes records as
old as the tasks it deletes), those of concurrent ends in one write; a submit reads it only
when it accepts an older result. The newest download of a file replaces
the one before.
"""

from __future__ import annotations

from typing import Any

from pymongo.errors import BulkWriteError

from service.model.same_file import KnownFile, file_key
from service.model.task import Task
from service.storage.batching import END_LINGER, Batcher
from service.storage.conditional import each_only_if, merged
from service.storage.database import Collections

_DUPLICATE_KEY = 11000
_ALWAYS = {"$literal": True}


class KnownFiles:
    def __init__(self, cols: Collections):
        self.files = cols.files
        self._records: Batcher[tuple[str, dict[str, Any]], None] = Batcher(
            self._write, END_LINGER)

    async def get(self, url: str, algorithms: list[str]) -> KnownFile | None:
        return KnownFile.from_doc(await self.files.find_one({"_id": file_key(url, algorithms)}))

    async def remember(self, task: Task, known: KnownFile) -> None:
        await self._records.submit((file_key(task.url, task.algorithms), known.to_doc()))

    async def _write(self, records: list[tuple[str, dict[str, Any]]]) -> list[None]:
        """Insert the records of files not seen before and replace the
        others: two statements at most, where an upsert each cost
        SecantusDB a synced commit each (0.8 ms of its CPU per task in a
        burst of small files). A record's fields are always the same set,
        so merging one over the last replaces it."""
        # Two ends of one file in a batch: the later one wins, as it would
        # one write at a time.
        latest = dict(records)
        keys = list(latest)
        try:
            await self.files.insert_many([{"_id": key, **latest[key]} for key in keys],
                                         ordered=False)
            return [None] * len(records)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(error.get("code") != _DUPLICATE_KEY for error in errors):
                raise
            known = [keys[error["index"]] for error in errors]
        await self.files.update_many(
            {"_id": {"$in": known}},
            each_only_if([(key, _ALWAYS, merged(latest[key])) for key in known]))
        return [None] * len(records)
