"""The embedded database: SecantusDB's daemon as a child process.

With no MONGODB_URI the service starts ``secantusd-py`` on 127.0.0.1 with
its files in DATA_DIR and talks to it over TCP like to any mongod. The
URI is written to ``DATA_DIR/mongodb.uri`` so that ``make shell`` and other
tools find the running instance.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from service.backoff import Backoff
from service.runtime.procutil import die_with_parent

log = logging.getLogger("md5light.db")

URI_FILE = "mongodb.uri"

# A database that dies sooner than this after its start died "quickly":
# restarting it at once would only spin.
QUICK_DEATH = 10.0
# Restarts after quick deaths in a row wait longer each time.
RESTART_BACKOFF = Backoff(first=1.0, cap=30.0)


class StartError(RuntimeError):
    """The daemon would not start (data dir held by another process, port
    taken, broken install); the message says which and shows its log."""


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
    def __init__(self, data_dir: str, port: int | None = None, database: str = "md5light",
                 patches: bool = True):
        self.data_dir = Path(data_dir).resolve()
        self.patches = patches
        self.port = port or free_port()
        self.database = database
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/{self.database}"

    def _program(self) -> list[str]:
        """The daemon itself, or this interpreter running it with the
        write-path fixes of embedded_patches (which checks the version)."""
        daemon = daemon_path()  # also says what to do when it is not installed
        if not self.patches:
            return [daemon]
        return [sys.executable, str(Path(__file__).with_name("embedded_patches.py"))]

    def start(self, timeout: float = 30.0) -> str:
        try:
            return self.launch(timeout)
        except StartError as exc:
            raise SystemExit(str(exc)) from None

    def launch(self, timeout: float = 30.0) -> str:
        """Start the daemon on ``self.port`` and wait until it accepts
        connections; StartError if it will not. Blocking: the supervisor
        calls it from a thread."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # An empty config file, passed explicitly, so that no secantusd.toml
        # lying in the working directory or home changes our settings.
        config = self.data_dir / "secantusd.toml"
        if not config.exists():
            config.write_text("# md5-light passes every setting on the command line\n")
        log_file = open(self.data_dir / "secantusd.log", "ab")
        cmd = [*self._program(), "--config", str(config), "--host", "127.0.0.1",
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
                raise StartError(f"embedded database exited at start (is another md5-light "
                                 f"using {self.data_dir}?):\n{tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            self.stop()
            raise StartError("embedded database did not start in time")
        self.started_at = time.monotonic()
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

    def holder(self) -> str | None:
        """Who else serves this data dir or port, if anyone: the URI another
        md5-light left in ``mongodb.uri`` (while it answers), or our own port
        answering although our daemon is dead."""
        try:
            recorded = (self.data_dir / URI_FILE).read_text().strip()
        except OSError:
            recorded = ""
        if recorded and recorded != self.uri and _answers(recorded):
            return recorded
        if _answers(self.uri):
            return f"another process on port {self.port}"
        return None


def _answers(uri: str) -> bool:
    match = re.match(r"mongodb://([^/:]+):(\d+)", uri)
    if not match:
        return False
    try:
        with socket.create_connection((match.group(1), int(match.group(2))), timeout=0.5):
            return True
    except OSError:
        return False


class DatabaseSupervisor:
    """Restarts the embedded database when it dies, as the pool restarts
    workers: same data dir and port (so every client reconnects by itself),
    at once after a first death, with a growing delay when it keeps dying.
    Acknowledged writes survive (the daemon syncs on every commit).

    It never touches a database it did not start: when another md5-light
    has taken the data dir, or something else our port, it waits and says
    so instead of starting a rival daemon.
    """

    def __init__(self, database: EmbeddedDatabase,
                 on_restart: Callable[[], None] = lambda: None, check_every: float = 0.2):
        self.database = database
        self.on_restart = on_restart
        self.check_every = check_every
        self.quick_deaths = 0
        self.stopping = False
        self._task: asyncio.Task | None = None
        self._launching: asyncio.Future | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        """Stop watching; a restart under way completes first, so that the
        caller's ``database.stop()`` sees (and stops) the process it made."""
        self.stopping = True
        if self._launching is not None:
            await asyncio.gather(asyncio.shield(self._launching), return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while not self.stopping:
            await asyncio.sleep(self.check_every)
            proc = self.database.process
            if self.stopping or proc is None or proc.poll() is None:
                continue
            delay = self._backoff()
            log.error("embedded database (pid %d) exited with %s; restarting in %.1f s",
                      proc.pid, proc.returncode, delay)
            await asyncio.sleep(delay)
            while not self.stopping and not await self._restart():
                await asyncio.sleep(self._backoff())

    def _backoff(self) -> float:
        lived = time.monotonic() - self.database.started_at
        self.quick_deaths = self.quick_deaths + 1 if lived < QUICK_DEATH else 0
        return RESTART_BACKOFF.delay(self.quick_deaths)

    async def _restart(self) -> bool:
        holder = await asyncio.to_thread(self.database.holder)
        if holder is not None:
            log.error("not restarting the embedded database: %s now serves %s",
                      holder, self.database.data_dir)
            self.database.started_at = time.monotonic()
            return False
        self._launching = asyncio.ensure_future(asyncio.to_thread(self.database.launch))
        try:
            await asyncio.shield(self._launching)
        except StartError as exc:
            log.error("embedded database did not restart: %s", exc)
            self.database.started_at = time.monotonic()
            return False
        finally:
            self._launching = None
        self.on_restart()
        process = self.database.process
        log.warning("embedded database restarted (pid %s) on %s",
                    process.pid if process else "?", self.database.uri)
        return True
