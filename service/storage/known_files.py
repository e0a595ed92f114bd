"""The last complete download of each file (collection ``files``, keyed by
``model.same_file.file_key``): what a submit with ``max_age`` is answered
from, or revalidated against.

One upsert per finished download, on a collection with no index but
``_id``; a submit reads it only when it accepts an older result. Entries
live as long as finished tasks do (TASK_TTL_DAYS); the newest download of
a file replaces the one before.
"""

from __future__ import annotations

from service.model.same_file import KnownFile, file_key
from service.model.task import Task
from service.storage.database import Collections


class KnownFiles:
    def __init__(self, cols: Collections):
        self.files = cols.files

    async def get(self, url: str, algorithms: list[str]) -> KnownFile | None:
        return KnownFile.from_doc(await self.files.find_one({"_id": file_key(url, algorithms)}))

    async def remember(self, task: Task, known: KnownFile) -> None:
        await self.files.replace_one({"_id": file_key(task.url, task.algorithms)},
                                     known.to_doc(), upsert=True)
