"""A raw HTTP file server that sends slowly and records what each client
did: how many requests per key, when each opened, when a client hung up
before the end (a cancelled or abandoned download)."""

from __future__ import annotations

import select
import socket
import threading
import time


class SlowFiles:
    """A raw HTTP server on 127.0.0.1: GET /<key>/<size>/<seconds> sends
    <size> bytes spread over <seconds>, and records per key how many
    requests came and when the client closed the connection early."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.hits: dict[str, int] = {}
        self.opened: dict[str, float] = {}
        self.closed: dict[str, float] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, key: str, size: int = 1000, seconds: float = 0.0) -> str:
        return f"http://127.0.0.1:{self.port}/{key}/{size}/{seconds}"

    def _accept(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(4096)
                if not data:
                    return
                head += data
            key, size, seconds = head.split(b" ")[1].decode().strip("/").split("/")
            n, total = int(size), float(seconds)
            with self.lock:
                self.hits[key] = self.hits.get(key, 0) + 1
                self.opened[key] = time.monotonic()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
            # 10 pieces a second: fast enough for the idle watchdog (1 KiB
            # per IDLE_TIMEOUT), slow enough to be cancelled midway.
            pieces = max(1, int(total * 10))
            step = -(-n // pieces)
            for i in range(0, n, step):
                try:
                    conn.sendall(b"x" * min(step, n - i))
                except OSError:
                    self._closed(key)
                    return
                if total and select.select([conn], [], [], total / pieces)[0]:
                    if not conn.recv(1):  # end of file: the client hung up
                        self._closed(key)
                        return

    def _closed(self, key: str) -> None:
        with self.lock:
            self.closed[key] = time.monotonic()
