"""The ids this service hands out for tasks and manifests.

Every id is a random UUID in its canonical text form. A string that is not
one names nothing here, so it is answered 404 without a database read: a
client polling garbage ids cannot make the database work for it.
"""

from __future__ import annotations

import uuid


def new_id() -> str:
    return str(uuid.uuid4())


def could_be_ours(value: str) -> bool:
    """Whether ``value`` has the form of an id we issue (it may still name
    nothing: that takes a read)."""
    if len(value) != 36:
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False
