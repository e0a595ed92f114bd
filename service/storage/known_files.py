"""The last complete download of each file (collection ``files``, keyed by
``model.same_file.file_key``): what a submit with ``max_age`` is answered
from, or revalidated against.

One upsert per finished download, on a collection with no index but
``_id``, those of concurrent ends in one write; a submit reads it only
when it accepts an older result. The newest download of a file replaces
the one before.
"""

from __future__ import annotations

from pymongo import ReplaceOne

from service.model.same_file import KnownFile, file_key
from service.model.task import Task
from service.storage.batching import END_LINGER, Batcher
from service.storage.database import Collections


class KnownFiles:
    def __init__(self, cols: Collections):
        self.files = cols.files
        self._records: Batcher[ReplaceOne, None] = Batcher(self._write, END_LINGER)

    async def get(self, url: str, algorithms: list[str]) -> KnownFile | None:
        return KnownFile.from_doc(await self.files.find_one({"_id": file_key(url, algorithms)}))

    async def remember(self, task: Task, known: KnownFile) -> None:
        await self._records.submit(ReplaceOne(
            {"_id": file_key(task.url, task.algorithms)}, known.to_doc(), upsert=True))

    async def _write(self, records: list[ReplaceOne]) -> list[None]:
        # Two ends of one file in a batch: the later one wins, as it would
        # one write at a time (ordered).
        await self.files.bulk_write(records, ordered=True)
        return [None] * len(records)
