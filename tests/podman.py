"""Podman for the image tests (tests/test_image.py, `make test-image`),
configured entirely from one cache directory: no file of the machine's own
(/etc/containers, /var/lib/containers, /etc/cni) is read for settings or
written. The directory keeps podman's image store, so the base image and
the build's layers survive from one run to the next.

    <cache>/containers.conf   default_ulimits = [], runc, cgroupfs, file events
    <cache>/storage.conf      overlay store in <cache>/storage
    <cache>/storage, run, tmp, volumes, networks, events.log
    <cache>/varlib            what builds write under /var/lib (see below)
    <cache>/lock              one test-image run at a time per cache

One thing has no setting: a build's commit records blobs in
/var/lib/containers/cache/blob-info-cache-v1.boltdb, a path fixed for root
(containers/common#682). Builds and imports therefore run in a private
mount namespace in which /var/lib is an overlay whose writes land in
<cache>/varlib: the machine's /var/lib is read, never written.

The base image is a minimal Debian bookworm (Python 3.11) made by
debootstrap from this machine's own Debian mirror and imported as an image,
keyed by a hash of what goes into it: it stands in for python:3.11-slim,
which no registry here can give. The Dockerfile takes it as BASE_IMAGE.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path.home() / ".cache" / "md5-light" / "podman"

# What the base image is made of; a change to any of it makes a new one.
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
BASE_RECIPE = "2"  # bump to force a new base image
# Machine's CA bundle: the package index is reached through it here.
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BASE_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG=C.UTF-8")


class PodmanError(RuntimeError):
    pass


def debian_mirror() -> str:
    """The Debian mirror of this machine's apt sources (deb822 or one-line)."""
    if os.environ.get("DEBIAN_MIRROR"):
        return os.environ["DEBIAN_MIRROR"]
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources:
        for stanza in path.read_text().split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and BASE_SUITE in suites.group(1).split():
                return uris.group(1)
    lists = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]
    for path in lists:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+" + BASE_SUITE + r"\s", line)
            if m:
                return m.group(1)
    return "http://deb.debian.org/debian"


class Podman:
    """``podman`` with this cache's configuration; ``podman(args...)``."""

    def __init__(self, cache: Path | None = None):
        self.cache = Path(cache or os.environ.get("MD5_IMAGE_CACHE") or DEFAULT_CACHE)
        self.cache.mkdir(parents=True, exist_ok=True)
        self._lock_file = None
        self.env = dict(os.environ)
        self.env.update({
            "CONTAINERS_CONF": str(self.cache / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.cache / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(self.cache / "registries.conf"),
        })
        self._write_config()

    # -- configuration ------------------------------------------------------

    def _write_config(self) -> None:
        c = self.cache
        for sub in ("storage", "run", "tmp", "volumes", "networks", "libpod",
                    "varlib/upper", "varlib/work"):
            (c / sub).mkdir(parents=True, exist_ok=True)
        (c / "containers.conf").write_text(f"""\
# Written by tests/podman.py for make test-image; read via CONTAINERS_CONF.
[containers]
default_ulimits = []
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{c}/events.log"
tmp_dir = "{c}/tmp"
static_dir = "{c}/libpod"
volume_path = "{c}/volumes"

[network]
network_backend = "netavark"
network_config_dir = "{c}/networks"
""")
        (c / "storage.conf").write_text(f"""\
# Written by tests/podman.py; read via CONTAINERS_STORAGE_CONF.
[storage]
driver = "overlay"
graphroot = "{c}/storage"
runroot = "{c}/run"
""")
        # Nothing is ever pulled: no registry is reachable here.
        (c / "registries.conf").write_text("unqualified-search-registries = []\n")

    def lock(self) -> None:
        """One test-image per cache at a time; after a reboot, forget the
        previous boot's runtime state (it lives on disk here, not in /run)."""
        self._lock_file = open(self.cache / "lock", "w")
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        marker = self.cache / "boot_id"
        if marker.exists() and marker.read_text().strip() != boot_id:
            for sub in ("run", "tmp"):
                shutil.rmtree(self.cache / sub, ignore_errors=True)
                (self.cache / sub).mkdir()
        marker.write_text(boot_id + "\n")

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- running podman -----------------------------------------------------

    def command(self, *args: str) -> list[str]:
        return ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs", *args]

    def isolated(self, *args: str) -> list[str]:
        """podman with /var/lib overlaid (writes go to <cache>/varlib), for
        the commands that would write there: build, import."""
        varlib = self.cache / "varlib"
        mount = (f"mount -t overlay overlay -o lowerdir=/var/lib,upperdir={varlib}/upper,"
                 f"workdir={varlib}/work /var/lib")
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                mount + ' && exec "$@"', "sh", *self.command(*args)]

    def __call__(self, *args: str, check: bool = True, timeout: float = 120,
                 input: bytes | None = None) -> subprocess.CompletedProcess:
        command = self.isolated(*args) if args[0] in ("build", "import") else \
            self.command(*args)
        proc = subprocess.run(command, env=self.env, capture_output=True,
                              timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise PodmanError(f"podman {' '.join(args)} exited {proc.returncode}:\n"
                              f"{proc.stderr.decode(errors='replace')[-3000:]}")
        return proc

    def out(self, *args: str, **kwargs) -> str:
        return self(*args, **kwargs).stdout.decode().strip()

    def image_exists(self, name: str) -> bool:
        return self("image", "exists", name, check=False).returncode == 0

    # -- images -------------------------------------------------------------

    def base_key(self) -> str:
        h = hashlib.sha256()
        h.update(f"{BASE_SUITE} {' '.join(BASE_PACKAGES)} {BASE_RECIPE} {BASE_ENV}".encode())
        h.update(CA_BUNDLE.read_bytes() if CA_BUNDLE.exists() else b"")
        return h.hexdigest()[:12]

    def base_image(self, log=print) -> str:
        """localhost/md5-light-base:bookworm-<key>, made once per key."""
        name = f"localhost/md5-light-base:{BASE_SUITE}-{self.base_key()}"
        if self.image_exists(name):
            return name
        mirror = debian_mirror()
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=self.cache / "tmp", prefix="debootstrap-") as tmp:
            root = Path(tmp) / "root"
            cmd = ["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
                   BASE_SUITE, str(root), mirror]
            log(f"base image: {' '.join(cmd)}")
            proc = subprocess.run(cmd, capture_output=True, timeout=900)
            if proc.returncode != 0:
                raise PodmanError(f"debootstrap failed:\n{proc.stdout.decode()[-3000:]}"
                                  f"{proc.stderr.decode()[-2000:]}")
            # The machine's CA bundle (its package-index route needs it);
            # no apt lists, packages, manuals or translations.
            if CA_BUNDLE.exists():
                shutil.copyfile(CA_BUNDLE, root / "etc/ssl/certs/ca-certificates.crt")
            for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc",
                        "usr/share/man", "usr/share/locale", "usr/share/info"):
                for entry in (root / sub).glob("*"):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    elif entry.name != "lock":
                        entry.unlink()
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."],
                                   stdout=subprocess.PIPE)
            changes: list[str] = []
            for env in BASE_ENV:
                changes += ["--change", f"ENV {env}"]
            changes += ["--change", 'CMD ["python3"]']
            proc = subprocess.run(self.isolated("import", *changes, "-", name),
                                  stdin=tar.stdout, env=self.env, capture_output=True,
                                  timeout=600)
            tar.wait()
            if proc.returncode != 0 or tar.returncode != 0:
                raise PodmanError(f"podman import failed: {proc.stderr.decode()[-2000:]}")
        log(f"base image {name} made in {time.monotonic() - started:.0f} s "
            f"from {mirror}")
        return name

    def build(self, tag: str, base: str, context: Path = ROOT,
              dockerfile: str = "Dockerfile", timeout: float = 900) -> float:
        """Build the Dockerfile on ``base``; the seconds it took. Docker
        format: OCI images drop HEALTHCHECK."""
        started = time.monotonic()
        self("build", "--format", "docker", "--pull=never", "--layers",
             "--build-arg", f"BASE_IMAGE={base}", "-t", tag, "-f",
             str(context / dockerfile), str(context), timeout=timeout)
        return time.monotonic() - started
