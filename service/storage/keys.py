"""The API keys collection (``api_keys``): made, listed and revoked by
``run.py keys``, read by the API on each keyed request."""

from __future__ import annotations

from pymongo.asynchronous.collection import AsyncCollection

from service.model.keys import ApiKey
from service.model.task import utcnow


class KeyRecords:
    def __init__(self, collection: AsyncCollection):
        self.collection = collection

    async def create(self, key: ApiKey) -> None:
        await self.collection.insert_one(key.to_doc())

    async def get(self, key_id: str) -> ApiKey | None:
        doc = await self.collection.find_one({"_id": key_id})
        return ApiKey.from_doc(doc) if doc else None

    async def all(self) -> list[ApiKey]:
        docs = await self.collection.find({}).sort("created_at", 1).to_list(None)
        return [ApiKey.from_doc(d) for d in docs]

    async def revoke(self, key_id: str) -> ApiKey | None:
        """Revoke the key (again: no change); None if there is no such key."""
        await self.collection.update_one({"_id": key_id, "revoked_at": None},
                                         {"$set": {"revoked_at": utcnow()}})
        return await self.get(key_id)

    async def any_made(self) -> bool:
        """Whether a key was ever made (revoked ones count)."""
        return await self.collection.find_one({}, {"_id": 1}) is not None
