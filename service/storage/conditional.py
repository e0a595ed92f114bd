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


def each_only_if(cases: list[tuple[Any, dict[str, Any], dict[str, Any]]]
                 ) -> list[dict[str, Any]]:
    """``only_if`` for several documents in one ``update_many`` on their
    ids: each case is (``_id``, test, changes). One statement is one
    transaction and one synced commit on SecantusDB, where a ``bulk_write``
    of as many updates commits each.

    The cases' values travel as data, not as expressions: each case's
    literals go into one ``$literal`` table indexed by ``_id``, and the
    expression is written once per distinct shape (ends share one or two),
    reading its values from the document's row. A server walks a pipeline
    before it runs it, and evaluates the branches a document meets; with
    one branch per case, both grew with the batch (on SecantusDB, about a
    tenth of its CPU in a burst of small tasks)."""
    ids = [doc_id for doc_id, _, _ in cases]
    if not _distinct(ids):
        # A document with several cases takes the first whose test holds:
        # only a branch per case says that.
        return [{"$replaceWith": {"$switch": {
            "branches": [{"case": {"$and": [{"$eq": ["$_id", {"$literal": doc_id}]}, test]},
                          "then": _onto_root(changes)}
                         for doc_id, test, changes in cases],
            "default": "$$ROOT"}}}]
    shapes: dict[str, int] = {}
    branches: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for doc_id, test, changes in cases:
        values: list[Any] = []
        shape = _as_row_reads({"test": test, "then": _onto_root(changes)}, values)
        key = repr(shape)
        if key not in shapes:
            shapes[key] = len(branches)
            branches.append({"case": {"$and": [{"$eq": ["$_id", f"$${_ROW}.id"]},
                                               {"$eq": [f"$${_ROW}.shape", len(branches)]},
                                               shape["test"]]},
                             "then": shape["then"]})
        rows.append({"id": doc_id, "shape": shapes[key],
                     **{f"v{n}": value for n, value in enumerate(values)}})
    # An _id outside ``ids`` would index -1, the last row; its own id test
    # keeps that row from applying.
    row = {"$arrayElemAt": [{"$literal": rows}, {"$indexOfArray": [{"$literal": ids}, "$_id"]}]}
    return [{"$replaceWith": {"$let": {"vars": {_ROW: row}, "in": {"$switch": {
        "branches": branches, "default": "$$ROOT"}}}}}]


# The variable holding a document's row in each_only_if.
_ROW = "row"


def _as_row_reads(expr: Any, values: list[Any]) -> Any:
    """``expr`` with each ``{$literal: value}`` read from the row instead
    (``$$row.v<n>``), ``value`` appended to ``values``. Inside an
    expression both are the value: a variable's value is data, never a
    path or an operator."""
    if type(expr) is dict:
        if len(expr) == 1 and "$literal" in expr:
            values.append(expr["$literal"])
            return f"$${_ROW}.v{len(values) - 1}"
        return {key: _as_row_reads(value, values) for key, value in expr.items()}
    if type(expr) is list:
        return [_as_row_reads(item, values) for item in expr]
    return expr


def _distinct(ids: list[Any]) -> bool:
    try:
        return len(set(ids)) == len(ids)
    except TypeError:  # an unhashable _id (a sub-document): take the safe form
        return False


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
