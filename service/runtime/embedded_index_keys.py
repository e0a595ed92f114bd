"""SecantusDB's index keys for the common document, without its general
machinery (patch 9 of ``embedded_patches``).

Every index entry a write makes or removes goes through
``storage._index_key_variants``, which enumerates the keys a document
contributes for any shape (arrays, paths through arrays, sparse rules,
collations): per field it splits the path, walks it collecting lists of
candidates, deduplicates them through encoded sets and takes a cartesian
product. For a document where no field of the index is an array and no
path passes through one, the answer is always one key, the fields'
encodings joined; that is every task, inflight and file record md5-light
writes. Here that case is computed directly, with each key spec's fields
split once. ``_doc_makes_multikey`` (asked for every index at every
insert and update) is answered the same way: no array on any path, not
multikey.

Anything else goes to the upstream function: a collation, a list or a
non-``dict`` mapping on the way, a direction that is not a number. So the
bytes, and the errors, are upstream's. ``invert_bytes`` (a descending
field's encoding) is replaced by a translation table: the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

_MISSING = object()
_FALLBACK = object()
# Distinct key specs kept (an index each, per collection): a bound, not a
# working limit.
_PLANS = 4096
_INVERTED = bytes(0xFF ^ b for b in range(256))


def invert_bytes(b: bytes) -> bytes:
    return b.translate(_INVERTED)


def _plan(key_spec: tuple[tuple[Any, Any], ...]) -> tuple[tuple[tuple[str, ...], int], ...] | None:
    """Each field's path and direction, as upstream reads them
    (``int(key_spec[field])``); None when a direction is not a plain
    number (upstream decides what that means)."""
    plan = []
    for field, direction in key_spec:
        if type(field) is not str or type(direction) not in (int, float):
            return None
        try:
            plan.append((tuple(field.split(".")), int(direction)))
        except (ValueError, OverflowError):  # NaN, infinity: upstream's error
            return None
    return tuple(plan)


def _walk(doc: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The value at ``path``, ``_MISSING``, or ``_FALLBACK`` where an
    array (or a mapping that is not a dict) is met on the way or at the
    end, which upstream's walk treats otherwise."""
    current: Any = doc
    for part in path:
        if isinstance(current, dict):
            if part not in current:
                return _MISSING
            current = current[part]
        elif isinstance(current, (list, Mapping)):
            return _FALLBACK
        else:
            return _MISSING
    if isinstance(current, list):
        return _FALLBACK
    return current


def make(upstream_variants: Callable[..., list[bytes]],
         upstream_multikey: Callable[..., bool],
         encode_directed: Callable[..., bytes],
         separator: bytes) -> tuple[Callable[..., list[bytes]], Callable[..., bool]]:
    """``_index_key_variants`` and ``_doc_makes_multikey`` over upstream's."""
    plans: dict[tuple[tuple[Any, Any], ...], Any] = {}

    def plan_of(key_spec: Mapping[str, Any]) -> Any:
        try:
            spec = tuple(key_spec.items())
            return plans[spec]
        except KeyError:
            if len(plans) >= _PLANS:
                plans.clear()
            plan = plans[spec] = _plan(spec)
            return plan
        except TypeError:  # an unhashable direction
            return None

    def index_key_variants(doc: Mapping[str, Any], key_spec: Mapping[str, Any], *,
                           sparse: bool, collation: Any = None) -> list[bytes]:
        plan = plan_of(key_spec) if collation is None and type(doc) is dict else None
        if plan is None:
            return upstream_variants(doc, key_spec, sparse=sparse, collation=collation)
        values = []
        present = False
        for path, direction in plan:
            value = _walk(doc, path)  # type: ignore[arg-type]
            if value is _FALLBACK:
                return upstream_variants(doc, key_spec, sparse=sparse, collation=collation)
            if value is _MISSING:
                value = None  # mongod keys a missing field as null
            else:
                present = True
            values.append((value, direction))
        if sparse and not present:
            return []  # a sparse index holds documents with one of its fields at least
        if len(values) == 1:
            return [encode_directed(values[0][0], values[0][1])]
        return [separator.join([encode_directed(value, direction)
                                for value, direction in values])]

    def doc_makes_multikey(doc: Mapping[str, Any], key_spec: Mapping[str, Any]) -> bool:
        plan = plan_of(key_spec) if type(doc) is dict else None
        if plan is None or any(_walk(doc, path) is _FALLBACK  # type: ignore[arg-type]
                               for path, _direction in plan):
            return upstream_multikey(doc, key_spec)
        return False

    return index_key_variants, doc_makes_multikey
