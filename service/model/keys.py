"""API keys: who a request comes from.

A key is shown once, when it is made (``run.py keys create``), as
``md5l_<id>_<secret>``; the database keeps its id, a name, its role and the
SHA-256 of the secret, never the secret. The secret is 32 random bytes, so
a fast hash is enough (a slow password hash guards guessable secrets;
these are not). The id is public: it names the key in listings, logs and
on tasks (``owner``), and is the quota's client.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import hmac
import re
import secrets
from typing import Any

from service.model.task import utcnow

PREFIX = "md5l"
_TOKEN = re.compile(rf"{PREFIX}_([0-9a-f]{{12}})_([A-Za-z0-9_-]{{43}})", re.ASCII)


class Role(enum.StrEnum):
    USER = "user"          # sees and acts on its own tasks
    OPERATOR = "operator"  # sees every task


@dataclasses.dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    role: Role
    secret_hash: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def opens(self, secret: str) -> bool:
        return hmac.compare_digest(self.secret_hash, _digest(secret))

    def to_doc(self) -> dict[str, Any]:
        return {"_id": self.id, "name": self.name, "role": str(self.role),
                "secret_sha256": self.secret_hash, "created_at": self.created_at,
                "revoked_at": self.revoked_at}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ApiKey:
        return cls(id=doc["_id"], name=doc.get("name", ""), role=Role(doc["role"]),
                   secret_hash=doc["secret_sha256"], created_at=doc["created_at"],
                   revoked_at=doc.get("revoked_at"))

    def view(self) -> dict[str, Any]:
        """What a listing shows: never the hash."""
        return {"id": self.id, "name": self.name, "role": str(self.role),
                "created_at": self.created_at.isoformat(timespec="seconds"),
                "revoked_at": self.revoked_at.isoformat(timespec="seconds")
                if self.revoked_at else None}


def new_key(name: str, role: Role) -> tuple[ApiKey, str]:
    """A fresh key and its token, the one time the token exists."""
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    key = ApiKey(key_id, name, role, _digest(secret), utcnow())
    return key, f"{PREFIX}_{key_id}_{secret}"


def parse_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token; None for anything else."""
    match = _TOKEN.fullmatch(token)
    return (match.group(1), match.group(2)) if match else None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
