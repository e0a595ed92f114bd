"""Who is asking: an API key's holder, an operator, or an anonymous client.

A task id stays a bearer capability for its own task (the original
``/check`` contract needs that); what a key adds is a name for the tasks
it submits (``owner``), a quota of its own (better than an address behind
NAT), and the right to list: a key lists its own tasks, an operator key
every task. Until the first key is made, a request from the loopback
interface is an operator, so that ``make run`` and curl on the same host
work as before; from then on only keys say who is who.

Lookups are cached for CACHE_SECONDS: a revoked key stops working within
that time in every API process, at one database read per key and period.
When the database does not answer, the last lookup (up to STALE_SECONDS
old) stands in, so that a keyed ``/check``, which answers from memory,
keeps working through an outage.

Loopback is an operator only where it surely is the caller: the
connection comes from loopback and, with CLIENT_IP_HEADER, that header is
present and names loopback too; without it, a request carrying a proxy's
headers (X-Forwarded-For, Forwarded, X-Real-IP) is not (a proxy on the same
host would make every client "loopback"). Only until the first key is made,
revoked ones included (revoking every key must not reopen the rule), and
only with LOOPBACK_OPERATOR (on by default).

Only our own tokens are judged: an Authorization header of another scheme
or another kind of bearer token (a proxy's Basic login, an SSO's JWT) is
not ours to refuse, and the request is anonymous.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import time

from pymongo.errors import PyMongoError

from service.intake.admission import client_key, peer_address
from service.model.keys import PREFIX, ApiKey, Role, parse_token
from service.storage.keys import KeyRecords

CACHE_SECONDS = 2.0
STALE_SECONDS = 600.0
_PROXY_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")


class Unauthorized(Exception):
    """The request's key is not one this service accepts; the message says
    why in a sentence."""


@dataclasses.dataclass(frozen=True)
class Caller:
    # The unit quotas count: "key:<id>", or the client's address.
    client: str
    # The key that asked (the owner of what it submits), or None.
    key_id: str | None = None
    # Sees every task, and other tasks' ids in links.
    operator: bool = False

    def may_act_on(self, owner: str | None) -> bool:
        """Whether this caller may cancel a task of ``owner`` whose id it
        holds: an unowned task is the id's holder's; an owned one its
        key's (or an operator's)."""
        return owner is None or self.operator or owner == self.key_id


class Callers:
    def __init__(self, keys: KeyRecords, client_ip_header: str | None,
                 require_key: bool = False, loopback_operator: bool = True):
        self.keys = keys
        self.client_ip_header = client_ip_header
        self.require_key = require_key
        self.loopback_operator = loopback_operator
        self._keys: dict[str, tuple[float, ApiKey | None]] = {}
        # (when looked up, whether any key was ever made); until the first
        # lookup answers, keys are assumed made: in doubt, not an operator.
        self._any: tuple[float, bool] = (0.0, True)

    def judges(self, request) -> bool:
        """Whether this request's caller must be settled before any work:
        it carries one of our keys (a bad one is a 401 at once), or every
        request needs one."""
        return self.require_key or _our_token(request.headers.get("Authorization")) is not None

    async def identify(self, request) -> Caller:
        """The caller of ``request``, or Unauthorized."""
        token = _our_token(request.headers.get("Authorization"))
        if token is None:
            if self.require_key:
                raise Unauthorized("this service needs an API key: send it as "
                                   "'Authorization: Bearer <key>'")
            peer = peer_address(request, self.client_ip_header)
            return Caller(client_key(peer), operator=await self._loopback_rules(request))
        parsed = parse_token(token)
        if parsed is None:
            raise Unauthorized("the API key is not one this service made (md5l_...)")
        key_id, secret = parsed
        key = await self._key(key_id)
        if key is None or not key.opens(secret):
            raise Unauthorized("the API key is not valid")
        if not key.active:
            raise Unauthorized(f"the API key {key_id} was revoked")
        return Caller(f"key:{key.id}", key.id, key.role == Role.OPERATOR)

    async def _key(self, key_id: str) -> ApiKey | None:
        now = time.monotonic()
        cached = self._keys.get(key_id)
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return cached[1]
        try:
            key = await self.keys.get(key_id)
        except PyMongoError:
            if cached is not None and now - cached[0] < STALE_SECONDS:
                return cached[1]
            raise
        if len(self._keys) > 10_000:  # made-up ids must not grow this forever
            self._keys.clear()
        self._keys[key_id] = (now, key)
        return key

    async def _loopback_rules(self, request) -> bool:
        if not self.loopback_operator or not _is_loopback(request.remote_ip or ""):
            return False
        if self.client_ip_header:
            forwarded = request.headers.get(self.client_ip_header)
            if forwarded is None or not _is_loopback(peer_address(request,
                                                                  self.client_ip_header)):
                return False
        elif any(h in request.headers for h in _PROXY_HEADERS):
            return False
        now = time.monotonic()
        if now - self._any[0] >= CACHE_SECONDS:
            # One lookup at a time: the requests that come while it runs use
            # the last answer (every request of a burst asked the database).
            last = self._any
            self._any = (now, last[1])
            try:
                self._any = (now, await self.keys.any_made())
            except PyMongoError:
                self._any = last
                return False  # in doubt, not an operator
        return not self._any[1]


def _our_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer md5l_...`` header, else None."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(PREFIX + "_"):
        return None
    return token


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback
