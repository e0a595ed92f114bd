"""The API role's process: the HTTP server, and how it starts and stops
together with the worker pool and the embedded database beside it.

Nothing here knows the handlers: run.py, the one wiring place, builds the
Tornado application and hands it in.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from pymongo.errors import PyMongoError
from tornado import web

from service.backoff import Backoff
from service.config import Config
from service.runtime import metrics
from service.runtime.connlimit import LimitedHTTPServer
from service.runtime.embedded_db import DatabaseSupervisor
from service.runtime.framing import JsonErrorHTTPServer
from service.runtime.pool import WorkerPool
from service.storage.store import Store

log = logging.getLogger("md5light.api")

# A database next to ours (a container starting, say) gets this long to come up.
STARTUP_ATTEMPTS = 30
STARTUP_BACKOFF = Backoff(first=0.5, cap=2.0)


class ApiServer(JsonErrorHTTPServer, LimitedHTTPServer):
    """JSON answers to framing errors, and a connection cap per client. In
    this order: the JSON stream replaces Tornado's first, so the cap counts
    the stream that the server later closes."""


def make_server(app: web.Application, config: Config, max_body: int) -> ApiServer:
    return ApiServer(app, idle_connection_timeout=30, body_timeout=30,
                     max_body_size=max_body + 1, max_header_size=256 * 1024,
                     max_connections_per_client=config.max_connections_per_client)


async def wait_for_database(store: Store) -> None:
    """Create the indexes, waiting a while for a database still starting."""
    for attempt in range(1, STARTUP_ATTEMPTS + 1):
        try:
            await store.ensure_indexes()
            return
        except PyMongoError as exc:
            if attempt == STARTUP_ATTEMPTS:
                raise SystemExit(f"cannot reach MongoDB at start: {exc}") from None
            log.warning("waiting for MongoDB (%s)", type(exc).__name__)
            await asyncio.sleep(STARTUP_BACKOFF.delay(attempt))


@dataclass
class ApiProcess:
    """What the API role runs, started in order and stopped in reverse."""
    config: Config
    store: Store
    server: ApiServer
    gauges: metrics.DatabaseGauges
    pool: WorkerPool | None = None
    supervisor: DatabaseSupervisor | None = None

    async def run(self) -> None:
        self.server.listen(self.config.port, self.config.host)
        if self.pool:
            self.pool.start()
        if self.supervisor:
            self.supervisor.start()
        log.info("md5-light API listening on http://%s:%d/ (%d worker processes)",
                 self.config.host, self.config.port, len(self.pool.slots) if self.pool else 0)
        # A first read now: on a database without counters yet it starts the
        # recount, so that the first scrape already has them.
        counts = asyncio.get_running_loop().create_task(self._flush_counts())
        await _until_signalled()
        log.info("shutting down")
        self.server.stop()
        if self.pool:
            await self.pool.stop()
        if self.supervisor:
            # Still watching while the workers drained (they need the
            # database); from here on run.py stops it, and that death is
            # not to be undone.
            await self.supervisor.stop()
        await self.server.close_all_connections()
        counts.cancel()
        try:
            await self.store.counters.flush()
        except PyMongoError:
            log.warning("could not record the last queue counts")
        await self.store.close()

    async def _flush_counts(self) -> None:
        """This process's submits into the shared queue counters, once a
        second (a backstop: each change is written a moment after it
        happens)."""
        await self.gauges.get()
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.store.counters.flush()
            except PyMongoError:
                pass


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
