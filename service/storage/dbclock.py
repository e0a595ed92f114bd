"""The database's clock, as one process best knows it.

Leases are times, and workers on many hosts compare them: with each
host's own clock, a worker whose clock runs 30 s ahead would see every
lease as expired 30 s early and take tasks that are still held. So the
database's clock decides.

Where an update sets a time, it uses the server's ``$$NOW`` in an update
pipeline (storage.queue). Filters cannot: SecantusDB evaluates ``$$NOW``
inside ``$expr`` of a query to nothing, so ``{$expr: {$lt: ["$lease_until",
"$$NOW"]}}`` silently matches no document (probed on secantusdb; MongoDB
itself would match). A filter therefore compares with this clock: the local
clock plus an offset measured against the server's ``hello.localTime``,
refreshed at every worker heartbeat. Its error is about half a round trip.
"""

from __future__ import annotations

import datetime as dt
import logging

from pymongo.asynchronous.database import AsyncDatabase

from service.model.task import utcnow

log = logging.getLogger("md5light.clock")

# An offset this large is worth a line in the log: a host clock this far
# off breaks other things (TLS, logs) too.
_WORTH_SAYING = dt.timedelta(seconds=2)


class DatabaseClock:
    def __init__(self, db: AsyncDatabase):
        self.db = db
        self.offset = dt.timedelta(0)
        self._said = False

    def now(self) -> dt.datetime:
        """The database's time now (millisecond precision, like BSON)."""
        now = utcnow() + self.offset
        return now.replace(microsecond=now.microsecond // 1000 * 1000)

    async def sync(self) -> None:
        """Measure the offset again; raises PyMongoError if the database
        does not answer (the old offset is kept)."""
        before = utcnow()
        reply = await self.db.command("hello")
        after = utcnow()
        server = reply.get("localTime")
        if not isinstance(server, dt.datetime):
            return  # a server that does not say: keep the local clock
        if server.tzinfo is None:
            server = server.replace(tzinfo=dt.UTC)
        self.offset = server - (before + (after - before) / 2)
        if abs(self.offset) > _WORTH_SAYING and not self._said:
            self._said = True
            log.warning("this host's clock is %.1f s off the database's; leases follow the "
                        "database's", -self.offset.total_seconds())
