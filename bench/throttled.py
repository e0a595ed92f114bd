#!/usr/bin/env python3
"""A file server that caps each connection's rate with no burst, for the
segmented-download benchmark: ``python -m bench.throttled ROOT PORT RATE``.

nginx's ``limit_rate`` lets each request send a whole second's worth at
once before it throttles (``limit * (now - start + 1)``), so a client that
makes many short requests beats the cap; a far server's per-connection
limit does not work that way. Here every response is paced from its first
byte. Ranges (one ``bytes=a-b`` or ``bytes=a-``), If-Range, a strong ETag
and Last-Modified, as a static file server sends them.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import sys
import time
from pathlib import Path

from tornado import web
from tornado.iostream import StreamClosedError

STEP = 256 * 1024


class FileHandler(web.RequestHandler):
    def initialize(self, root: Path, rate: float) -> None:
        self.root, self.rate = root, rate

    def compute_etag(self) -> None:
        return None

    async def get(self, name: str) -> None:
        path = self.root / name
        if not path.is_file():
            raise web.HTTPError(404)
        stat = path.stat()
        size = stat.st_size
        etag = f'"{stat.st_mtime_ns:x}-{size:x}"'
        self.set_header("ETag", etag)
        self.set_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
        self.set_header("Accept-Ranges", "bytes")
        first, last = 0, size - 1
        wanted = self.request.headers.get("Range", "")
        if_range = self.request.headers.get("If-Range")
        if wanted.startswith("bytes=") and (if_range is None or if_range == etag):
            a, _, b = wanted[6:].partition("-")
            first, last = int(a), min(int(b) if b else size - 1, size - 1)
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.set_header("Content-Length", str(last - first + 1))
        started, sent = time.monotonic(), 0
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = first
            while offset <= last:
                data = os.pread(fd, min(STEP, last + 1 - offset), offset)
                self.write(data)
                await self.flush()
                offset += len(data)
                sent += len(data)
                ahead = sent / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        except StreamClosedError:
            pass
        finally:
            os.close(fd)


async def main(root: str, port: int, rate: float) -> None:
    app = web.Application([(r"/(.+)", FileHandler, dict(root=Path(root), rate=rate))])
    app.listen(port, "127.0.0.1")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
