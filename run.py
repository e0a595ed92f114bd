#!/usr/bin/env python3
"""md5-light: compute the MD5 of files on the web, in the background.

Roles:
  all     (default) the API, a pool of worker processes and, with no
          MONGODB_URI, the embedded database
  api     only the HTTP API (embedded database too, when MONGODB_URI is unset)
  worker  only a worker process (needs MONGODB_URI)
  submit  a client: run.py submit URL [--email E] [--wait] (see run.py submit -h)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from service import config as config_mod
from service import logs


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
        from service import client
        return client.main(argv[1:])
    args = parse_args(argv)
    config = config_mod.load(args)
    logs.setup(config.log_level, config.log_format)
    log = logging.getLogger("md5light")

    if args.role == "worker":
        from service import worker
        if config.embedded:
            raise SystemExit("the worker role needs MONGODB_URI")
        asyncio.run(worker.main(config))
        return 0

    from service import metrics_dir
    metrics_path = metrics_dir.prepare() if args.role == "all" else None

    from service.api import serve
    from service.embedded_db import EmbeddedDatabase

    if config.allow_private_urls:
        log.warning("ALLOW_PRIVATE_URLS is on: tasks may fetch from loopback and private "
                    "networks (only for trusted users)")
    if not config.mail_enabled:
        log.info("SMTP_HOST is not set: mail is off, notifications are recorded as skipped")
    database = None
    uri = config.mongodb_uri
    if config.embedded:
        database = EmbeddedDatabase(config.data_dir)
        uri = database.start()
    workers = config.workers if args.role == "all" else 0
    try:
        asyncio.run(serve(config, uri, workers, database))
    finally:
        if database is not None:
            database.stop()
        if metrics_path:
            metrics_dir.remove(metrics_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
