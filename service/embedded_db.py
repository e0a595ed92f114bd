"""The embedded database: SecantusDB's daemon as a child process.

With no MONGODB_URI the service starts ``secantusd-py`` on 127.0.0.1 with
its files in DATA_DIR and talks to it over TCP like to any mongod. The
URI is written to ``DATA_DIR/mongodb.uri`` so that ``make shell`` and other
tools find the running instance.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .procutil import die_with_parent

log = logging.getLogger("md5light.db")

URI_FILE = "mongodb.uri"


def daemon_path() -> str:
    # The venv's bin dir need not be on PATH: look next to the interpreter.
    candidate = Path(sys.executable).parent / "secantusd-py"
    if candidate.exists():
        return str(candidate)
    from shutil import which
    found = which("secantusd-py")
    if not found:
        raise SystemExit("secantusd-py not found: install requirements.txt (make setup)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedDatabase:
    def __init__(self, data_dir: str, port: int | None = None, database: str = "md5light"):
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.database = database
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/{self.database}"

    def start(self, timeout: float = 30.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # An empty config file, passed explicitly, so that no secantusd.toml
        # lying in the working directory or home changes our settings.
        config = self.data_dir / "secantusd.toml"
        if not config.exists():
            config.write_text("# md5-light passes every setting on the command line\n")
        log_file = open(self.data_dir / "secantusd.log", "ab")
        cmd = [daemon_path(), "--config", str(config), "--host", "127.0.0.1",
               "--port", str(self.port), "--storage-path", str(self.data_dir / "db"),
               "--sync-on-commit", "--standalone", "--log-level", "WARNING"]
        self.process = subprocess.Popen(
            cmd, cwd=self.data_dir, stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        log_file.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.data_dir / "secantusd.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"embedded database exited at start (is another md5-light "
                                 f"using {self.data_dir}?):\n{tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            self.stop()
            raise SystemExit("embedded database did not start in time")
        (self.data_dir / URI_FILE).write_text(self.uri + "\n")
        log.info("embedded SecantusDB on %s (data in %s)", self.uri, self.data_dir / "db")
        return self.uri

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("embedded database did not stop in %.0f s; killing it", timeout)
            self.process.kill()
            self.process.wait()
        try:
            (self.data_dir / URI_FILE).unlink()
        except FileNotFoundError:
            pass
        log.info("embedded database stopped")
