"""The API role: the Tornado server in front of the task store, and, in the
'all' role, the worker pool beside it."""

from __future__ import annotations

import asyncio
import logging
import signal

from pymongo.errors import PyMongoError

from handlers.app import make_app
from handlers.base import MAX_BODY

from .config import Config
from .connlimit import LimitedHTTPServer, raise_fd_limit
from .pool import WorkerPool
from .store import TaskStore, connect

log = logging.getLogger("md5light.api")


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


async def serve(config: Config, uri: str, workers: int) -> None:
    raise_fd_limit()
    store = await prepare_store(config, uri, serverSelectionTimeoutMS=2000)
    pool = WorkerPool(config, uri, workers) if workers else None
    app = make_app(config, store, wake=pool.wake if pool else (lambda: None))
    server = LimitedHTTPServer(app, idle_connection_timeout=30, body_timeout=30,
                               max_body_size=MAX_BODY + 1, max_header_size=256 * 1024,
                               max_connections_per_client=config.max_connections_per_client)
    server.listen(config.port, config.host)
    if pool:
        pool.start()
    log.info("md5-light API listening on http://%s:%d/ (%d worker processes)",
             config.host, config.port, workers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    server.stop()
    if pool:
        await pool.stop()
    await server.close_all_connections()
    await store.client.close()
