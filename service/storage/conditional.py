"""Updates whose condition is inside the update rather than in the filter.

SecantusDB (the embedded default) plans a filter of several fields by
walking every index of the collection several times over, and may pick a
compound index on ``status`` and read every queued task: with the tasks'
ten indexes that was most of the database's CPU for a task's claim and
end. A filter on ``_id`` alone is a point lookup. So the hot writes filter
on ``_id`` and carry their condition in an update pipeline: a document
whose condition fails is replaced by itself, which modifies nothing, and
``modified_count`` says how many applied. MongoDB runs both forms alike.
"""

from __future__ import annotations

from typing import Any


def only_if(test: dict[str, Any], changes: dict[str, Any]) -> list[dict[str, Any]]:
    """An update pipeline that applies ``changes`` (expressions) to a
    document only where ``test`` (an expression) holds."""
    return [{"$replaceWith": {"$cond": [test, _onto_root(changes), "$$ROOT"]}}]


def each_only_if(cases: list[tuple[str, dict[str, Any], dict[str, Any]]]
                 ) -> list[dict[str, Any]]:
    """``only_if`` for several documents in one ``update_many`` on their
    ids: each case is (``_id``, test, changes). One statement is one
    transaction and one synced commit on SecantusDB, where a ``bulk_write``
    of as many updates commits each."""
    return [{"$replaceWith": {"$switch": {
        "branches": [{"case": {"$and": [{"$eq": ["$_id", {"$literal": doc_id}]}, test]},
                      "then": _onto_root(changes)}
                     for doc_id, test, changes in cases],
        "default": "$$ROOT"}}}]


def merged(fields: dict[str, Any]) -> dict[str, Any]:
    """``$set``-style fields (dotted paths one level deep) as the values of
    a ``$mergeObjects`` over the document: literal, sub-documents merged."""
    out: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in fields.items():
        parent, dot, child = key.partition(".")
        if dot:
            nested.setdefault(parent, {})[child] = value
        else:
            out[key] = {"$literal": value}
    for parent, children in nested.items():
        out[parent] = {"$mergeObjects": [f"${parent}", {"$literal": children}]}
    return out


def _onto_root(changes: dict[str, Any]) -> dict[str, Any]:
    """``changes`` merged over the document, its literal values as one
    ``$literal``: the same document as merging ``changes`` itself (a
    literal is never missing, and the two parts share no field), but a
    server checks a pipeline before it runs it, and one literal is one
    step of that walk where a batch of ends had one per field (on
    SecantusDB, a seventh of its CPU in a burst of small tasks)."""
    literals = {key: expr["$literal"] for key, expr in changes.items()
                if type(expr) is dict and len(expr) == 1 and "$literal" in expr}
    rest = {key: expr for key, expr in changes.items() if key not in literals}
    parts: list[Any] = ["$$ROOT"]
    if literals:
        parts.append({"$literal": literals})
    if rest:
        parts.append(rest)
    return {"$mergeObjects": parts}
