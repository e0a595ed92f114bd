"""Which addresses the fetcher may connect to.

The check runs on the addresses a name actually resolves to, inside the
Resolver that AsyncHTTPClient connects through, so the address checked is
the address used (no DNS-rebinding gap) and every redirect hop is checked
again. Submit-time checks only catch IP literals early, for a clearer 400.
"""

from __future__ import annotations

import contextvars
import ipaddress
import socket
from collections.abc import Iterable

from tornado.netutil import DefaultLoopResolver, Resolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _networks(*cidrs: str) -> tuple:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# Default deny. IPv4 must be global in ipaddress's copy of the IANA
# special-purpose registry, and also outside these ranges, which it counts
# as global but no web server lives in: "this network", CGNAT, IETF
# protocol assignments, the deprecated 6to4 relay anycast, benchmarking,
# multicast, reserved and broadcast.
_BLOCKED_V4 = _networks(
    "0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24", "192.88.99.0/24", "198.18.0.0/15",
    "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32")
# IPv6 must be in the global unicast space IANA allocates from (2000::/3),
# which leaves out ::/8 (unspecified, loopback, IPv4-compatible ::/96,
# IPv4-mapped, SIIT ::ffff:0:0:0/96, local-use NAT64 64:ff9b:1::/48, ::2),
# 100::/64 discard, 5f00::/16 SRv6, fc00::/7, fe80::/10, fec0::/10 and
# ff00::/8. Within 2000::/3 these are not web servers either: the IETF
# protocol block (Teredo 2001::/32, which tunnels to an IPv4 address,
# ORCHIDs, benchmarking, anycast services), both documentation ranges, and
# 6to4 2002::/16 (deprecated by RFC 7526; it reaches the IPv4 address it
# embeds through whichever relay answers, and a name with a 6to4 address
# still has its IPv4 one).
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
_BLOCKED_V6 = _networks("2001::/23", "2001:db8::/32", "2002::/16", "3fff::/20")
# The one IPv6 form outside 2000::/3 that reaches the internet: the
# well-known NAT64 prefix, whose translator connects to the IPv4 address
# in its last 32 bits (RFC 6052).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_COMPAT = ipaddress.ip_network("::/96")
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")


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


def _low32(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)


def translated_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 host a connection to this IPv6 address ends at: IPv4-mapped
    (the kernel connects over IPv4) and well-known NAT64 (the translator
    does)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return _low32(ip)
    return None


def embedded_ipv4s(ip: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """Every IPv4 address an IPv6 address carries: mapped, NAT64, compatible,
    SIIT, 6to4, and both of Teredo's (server and client)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return ()
    translated = translated_ipv4(ip)
    if translated is not None:
        return (translated,)
    if ip in _COMPAT or ip in _SIIT:
        return (_low32(ip),)
    if ip.sixtofour is not None:
        return (ip.sixtofour,)
    if ip.teredo is not None:
        return ip.teredo
    return ()


def is_public(ip: IPAddress) -> bool:
    """Globally routable unicast, and so is every IPv4 address inside it."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip.is_global and not ip.is_multicast and not _within(ip, _BLOCKED_V4)
    translated = translated_ipv4(ip)
    if translated is not None:
        return is_public(translated)
    if ip not in _GLOBAL_UNICAST_V6 or _within(ip, _BLOCKED_V6) or not ip.is_global:
        return False
    return all(is_public(inner) for inner in embedded_ipv4s(ip))


def _within(ip: IPAddress, networks: Iterable) -> bool:
    return any(ip.version == net.version and ip in net for net in networks)


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
        # An allowed IPv4 network is allowed in the IPv6 spellings that
        # connect to it (mapped, NAT64); tunnel forms (6to4, Teredo, SIIT,
        # compatible) are not, as the host they reach is not the one named.
        if _within(ip, self.allow_networks):
            return True
        translated = translated_ipv4(ip)
        if translated is not None and _within(translated, self.allow_networks):
            return True
        return is_public(ip)


# Where a segmented download's further connections go: the address its
# first request connected to, by host (set around those requests only).
PINNED: contextvars.ContextVar[dict[str, tuple[int, str]] | None] = contextvars.ContextVar(
    "md5light_pinned", default=None)


def pin(pins: dict[str, tuple[int, str]], host: str | None, stream) -> None:
    """Record the address ``stream`` connected to as ``host``'s, unless one
    is already: the further connections of a download go there too."""
    if not host or stream.socket is None:
        return
    try:
        peer = stream.socket.getpeername()[0]
    except OSError:
        return
    pins.setdefault(host.lower(), (stream.socket.family, peer))


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
        pinned = (PINNED.get() or {}).get(host.lower())
        if pinned is not None and self.policy.allows(ipaddress.ip_address(pinned[1])):
            where = pinned[1]
            if pinned[0] == socket.AF_INET6:
                return [(socket.AF_INET6, (where, port, 0, 0))]
            return [(socket.AF_INET, (where, port))]
        target = self.overrides.get(host.lower(), host)
        try:
            target = target.encode("idna").decode("ascii")
            answers = _literal(target, port, family) or await self.resolver.resolve(
                target, port, family)
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


def _literal(host: str, port: int, family: socket.AddressFamily) -> list | None:
    """What getaddrinfo answers for an IP address in its canonical text,
    without its round through a thread (a tenth of a worker's CPU in a
    burst of small files from one address); None for anything else."""
    if "%" in host:
        return None  # a scoped IPv6 address: left to getaddrinfo
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 4 and family in (socket.AF_UNSPEC, socket.AF_INET):
        return [(socket.AF_INET, (host, port))]
    if ip.version == 6 and family in (socket.AF_UNSPEC, socket.AF_INET6):
        return [(socket.AF_INET6, (host, port, 0, 0))]
    return None


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
