"""Hosts in network namespaces, for tests of what the network does to a
service spread over many hosts.

``Network`` is a Linux bridge in the test's own (root) namespace and one
namespace per host, each joined to the bridge by a veth pair. The bridge
has the subnet's last address, so servers the test runs in its own process
(files, mail) are reachable from every host at ``network.gateway``.

Links are cut by poisoning neighbour (ARP) entries: each side of a cut
sends the other's packets to a MAC address nobody has, so they vanish
silently, as in a real partition (no reset, no "unreachable"), while every
other link works. ``heal`` deletes the poisoned entries and ARP finds the
real ones again. netem would be more general but the kernels here lack it.

Everything is undone by ``close``, whatever state a test left: processes
killed, veths, namespaces and the bridge deleted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

NOWHERE = "02:00:00:00:00:01"  # a locally administered MAC that no host has


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns, "ip"] if ns else ["ip"]) + list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def why_not_permitted() -> str | None:
    """None if this process may create network namespaces, else why not."""
    probe = f"md5p{os.getpid()}"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    except FileNotFoundError:
        return "iproute2's ip command is not installed (make installs it)"
    if made.returncode != 0:
        return f"ip netns add is not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Host:
    def __init__(self, network: Network, name: str, address: str):
        self.network, self.name, self.address = network, name, address
        self.ns = f"{network.tag}{name}"
        self.veth = f"v{network.tag}{name}"
        self.procs: list[subprocess.Popen] = []

    def spawn(self, cmd: list[str], env: dict[str, str], log: Path,
              cwd: Path | None = None) -> subprocess.Popen:
        """Run ``cmd`` in this host's namespace (``ip netns exec`` execs it,
        so the pid is the command's own)."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *cmd], env=env, cwd=cwd,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc


class Network:
    def __init__(self, third_octet: int | None = None):
        # Names and subnet from the pid: two runs at once do not collide.
        n = third_octet if third_octet is not None else os.getpid() % 200 + 20
        self.tag = f"m5{os.getpid() % 100000}"
        self.prefix = f"10.77.{n}"
        self.subnet = f"{self.prefix}.0/24"
        self.gateway = f"{self.prefix}.254"
        self.bridge = f"{self.tag}br"
        self.hosts: dict[str, Host] = {}
        self.cuts: set[tuple[str, str]] = set()
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add_host(self, name: str) -> Host:
        host = Host(self, name, f"{self.prefix}.{len(self.hosts) + 1}")
        self.hosts[name] = host
        subprocess.run(["ip", "netns", "add", host.ns], check=True, capture_output=True)
        ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
        ip("link", "set", host.veth, "master", self.bridge, "up")
        ip("addr", "add", f"{host.address}/24", "dev", "eth0", ns=host.ns)
        ip("link", "set", "eth0", "up", ns=host.ns)
        ip("link", "set", "lo", "up", ns=host.ns)
        return host

    # -- links ---------------------------------------------------------------

    def _side(self, name: str) -> tuple[str | None, str, str]:
        """(namespace, device, address) of a host, or of the test's side."""
        if name == "gateway":
            return None, self.bridge, self.gateway
        host = self.hosts[name]
        return host.ns, "eth0", host.address

    def cut(self, a: str, b: str) -> None:
        """Silently drop every packet between ``a`` and ``b`` (host names,
        or "gateway" for the test's own servers)."""
        (ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b) = self._side(a), self._side(b)
        self.cuts.add((a, b))
        ip("neigh", "replace", addr_b, "lladdr", NOWHERE, "dev", dev_a, "nud", "permanent",
           ns=ns_a)
        ip("neigh", "replace", addr_a, "lladdr", NOWHERE, "dev", dev_b, "nud", "permanent",
           ns=ns_b)

    def heal(self, a: str, b: str) -> None:
        (ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b) = self._side(a), self._side(b)
        ip("neigh", "del", addr_b, "dev", dev_a, ns=ns_a, check=False)
        ip("neigh", "del", addr_a, "dev", dev_b, ns=ns_b, check=False)
        self.cuts.discard((a, b))

    def heal_all(self) -> None:
        for a, b in list(self.cuts):
            self.heal(a, b)

    # -- teardown ------------------------------------------------------------

    def close(self) -> None:
        """Undo everything; safe to call in any state, and more than once."""
        procs = [p for host in self.hosts.values() for p in host.procs]
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)  # a stopped one cannot die of TERM
                    proc.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 20
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for host in self.hosts.values():
            ip("link", "del", host.veth, check=False)
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
            host.procs.clear()
        ip("link", "del", self.bridge, check=False)
        self.hosts.clear()
