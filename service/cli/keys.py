"""``run.py keys``: make, list and revoke API keys.

    python run.py keys create NAME [--operator]
    python run.py keys list
    python run.py keys revoke KEY_ID

A key is printed once, when it is made; the database keeps only its hash.
The database is MONGODB_URI's, else the embedded one of DATA_DIR: the
running service's if there is one, else started for the command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Iterator

from service import config as config_mod
from service.model.keys import Role, new_key
from service.storage.database import connect
from service.storage.keys import KeyRecords


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="run.py keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="make a key and print it (once)")
    create.add_argument("name", help="who or what holds the key, for listings")
    create.add_argument("--operator", action="store_true",
                        help="the key sees every task (GET /tasks lists all)")
    commands.add_parser("list", help="the keys, without their secrets")
    revoke = commands.add_parser("revoke", help="a revoked key is refused with 401")
    revoke.add_argument("key_id", help="the id shown by list (the part after md5l_)")
    args = parser.parse_args(argv)
    config = config_mod.load(None)
    with _database(config) as uri:
        return asyncio.run(_run(args, uri))


async def _run(args: argparse.Namespace, uri: str) -> int:
    client = connect(uri, serverSelectionTimeoutMS=5000)
    keys = KeyRecords(client.get_default_database("md5light")["api_keys"])
    try:
        if args.command == "create":
            key, token = new_key(args.name, Role.OPERATOR if args.operator else Role.USER)
            await keys.create(key)
            print(token)
            print(f"key {key.id} ({key.role}) for {key.name!r}: keep it now, it is not "
                  "shown again", file=sys.stderr)
        elif args.command == "list":
            for key in await keys.all():
                view = key.view()
                state = f"revoked {view['revoked_at']}" if view["revoked_at"] else "active"
                print(f"{view['id']}  {view['role']:<8}  {view['created_at']}  {state}  "
                      f"{view['name']}")
        else:
            revoked = await keys.revoke(args.key_id)
            if revoked is None:
                print(f"no key {args.key_id}", file=sys.stderr)
                return 1
            print(f"key {revoked.id} revoked (API processes refuse it within a few seconds)",
                  file=sys.stderr)
        return 0
    finally:
        await client.close()


@contextlib.contextmanager
def _database(config: config_mod.Config) -> Iterator[str]:
    if config.mongodb_uri:
        yield str(config.mongodb_uri)
        return
    from service.runtime.embedded_db import EmbeddedDatabase
    database = EmbeddedDatabase(config.data_dir, patches=config.embedded_db_patches)
    running = database.holder()
    if running and running.startswith("mongodb://"):
        yield running
        return
    uri = database.start()
    try:
        yield uri
    finally:
        database.stop()
