"""The container image, built and run as users run it (`make test-image`,
not part of `make test`): podman, configured by tests/podman.py from one
cache directory, stands in for Docker; a Debian bookworm made by debootstrap
stands in for python:3.11-slim (no registry is reachable here).

1. The repo's Dockerfile builds on the local base (BASE_IMAGE build argument);
   the image runs as uid 10001, holds only the service's files, no secret.
2. The image's default command, embedded database, a volume for /data:
   a task survives stop/start, and a new read-only container on the volume.
3. docker-compose.yml with tests/docker-compose.test.yml, through
   podman-compose: API, two workers, the database, a file server and a mail
   catcher on the project's own network; submit, check, the mail arrives,
   the workers scale to three, a worker container killed mid-download does
   not lose its task, and the HEALTHCHECK goes unhealthy and back.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from fileserver import md5_of
from podman import ROOT, Podman, PodmanError

from service import config as config_mod

pytestmark = pytest.mark.timeout(900)

IMAGE = "localhost/md5-light:test"
MAIL_IMAGE = "localhost/md5-light-mail:test"
OUT = ROOT / "test-output" / "image"
COMPOSE_FILES = ["docker-compose.yml", "tests/docker-compose.test.yml"]
# The files the Dockerfile copies into /app; nothing else may be there.
APP_FILES = ("requirements.txt", "run.py", "openapi.yaml", "service/", "handlers/")


def say(text: str) -> None:
    """Numbers worth reading in CI's log (make test-image runs pytest -rP)."""
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "summary.txt", "a") as f:
        f.write(text + "\n")


def dev_pin(package: str) -> str:
    for line in (ROOT / "requirements-dev.txt").read_text().splitlines():
        if line.split("==")[0].strip().lower() == package:
            return line.strip()
    return package


def wait_until(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# -- fixtures -------------------------------------------------------------


@pytest.fixture(scope="module")
def podman():
    if os.geteuid() != 0 or not shutil.which("podman") or not shutil.which("debootstrap"):
        pytest.fail("make test-image needs root, podman and debootstrap (the Makefile "
                    "installs them)")
    shutil.rmtree(OUT, ignore_errors=True)
    pm = Podman()
    pm.lock()
    say(f"podman cache: {pm.cache}")
    yield pm
    pm.unlock()


@pytest.fixture(scope="module")
def images(podman):
    """The base (made once per recipe), the image and the mail catcher."""
    started = time.monotonic()
    base = podman.base_image(log=say)
    say(f"base image: {base} ({podman.out('image', 'inspect', '--format', '{{.Size}}', base)}"
        f" bytes), ready in {time.monotonic() - started:.1f} s")
    seconds = podman.build(IMAGE, base)
    size = int(podman.out("image", "inspect", "--format", "{{.Size}}", IMAGE))
    say(f"image {IMAGE}: built in {seconds:.1f} s, {size / 2**20:.0f} MiB")
    # Earlier builds' images, untagged now: the cache keeps only the layers
    # today's images are made of.
    podman("image", "prune", "-f", check=False)
    podman("build", "--format", "docker", "--pull=never", "--layers",
           "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"AIOSMTPD={dev_pin('aiosmtpd')}",
           "-t", MAIL_IMAGE, "-f", str(ROOT / "tests/containers/mailcatcher.Dockerfile"),
           str(ROOT / "tests/containers"), timeout=600)
    return {"base": base, "image": IMAGE, "size": size}


class Session:
    """What one test made (containers, networks, volumes), all removed at
    its end, whatever happened; logs kept in test-output/image/."""

    def __init__(self, podman: Podman, name: str):
        self.podman = podman
        self.project = f"md5t{os.getpid()}{name}"
        self.label = f"md5-light-test={self.project}"
        self.containers: list[str] = []
        self.networks: list[str] = []
        self.volumes: list[str] = []

    def network(self) -> tuple[str, str]:
        """A network of the project's own; (name, subnet)."""
        name = f"{self.project}_default"
        self.networks.append(name)
        self.podman("network", "create", "--label", self.label, name)
        subnet = self.podman.out("network", "inspect", "--format",
                                 "{{range .Subnets}}{{.Subnet}} {{end}}", name).split()[0]
        return name, subnet

    def volume(self, suffix: str) -> str:
        name = f"{self.project}_{suffix}"
        self.volumes.append(name)
        self.podman("volume", "create", "--label", self.label, name)
        return name

    def run(self, name: str, *args: str) -> str:
        full = f"{self.project}_{name}"
        self.containers.append(full)
        self.podman("run", "-d", "--name", full, "--label", self.label, *args)
        return full

    def save_logs(self) -> None:
        OUT.mkdir(parents=True, exist_ok=True)
        names = self.podman.out("ps", "-a", "--format", "{{.Names}}", "--filter",
                                f"label={self.label}", check=False).split()
        names += self.podman.out("ps", "-a", "--format", "{{.Names}}", "--filter",
                                 f"label=io.podman.compose.project={self.project}",
                                 check=False).split()
        for name in set(names):
            proc = self.podman("logs", name, check=False)
            (OUT / f"{name}.log").write_bytes(proc.stdout + proc.stderr)

    def collect_volumes(self) -> None:
        """The image's VOLUME /data gives each container without a volume
        there an anonymous one, which neither `podman rm -v` of a container
        that depends on another nor podman-compose's `down -v` removes: their
        names are noted while the containers exist, removed at the end."""
        for label in (self.label, f"io.podman.compose.project={self.project}"):
            ids = self.podman.out("ps", "-aq", "--filter", f"label={label}",
                                  check=False).split()
            if ids:
                self.volumes += self.podman.out(
                    "inspect", "--format", "{{range .Mounts}}{{.Name}} {{end}}", *ids,
                    check=False).split()

    def cleanup(self) -> None:
        self.save_logs()
        self.collect_volumes()
        vols = list(self.volumes)
        for _ in range(3):  # dependents first; a second pass gets the rest
            ids = []
            for label in (self.label, f"io.podman.compose.project={self.project}"):
                ids += self.podman.out("ps", "-aq", "--filter", f"label={label}",
                                       check=False).split()
            if not ids:
                break
            self.podman("rm", "-f", "-v", "-t", "2", *ids, check=False, timeout=120)
        self.podman("pod", "rm", "-f", f"pod_{self.project}", check=False)
        vols += self.podman.out(
            "volume", "ls", "-q", "--filter", f"label=io.podman.compose.project={self.project}",
            check=False).split()
        for vol in set(vols):
            self.podman("volume", "rm", "-f", vol, check=False)
        for net in self.networks:
            self.podman("network", "rm", "-f", net, check=False)


@pytest.fixture
def session(podman, request):
    s = Session(podman, request.node.name.removeprefix("test_")[:12].replace("_", ""))
    s.cleanup()  # what a killed earlier run of this pid may have left
    yield s
    s.cleanup()


class Api:
    def __init__(self, podman: Podman, container: str):
        port = podman.out("port", container, "8000").rsplit(":", 1)[1]
        self.base = f"http://127.0.0.1:{port}"

    def submit(self, url: str, **data: str) -> str:
        r = requests.post(self.base + "/submit", data={"url": url, **data}, timeout=10)
        assert r.status_code == 202, (r.status_code, r.text)
        return r.json()["id"]

    def check(self, task_id: str) -> requests.Response:
        return requests.get(self.base + "/check", params={"id": task_id}, timeout=10)

    def wait(self, task_id: str, timeout: float = 60) -> dict:
        def ended():
            r = self.check(task_id)
            return r.json() if r.status_code != 202 else None
        return wait_until(ended, timeout, f"task {task_id}", every=0.2)

    def health(self) -> dict | None:
        try:
            return requests.get(self.base + "/health", timeout=5).json()
        except (requests.RequestException, ValueError):
            return None


def logs(podman: Podman, container: str) -> str:
    """What the container wrote (the service logs to stderr)."""
    proc = podman("logs", container, check=False)
    return (proc.stdout + proc.stderr).decode(errors="replace")


def healthy(podman: Podman, container: str) -> bool:
    """One run of the container's HEALTHCHECK (no systemd here to run it
    on its interval): `podman healthcheck run` exits 0 when healthy."""
    return podman("healthcheck", "run", container, check=False, timeout=30).returncode == 0


# -- 1. the image -----------------------------------------------------------


def test_image_builds_on_local_base_and_holds_no_more_than_it_needs(podman, images):
    cfg = podman.out("image", "inspect", "--format",
                     "{{.Config.User}}|{{json .Config.Env}}|{{json .Config.Healthcheck}}"
                     "|{{json .Config.Cmd}}", IMAGE)
    user, env, health, cmd = cfg.split("|")
    assert user == "md5"
    assert '"python","run.py"' in cmd
    assert "127.0.0.1:8000/health" in health, "HEALTHCHECK lost (image not in docker format?)"
    # No secret has a default in the image's environment or its history.
    secret_envs = {f.metadata["env"] for f in config_mod.Config.__dataclass_fields__.values()
                   if f.metadata["secret"]}
    names = set(re.findall(r'"([A-Z_][A-Z0-9_]*)=', env))
    assert not names & secret_envs, names & secret_envs
    assert {"HOST", "PORT", "DATA_DIR"} <= names
    history = podman.out("history", "--no-trunc", "--format", "{{.CreatedBy}}", IMAGE)
    for word in ("PASSWORD", "SECRET", "TOKEN", "MONGODB_URI", "whsec_"):
        assert word not in history.upper().replace("WHSEC_", "whsec_"), word

    # Inside: uid 10001; /app holds exactly what the Dockerfile copies;
    # nothing of /app or the venv is writable by the service; /data is.
    script = (
        "id -u; echo ---; cd /app && find . -type f -not -path '*/__pycache__/*' | sort; "
        "echo ---; find /app /opt/venv -writable | head -5; echo ---; "
        "test -w /data && test -w /data/db && echo data-writable")
    out = podman.out("run", "--rm", "--no-healthcheck", IMAGE, "sh", "-c", script)
    uid, listing, writable, data = (part.strip() for part in out.split("---"))
    assert uid == "10001"
    tracked = subprocess.run(["git", "ls-files", *APP_FILES], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert sorted("./" + p for p in tracked) == listing.split(), \
        "the image's /app differs from the files the Dockerfile means to copy"
    assert writable == "", f"writable by the service: {writable}"
    assert data == "data-writable"
    size = images["size"]
    say(f"image size {size / 2**20:.0f} MiB (base {images['base']})")
    assert size < 400 * 2**20, f"image is {size / 2**20:.0f} MiB"


# -- 2. one container, the embedded database, a volume ----------------------


def test_default_command_keeps_tasks_in_its_volume(podman, images, session):
    network, subnet = session.network()
    data = session.volume("data")
    session.run("files", "--network", network, "--network-alias", "files",
                "--no-healthcheck", "-v", f"{ROOT / 'tests'}:/tests:ro",
                IMAGE, "python", "/tests/fileserver.py", "0.0.0.0", "8080")
    # As in the README: docker run -v md5-data:/data -p 8000:8000 md5-light;
    # plus the test network's subnet, the file server's address being private.
    app = session.run("app", "--network", network, "-v", f"{data}:/data",
                      "-p", "127.0.0.1::8000", "-e", f"ALLOW_NETWORKS={subnet}", IMAGE)
    api = Api(podman, app)
    wait_until(lambda: healthy(podman, app), 90, "the container's HEALTHCHECK")
    assert podman.out("inspect", "--format", "{{.State.Health.Status}}", app) == "healthy"

    size = 3 * 2**20 + 17
    task_id = api.submit(f"http://files:8080/bytes/{size}?seed=7")
    done = api.wait(task_id)
    assert done["status"] == "done" and done["md5"] == md5_of(size, 7), done

    started = time.monotonic()
    podman("stop", "-t", "30", app, timeout=60)
    stop_seconds = time.monotonic() - started
    assert podman.out("inspect", "--format", "{{.State.ExitCode}}", app) == "0"
    podman("start", app)
    api = Api(podman, app)  # a new host port
    wait_until(lambda: healthy(podman, app), 90, "healthy after a restart")
    again = api.check(task_id)
    assert again.status_code == 200 and again.json()["md5"] == done["md5"], again.text

    # A new container on the same volume, its root file system read-only:
    # the service writes only /data (and its metrics in /tmp).
    podman("rm", "-f", "-t", "30", app, timeout=60)
    app2 = session.run("app2", "--network", network, "-v", f"{data}:/data", "--read-only",
                       "--tmpfs", "/tmp", "-p", "127.0.0.1::8000",
                       "-e", f"ALLOW_NETWORKS={subnet}", IMAGE)
    api = Api(podman, app2)
    wait_until(lambda: healthy(podman, app2), 90, "a read-only container's HEALTHCHECK")
    kept = api.check(task_id)
    assert kept.status_code == 200 and kept.json()["md5"] == done["md5"], kept.text
    more = api.wait(api.submit(f"http://files:8080/bytes/{size}?seed=8"))
    assert more["md5"] == md5_of(size, 8), more
    say(f"single container: stopped cleanly in {stop_seconds:.1f} s; task kept across "
        f"stop/start and a new read-only container")


# -- 3. the compose layout ------------------------------------------------------


def compose_command() -> list[str]:
    found = Path(sys.executable).parent / "podman-compose"
    if not found.exists():
        pytest.fail("podman-compose is not installed (requirements-dev.txt)")
    return [str(found)]


class Compose:
    """podman-compose on docker-compose.yml + the test override."""

    def __init__(self, podman: Podman, session: Session, subnet: str):
        self.podman = podman
        self.session = session
        self.env = dict(podman.env, MD5_LIGHT_IMAGE=IMAGE, MD5_MAIL_IMAGE=MAIL_IMAGE,
                        MD5_TEST_SUBNET=subnet)

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        files = [a for f in COMPOSE_FILES for a in ("-f", f)]
        # No pod: each service its own container on the project's network,
        # as with docker compose.
        cmd = [*compose_command(), "--in-pod", "false", "-p", self.session.project,
               *files, *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True,
                              timeout=timeout)
        OUT.mkdir(parents=True, exist_ok=True)
        with open(OUT / "podman-compose.log", "ab") as f:
            f.write(f"$ {' '.join(cmd)}\n".encode() + proc.stdout + proc.stderr)
        if check and proc.returncode != 0:
            raise PodmanError(f"podman-compose {' '.join(args)} exited {proc.returncode}:\n"
                              f"{proc.stderr.decode(errors='replace')[-3000:]}")
        return proc.stdout.decode()

    def containers(self, service: str, running: bool = True) -> list[str]:
        args = ["ps", "--format", "{{.Names}}", "--filter",
                f"label=io.podman.compose.project={self.session.project}",
                "--filter", f"label=com.docker.compose.service={service}"]
        if not running:
            args.insert(1, "-a")
        return sorted(self.podman.out(*args).split())


def mailbox(podman: Podman, volume: str) -> list[email.message.EmailMessage]:
    path = Path(podman.out("volume", "inspect", "--format", "{{.Mountpoint}}", volume))
    return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
            for p in sorted((path / "new").glob("*"))]


def test_compose_layout_scales_and_survives_a_killed_worker(podman, images, session):
    # The project's network is made first, so that its subnet can go to
    # ALLOW_NETWORKS; podman-compose then uses it (it is <project>_default).
    _network, subnet = session.network()
    compose = Compose(podman, session, subnet)
    started = time.monotonic()
    compose("up", "-d")
    (mongo,) = compose.containers("mongo")
    (app,) = compose.containers("app")
    assert len(compose.containers("worker")) == 1
    # podman-compose on podman 4.3 cannot wait for "service_healthy" (it
    # says so); the services retry the database until it answers. The
    # database's and the API's healthchecks are run here instead.
    wait_until(lambda: healthy(podman, mongo), 60, "the database container's healthcheck")
    wait_until(lambda: healthy(podman, app), 90, "the API container's HEALTHCHECK")
    say(f"compose up: healthy in {time.monotonic() - started:.1f} s")
    api = Api(podman, app)

    # Two workers (docker compose up --scale worker=2), then a submit with mail.
    compose("up", "-d", "--scale", "worker=2")
    assert len(compose.containers("worker")) == 2
    wait_until(lambda: (api.health() or {}).get("workers") == 2, 60, "two live workers")
    size = 2 * 2**20 + 5
    task_id = api.submit(f"http://files:8080/bytes/{size}?seed=3", email="user@example.com")
    done = api.wait(task_id)
    assert done["status"] == "done" and done["md5"] == md5_of(size, 3), done
    mail_volume = f"{session.project}_mail"
    messages = wait_until(lambda: [m for m in mailbox(podman, mail_volume)
                                   if m["X-md5-light-Task"] == task_id], 60, "the mail")
    (msg,) = messages
    assert msg["To"] == "user@example.com"
    assert done["md5"] in msg.get_body().get_content()

    # Scale to three; every one heartbeats.
    compose("up", "-d", "--scale", "worker=3")
    workers = compose.containers("worker")
    assert len(workers) == 3, workers
    wait_until(lambda: (api.health() or {}).get("workers") == 3, 60, "three live workers")

    # A slow download (8 MiB over about 12 s); the worker container that
    # claimed it is killed mid-way. Another one finishes it, right md5.
    size = 8 * 2**20
    slow = api.submit(f"http://files:8080/slow/{size}?parts=48&delay=0.25&seed=5")

    def claimer() -> str | None:
        for name in workers:
            if f"task {slow} started attempt" in logs(podman, name):
                return name
        return None

    victim = wait_until(claimer, 30, "a worker to start the slow download", every=0.2)
    time.sleep(2)
    assert api.check(slow).status_code == 202, "the download should still be running"
    podman("kill", victim)
    killed_at = time.monotonic()
    assert victim not in compose.containers("worker")
    ended = api.wait(slow, timeout=90)
    assert ended["status"] == "done" and ended["md5"] == md5_of(size, 5), ended
    finisher = [name for name in workers if name != victim
                and f"task {slow} started attempt" in logs(podman, name)]
    assert finisher, "no other worker took the task over"
    say(f"worker {victim} killed mid-download; {finisher[0]} finished the task "
        f"{time.monotonic() - killed_at:.1f} s later with the right md5")
    # A killed container is not restarted (restart: unless-stopped honours
    # an explicit kill, as Docker's does).
    assert podman.out("inspect", "--format", "{{.State.Status}}", victim) in ("exited",
                                                                              "stopped")

    # The HEALTHCHECK reports what /health sees: the database stopped is
    # unhealthy, started again is healthy.
    podman("stop", "-t", "10", mongo, timeout=60)
    wait_until(lambda: not healthy(podman, app)
               and podman.out("inspect", "--format", "{{.State.Health.Status}}", app)
               == "unhealthy", 60, "unhealthy without the database")
    podman("start", mongo)
    wait_until(lambda: healthy(podman, app), 60, "healthy again with the database back")
    after = api.wait(api.submit(f"http://files:8080/bytes/{size}?seed=6"))
    assert after["md5"] == md5_of(size, 6), after

    session.collect_volumes()
    # docker compose down -v. podman-compose removes the replicas its file
    # declares (one worker); the test's cleanup removes what it leaves.
    compose("down", "-v", "-t", "10", check=False)
    left = podman.out("ps", "-a", "--format", "{{.Names}}", "--filter",
                      f"label=io.podman.compose.project={session.project}")
    say(f"podman-compose down left: {' '.join(left.split()) or 'nothing'}")
