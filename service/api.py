"""The API role: the Tornado server in front of the task store, and, in the
'all' role, the worker pool beside it."""

from __future__ import annotations

import asyncio
import logging
import signal

from pymongo.errors import PyMongoError

from handlers.app import make_app
from handlers.base import MAX_BODY

from . import metrics
from .config import Config
from .framing import JsonErrorHTTPServer
from .embedded_db import DatabaseSupervisor, EmbeddedDatabase
from .connlimit import LimitedHTTPServer, raise_fd_limit
from .pool import WorkerPool
from .store import TaskStore, connect

log = logging.getLogger("md5light.api")


class ApiServer(JsonErrorHTTPServer, LimitedHTTPServer):
    """JSON answers to framing errors, and a connection cap per client. In
    this order: the JSON stream replaces Tornado's first, so the cap counts
    the stream that the server later closes."""


async def prepare_store(config: Config, uri: str, **client_options) -> TaskStore:
    """Connect and create the indexes, waiting a while for a database that is
    still starting (a container next to ours, say)."""
    client = connect(uri, **client_options)
    store = TaskStore(client, max_attempts=config.max_attempts,
                      lease_seconds=config.lease_seconds,
                      idempotency_ttl=config.idempotency_ttl,
                      task_ttl_days=config.task_ttl_days)
    for attempt in range(30):
        try:
            await store.ensure_indexes()
            return store
        except PyMongoError as exc:
            if attempt == 29:
                raise SystemExit(f"cannot reach MongoDB at start: {exc}") from None
            log.warning("waiting for MongoDB (%s)", type(exc).__name__)
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")


async def serve(config: Config, uri: str, workers: int,
                database: EmbeddedDatabase | None = None) -> None:
    raise_fd_limit()
    store = await prepare_store(config, uri, serverSelectionTimeoutMS=2000)
    pool = WorkerPool(config, uri, workers) if workers else None
    gauges = metrics.DatabaseGauges(store, config.metrics_db_interval)
    app = make_app(config, store, wake=pool.wake if pool else (lambda: None), gauges=gauges)
    server = ApiServer(app, idle_connection_timeout=30, body_timeout=30,
                       max_body_size=MAX_BODY + 1, max_header_size=256 * 1024,
                       max_connections_per_client=config.max_connections_per_client)
    server.listen(config.port, config.host)
    if pool:
        pool.start()
    supervisor = None
    if database is not None:
        supervisor = DatabaseSupervisor(database, on_restart=metrics.DATABASE_RESTARTS.inc)
        supervisor.start()
    log.info("md5-light API listening on http://%s:%d/ (%d worker processes)",
             config.host, config.port, workers)
    # A first read now: on a database without counters yet it starts the
    # recount, so that the first scrape already has them.
    counts = asyncio.get_running_loop().create_task(_flush_counts(store, gauges))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    server.stop()
    if pool:
        await pool.stop()
    if supervisor:
        # Still watching while the workers drained (they need the database);
        # from here on run.py stops it, and that death is not to be undone.
        await supervisor.stop()
    await server.close_all_connections()
    counts.cancel()
    try:
        await store.flush_counts()
    except PyMongoError:
        log.warning("could not record the last queue counts")
    await store.client.close()


async def _flush_counts(store: TaskStore, gauges: metrics.DatabaseGauges) -> None:
    """This process's submits into the shared queue counters, once a second
    (a backstop: each change is written a moment after it happens)."""
    await gauges.get()
    while True:
        await asyncio.sleep(1.0)
        try:
            await store.flush_counts()
        except PyMongoError:
            pass
