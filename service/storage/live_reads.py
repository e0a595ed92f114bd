"""The reads behind the event streams (``service/live``): the state of
every watched task, or manifest, in one round of queries however many
streams watch them."""

from __future__ import annotations

from service.model.manifest import Manifest
from service.model.task import Status, Task
from service.storage.database import Collections
from service.storage.manifests import running_totals

# Never read for a stream: the owner's address and the client's.
_HIDDEN = {"email": 0, "client": 0}


class LiveReads:
    def __init__(self, cols: Collections):
        self.cols = cols

    async def tasks(self, ids: list[str]) -> dict[str, Task]:
        """The watched tasks, in one query by ``_id``."""
        cursor = self.cols.tasks.find({"_id": {"$in": ids}}, _HIDDEN)
        return {doc["_id"]: Task.from_doc(doc) for doc in await cursor.to_list(None)}

    async def manifests(self, ids: list[str]) -> dict[str, tuple[Manifest, dict[str, int]]]:
        """The watched manifests with their totals: one query for the
        manifests and, if any is unfinished, one for their running lines."""
        docs = await self.cols.manifests.find({"_id": {"$in": ids}},
                                              {"email": 0, "client": 0, "problems": 0}
                                              ).to_list(None)
        manifests = [Manifest.from_doc(doc) for doc in docs]
        open_ids = [m.id for m in manifests if m.totals is None]
        running: dict[str, list[dict]] = {m: [] for m in open_ids}
        if open_ids:
            cursor = self.cols.tasks.find(
                {"manifest": {"$in": open_ids}, "status": str(Status.RUNNING)},
                {"manifest": 1, "bytes_done": 1, "bytes_total": 1})
            for doc in await cursor.to_list(None):
                running[doc["manifest"]].append(doc)
        return {m.id: (m, m.totals if m.totals is not None else running_totals(m, running[m.id]))
                for m in manifests}
