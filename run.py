#!/usr/bin/env python3
"""md5-light: checksums (MD5, SHA-1/256/512, BLAKE2b) of files on the web, computed
and verified in the background.

Roles:
  all     (default) the API, a pool of worker processes and, with no
          MONGODB_URI, the embedded database
  api     only the HTTP API (embedded database too, when MONGODB_URI is unset)
  worker  only a worker process (needs MONGODB_URI)
  submit  a client: run.py submit URL [--email E] [--sha256] [--expect C] [--wait] (-h)
  check   sha256sum -c for URLs: run.py check SHA256SUMS (see run.py check -h)
  keys    API keys: run.py keys create NAME [--operator] | list | revoke ID
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import TYPE_CHECKING

from service import config as config_mod
from service.runtime import logs

SERVER_SELECTION_MS = 800

if TYPE_CHECKING:
    from service.runtime.embedded_db import EmbeddedDatabase


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run.py", description=__doc__,
        epilog=config_mod.env_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", nargs="?", default="all", choices=["all", "api", "worker"],
                        help="what this process runs (default: all)")
    config_mod.add_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["submit"]:
        from service.cli import submit
        return submit.main(argv[1:])
    if argv[:1] == ["check"]:
        from service.cli import check
        return check.main(argv[1:])
    if argv[:1] == ["keys"]:
        from service.cli import keys
        return keys.main(argv[1:])
    args = parse_args(argv)
    config = config_mod.load(args)
    logs.setup(config.log_level, config.log_format)
    if args.role == "worker":
        from service.runtime import worker_process
        if config.embedded:
            raise SystemExit("the worker role needs MONGODB_URI")
        asyncio.run(worker_process.main(config))
        return 0
    return run_api(config, workers=config.workers if args.role == "all" else 0)


def run_api(config: config_mod.Config, workers: int) -> int:
    """The api and all roles: the embedded database (without MONGODB_URI),
    then the API, then (role all) the worker pool; stopped in reverse."""
    from service.runtime import metrics_dir
    from service.runtime.embedded_db import EmbeddedDatabase

    log = logging.getLogger("md5light")
    # Before prometheus_client is first imported (by the API's modules).
    metrics_path = metrics_dir.prepare() if workers else None
    if config.allow_private_urls:
        log.warning("ALLOW_PRIVATE_URLS is on: tasks may fetch from loopback and private "
                    "networks (only for trusted users)")
    if not config.mail_enabled:
        log.info("SMTP_HOST is not set: mail is off, notifications are recorded as skipped")
    database = (EmbeddedDatabase(config.data_dir, patches=config.embedded_db_patches)
                if config.embedded else None)
    uri = database.start() if database else str(config.mongodb_uri)
    try:
        asyncio.run(serve_api(config, uri, workers, database))
    finally:
        if database is not None:
            database.stop()
        if metrics_path:
            metrics_dir.remove(metrics_path)
    return 0


async def serve_api(config: config_mod.Config, uri: str, workers: int,
                    database: EmbeddedDatabase | None) -> None:
    """The one place the pieces are put together:
    config -> database -> store -> app -> server -> pool."""
    from handlers.app import make_app
    from handlers.base import MAX_BODY
    from service.intake.dispatch import WakeOnly
    from service.live.answers import CheckAnswers
    from service.runtime import metrics
    from service.runtime.connlimit import raise_fd_limit
    from service.runtime.embedded_db import DatabaseSupervisor
    from service.runtime.handoff import Handoff
    from service.runtime.pool import WorkerPool
    from service.runtime.server import ApiProcess, make_server, wait_for_database
    from service.storage.store import open_store

    raise_fd_limit()
    # A batched insert (which runs outside any request's deadline) fails
    # this soon when the database is down, so /submit answers 503 in time.
    store = open_store(config, uri, serverSelectionTimeoutMS=SERVER_SELECTION_MS)
    await wait_for_database(store)
    # What the pool's workers report ending, /check answers from memory.
    answers = CheckAnswers()
    handoff = Handoff(store.queue, store.clock, config.lease_seconds, config.handoff)

    def ended(task_id: str, status: int, body: dict) -> None:
        answers.ended(task_id, status, body)
        store.coalescer.ended(task_id)  # no submit follows it any more

    pool = (WorkerPool(config, uri, workers, on_result=ended, handoff=handoff)
            if workers else None)
    gauges = metrics.DatabaseGauges(store, config.metrics_db_interval)
    app = make_app(config, store, handoff if pool else WakeOnly(lambda: None), gauges=gauges,
                   answers=answers)
    supervisor = None
    if database is not None:
        supervisor = DatabaseSupervisor(database, on_restart=metrics.DATABASE_RESTARTS.inc)
    process = ApiProcess(config, store, make_server(app, config, MAX_BODY), gauges,
                         pool=pool, supervisor=supervisor)
    await process.run()


if __name__ == "__main__":
    sys.exit(main())
