"""Which addresses the fetcher may connect to.

The check runs on the addresses a name actually resolves to, inside the
Resolver that AsyncHTTPClient connects through, so the address checked is
the address used (no DNS-rebinding gap) and every redirect hop is checked
again. Submit-time checks only catch IP literals early, for a clearer 400.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Iterable

from tornado.netutil import DefaultLoopResolver, Resolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_EXTRA_BLOCKED = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24", "198.18.0.0/15", "224.0.0.0/4",
    "240.0.0.0/4", "255.255.255.255/32", "fc00::/7", "fe80::/10", "ff00::/8", "::/128",
    "::1/128")]
_NAT64 = [ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48")]


class BlockedAddress(Exception):
    """The URL leads to an address that the policy forbids."""

    def __init__(self, host: str, address: str):
        where = host if host == address else f"{host} resolves to {address}, which"
        super().__init__(f"{where} is a private or reserved address "
                         "that this service does not fetch from")
        self.host = host
        self.address = address


class UnresolvableHost(Exception):
    """DNS has no address for a host (of the URL or of a redirect)."""

    def __init__(self, host: str, transient: bool):
        super().__init__(f"could not resolve host {host}")
        self.host = host
        self.transient = transient


class InvalidHostName(Exception):
    """A host name that cannot even be looked up (an IDNA encoding error)."""

    def __init__(self, host: str):
        super().__init__(f"{host[:100]!r} is not a valid host name")
        self.host = host


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if any (mapped, NAT64, 6to4)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def is_public(ip: IPAddress) -> bool:
    inner = embedded_ipv4(ip)
    if inner is not None:
        return is_public(inner)
    if any(ip in net for net in _EXTRA_BLOCKED if net.version == ip.version):
        return False
    return ip.is_global and not ip.is_multicast


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a URL host names directly, in any spelling the C library
    accepts: 127.0.0.1, 2130706433, 0x7f.1, 0177.0.0.1, 127.1, [::1]."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefxABCDEFX." for c in host) and any(
            c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


class AddressPolicy:
    def __init__(self, allow_private: bool = False, allow_networks: Iterable[str] = ()):
        self.allow_private = allow_private
        self.allow_networks = [ipaddress.ip_network(n, strict=False) for n in allow_networks]

    def allows(self, ip: IPAddress) -> bool:
        if self.allow_private:
            return True
        ip = embedded_ipv4(ip) or ip
        if any(ip.version == net.version and ip in net for net in self.allow_networks):
            return True
        return is_public(ip)


class FilteringResolver(Resolver):
    """Resolves like the default resolver, then drops every address the
    policy forbids; if none is left the connection is refused."""

    def initialize(self, policy: AddressPolicy, overrides: dict[str, str] | None = None,
                   resolver: Resolver | None = None) -> None:
        self.policy = policy
        self.overrides = overrides or {}
        self.resolver = resolver or DefaultLoopResolver()

    def close(self) -> None:
        self.resolver.close()

    async def resolve(self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC):
        host = readable_host(host)
        target = self.overrides.get(host.lower(), host)
        try:
            target = target.encode("idna").decode("ascii")
            answers = await self.resolver.resolve(target, port, family)
        except UnicodeError:
            raise InvalidHostName(host) from None
        except socket.gaierror as exc:
            # Raised here, the host is named: a redirect's host, too.
            raise UnresolvableHost(host, exc.errno == socket.EAI_AGAIN) from None
        allowed = []
        first_blocked = None
        for fam, addr in answers:
            ip = ipaddress.ip_address(addr[0].split("%")[0])
            if self.policy.allows(ip):
                allowed.append((fam, addr))
            elif first_blocked is None:
                first_blocked = str(ip)
        if not allowed:
            raise BlockedAddress(host, first_blocked or "nothing")
        return allowed


def readable_host(host: str) -> str:
    """The host as its sender meant it. Tornado reads a Location header as
    Latin-1, so an internationalized name in UTF-8 arrives garbled."""
    if host.isascii():
        return host
    try:
        return host.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return host


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    out = {}
    for item in items:
        host, _, addr = item.partition("=")
        out[host.strip().lower()] = addr.strip()
    return out
