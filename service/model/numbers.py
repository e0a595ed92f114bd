"""Whole numbers as the web writes them: ASCII digits only.

``str.isdigit`` says yes to ``²`` and ``١``, which ``int`` then refuses or
reads as a number nobody typed; every numeric parameter and header goes
through here instead (a 500 or a crashed worker came from that gap).
"""

from __future__ import annotations

_DIGITS = frozenset("0123456789")


def whole_number(text: str | None, max_digits: int = 30) -> int | None:
    """``text`` as a non-negative integer if it is 1 to ``max_digits`` ASCII
    digits (no sign, space or underscore); None otherwise."""
    if not text or len(text) > max_digits or not _DIGITS.issuperset(text):
        return None
    return int(text)
