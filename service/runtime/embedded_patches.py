"""Fixes to SecantusDB's write path, applied only to the embedded
database this service starts itself, and only to the version pinned in
requirements.txt. Run as a script in place of ``secantusd-py``:

    python service/runtime/embedded_patches.py --port ... (secantusd-py's flags)

Issue #25 measured where the embedded database's CPU goes in a burst of
small tasks: about 30% in ``Storage._index_options_map`` and a further
quarter in rewriting index entries that an update did not change.

1. **The index descriptions, read once per statement.** Upstream's
   ``_index_options_map`` scans the collection's index table and decodes
   every index's description; its docstring says "cached per call (the
   caller handles per-doc loops)", but no caller does: the insert, update
   and delete loops call it up to four times per document (unique check,
   geo check, delete entries, write entries). Here each write statement's
   transaction body (one attempt of ``_insert_chunk``, ``_update_chunk``,
   ``_update_matching_single_txn``, ``_delete_chunk``,
   ``_delete_matching_single_txn``) reads it once. These bodies run holding
   the collection's lock, which every index create and drop also takes, so
   the index set cannot change inside one; a write-conflict retry runs the
   body again and reads afresh. Outside those bodies nothing is cached.
   The one thing a body may change itself, an index's ``multikey`` flag
   (``_maybe_mark_multikey``), is not read from this map by the write path.
   The index table itself (``_iter_indexes``, which ``_all_indexes``,
   ``_partial_filters`` and ``_multikey_index_names`` each decode again at
   every statement) is read once per statement the same way, and read
   afresh after ``_maybe_mark_multikey`` flags an index.
2. **An update rewrites only the index entries it changes.** Upstream
   deletes every entry of the old document and writes every entry of the
   new one. Here, for an ordinary index (not unique, not
   ``prepareUnique``, not geo), nothing is computed to decide: an index
   none of whose fields (keys and partial filter) changed at all, to the
   types and the order of sub-documents, is left alone; one a field of
   whose key changed is rewritten (equal keys from unequal values, 1 and
   1.0, only cost a needless rewrite); one whose partial filter's fields
   alone changed is rewritten if the document enters or leaves it. Entries
   are keyed by (index, key, RecordId) and an update keeps the RecordId,
   so unchanged key fields are unchanged entries. Unique and geo indexes
   keep upstream's path unchanged.
3. **``$in`` over strings by set membership.** Upstream's ``_op_matches``
   tests a document's value against each ``$in`` candidate in turn with
   its numeric-aware equality: an ``update_many({_id: {$in: ids}})`` of
   n documents makes n*n Python calls (a fifth of the database's CPU in a
   burst's batched claims and ends). When every candidate and every value
   at the path is a plain ``str`` and no collation applies, that equality
   is ``==``, and a set answers the same; anything else goes upstream.

4. **A ``$literal`` is data, not an expression, to the pipeline checks.**
   Before an update pipeline runs, ``expression_problem_in_pipeline``
   walks it for parse-time errors, and two of its walks
   (``_literal_timezone_problem``, ``_expression_shape_problem``) go on
   into ``$literal`` operands: a batch of task ends, whose values are
   literals (``storage.conditional.merged``), was walked value by value,
   an eighth of the server's CPU in a burst. mongod does not parse a
   literal's operand, so neither do they here; the only answers that
   change are errors upstream raised for data inside a ``$literal``.
5. **An update pipeline's ``$switch`` fold candidates, found once per
   statement.** ``apply_pipeline`` scans the pipeline for ``$switch``es
   mongod could fold; an update runs it once per document, so a batch of
   n ends (one ``$switch`` of n branches) made n scans of n branches. The
   scan depends on the pipeline's structure only; within a statement its
   stages are the same objects, so the list is kept for the statement.

6. **A collection's size counted without stopping the server.**
   ``count_matching`` with no filter (the ``count`` command behind
   ``estimated_document_count``) walks every document holding the
   storage's global lock: with a million tasks stored, 9 s during which no
   other statement ran (a task's insert, a ``/check``'s read: the API
   answered 503). Here it walks the document table's keys only, in chunks
   of ``COUNT_CHUNK`` rows, taking the lock for each chunk; between chunks
   other statements run. Like mongod's own fast count it is not a
   snapshot: writes that land during the walk may or may not be counted.
7. **WiredTiger's packing without re-parsing its format.** Every key and
   value SecantusDB hands WiredTiger goes through the SWIG binding's
   pure-Python ``packing.pack``/``unpack``, which parse the format string
   a character at a time at every call: an eighth of the server's CPU in
   a burst. ``embedded_packing`` parses each format once and packs by the
   same rules; formats or values it does not model go upstream.
8. **A ``$switch`` on ``_id`` goes straight to its document's branches.**
   A batch of n ends whose ids repeat (``storage.conditional.each_only_if``;
   other batches read their values from a table by id) is one
   ``$switch`` whose every case is ``{$and: [{$eq: ["$_id", {$literal:
   id}]}, test]}``; upstream's ``_op_switch`` tries the branches in turn,
   so each of the n documents evaluated about n/2 cases. Inside an update
   statement, a ``$switch`` of exactly that shape (string ids) is indexed
   once by id, and a document with a string ``_id`` is evaluated against
   its own branches only, in their order, then the default. A skipped
   branch's ``$and`` would have stopped at its false ``$eq``, which cannot
   raise, so no answer and no error changes; any other shape, or no
   matching branch and no default, goes upstream.
9. **Index keys of array-free documents, directly.** Every entry written
   or removed asks ``_index_key_variants``, general over arrays, paths
   through arrays, sparse rules and collations, and every insert and
   update asks ``_doc_makes_multikey`` of every index. Where no array lies
   on the index's paths, the key is the fields' encodings joined and the
   answer is "not multikey"; ``embedded_index_keys`` computes that case
   directly and sends every other upstream.
10. **An updated document encoded once.** An update encoded its new
    document three times (``_doc_changed``, which compares the new BSON
    with the old, the size check, the write). Here, inside an update
    body, ``_doc_changed`` keeps the new document's BSON, and storage's
    ``bson.encode`` hands it back to the size check and the write when
    they ask for that very object (identity, not equality: the checks in
    between only read it). Everything else encodes as before.

Anything unexpected (another version, a method missing or reshaped) logs
a warning and runs the server unpatched. ``EMBEDDED_DB_PATCHES=0`` makes
the launcher start plain ``secantusd-py``. A real ``MONGODB_URI`` is never
touched: this file runs only inside the embedded server's process.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

PINNED = "0.7.0b3"

log = logging.getLogger("md5light.embedded_patches")

# Statement bodies that hold the collection's lock for their whole run.
_STATEMENT_BODIES = ("_insert_chunk", "_update_chunk", "_update_matching_single_txn",
                     "_delete_chunk", "_delete_matching_single_txn")
# Of those, the ones whose update writes delete-then-write index entries.
_UPDATE_BODIES = ("_update_chunk", "_update_matching_single_txn")
# What patch 9 takes over, or calls, in secantus.storage; and patch 10.
_KEY_FUNCTIONS = ("_index_key_variants", "_doc_makes_multikey", "encode_value_directed",
                  "_doc_changed")


class _Local(threading.local):
    def __init__(self) -> None:
        self.depth = 0
        self.updating = 0
        self.forget()

    def forget(self) -> None:
        """What one statement attempt keeps, dropped at its start and end."""
        # (db, coll) -> index descriptions; -> the index table's rows.
        self.options: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self.indexes: dict[tuple[str, str], list[Any]] = {}
        # RecordId -> the old document whose entry deletion was deferred to
        # the write of its new version.
        self.deferred: dict[Any, tuple[dict[str, Any], Any]] = {}
        # (an updated document, its BSON) between _doc_changed and the
        # write of that document (patch 10).
        self.encoded: tuple[Any, bytes] | None = None
        # (db, coll) -> index name -> what _same_entries compares.
        self.entry_plans: dict[tuple[str, str], dict[str, Any]] = {}
        # Stage ids -> (the stages, kept so that no id is reused; their
        # $switch fold candidates).
        self.folds: dict[tuple[int, ...], tuple[list[Any], list[Any]]] = {}
        # $switch argument ids -> (the argument, kept; its branches by _id).
        self.switches: dict[int, tuple[Any, dict[str, list[int]] | None]] = {}


def apply() -> bool:
    """Patch ``secantus.storage.Storage``; False (with a warning) when this
    is not the pinned version or its code is not shaped as expected."""
    try:
        version = importlib.metadata.version("secantusdb")
    except importlib.metadata.PackageNotFoundError:
        log.warning("embedded database patches skipped: secantusdb is not installed")
        return False
    if version != PINNED:
        log.warning("embedded database patches skipped: they are written for secantusdb %s, "
                    "this is %s (running it unpatched)", PINNED, version)
        return False
    from secantus import storage

    cls = storage.Storage
    needed = (*_STATEMENT_BODIES, "_chunk_doc_update_checked", "_index_options_map",
              "_write_index_entries", "_delete_index_entries", "_iter_indexes",
              "_maybe_mark_multikey", "count_matching", "_cursor_optional",
              "_refresh_read_snapshot", "_is_oplog_rs", "_is_system_users", "_is_system_version")
    missing = [name for name in needed if not callable(getattr(cls, name, None))]
    unwrapped = [name for name in _STATEMENT_BODIES
                 if not hasattr(getattr(cls, name, None), "__wrapped__")]
    helpers = ("_retry_write_conflicts", "_geo_type_of", "matches", "_doc_table_for")
    missing += [name for name in helpers if not callable(getattr(storage, name, None))]
    missing += [name for name in ("_INT64_MIN", "wt", "COMPOUND_SEP") if not hasattr(storage, name)]
    missing += [name for name in _KEY_FUNCTIONS if not callable(getattr(storage, name, None))]
    if not callable(getattr(getattr(storage, "bson", None), "encode", None)):
        missing.append("bson")
    binding = sys.modules.get(getattr(getattr(getattr(storage, "wt", None), "Cursor", None),
                                      "__module__", ""))
    missing += [f"wiredtiger binding's {name}" for name in ("pack", "unpack")
                if not callable(getattr(binding, name, None))]
    from secantus import aggregate, expressions, query, sortkey
    if not callable(getattr(sortkey, "invert_bytes", None)):
        missing.append("sortkey.invert_bytes")
    missing += [f"expressions.{name}" for name in ("_op_switch", "_OPS", "_MISSING_PROPAGATING",
                                                   "_eval")
                if not hasattr(expressions, name)]
    if getattr(expressions, "_OPS", {}).get("$switch") is not getattr(expressions, "_op_switch",
                                                                       None):
        missing.append("expressions._OPS['$switch']")
    if not callable(getattr(query, "_op_matches", None)):
        missing.append("query._op_matches")
    missing += [f"aggregate.{name}" for name in (*_LITERAL_WALKS, "apply_pipeline",
                                                 "_switch_fold_candidates")
                if not callable(getattr(aggregate, name, None))]
    if missing or unwrapped:
        log.warning("embedded database patches skipped: secantus.storage is not as expected "
                    "(missing %s, not retry-wrapped %s)", missing, unwrapped)
        return False
    local = _Local()
    update_loops = {getattr(cls, name).__wrapped__.__code__ for name in _UPDATE_BODIES}
    _patch_options_map(cls, local)
    _patch_iter_indexes(cls, local)
    _patch_count(cls, storage)
    _patch_update_entries(cls, storage, local, update_loops)
    _patch_in_of_strings(query)
    _patch_literals_are_data(aggregate)
    _patch_fold_candidates(aggregate, local)
    _patch_packing(storage)
    _patch_switch_by_id(expressions, local)
    _patch_index_keys(storage, sortkey)
    _patch_encode_once(storage, local)
    for name in _STATEMENT_BODIES:
        body = getattr(cls, name).__wrapped__
        setattr(cls, name, storage._retry_write_conflicts(
            _statement(body, local, updating=name in _UPDATE_BODIES)))
    log.warning("embedded database patches applied (secantusdb %s): index table and "
                "descriptions read once per statement, updates rewrite only changed index "
                "entries, $in of strings by set, $literal operands not walked, $switch fold "
                "candidates once per statement, collection counts in chunks, WiredTiger formats "
                "parsed once, $switch on _id by id, index keys of array-free documents directly, "
                "an updated document encoded once",
                version)
    return True


def _statement(body, local: _Local, updating: bool):
    """One attempt of a statement body: a fresh cache of index options,
    forgotten when the attempt ends (a retry may follow a DDL)."""

    @functools.wraps(body)
    def attempt(self, *args: Any, **kwargs: Any) -> Any:
        outer = local.depth == 0
        if outer:
            local.forget()
        local.depth += 1
        local.updating += updating
        try:
            return body(self, *args, **kwargs)
        finally:
            local.depth -= 1
            local.updating -= updating
            if outer:
                local.forget()

    return attempt


def _patch_index_keys(storage, sortkey) -> None:
    from service.runtime import embedded_index_keys

    storage._index_key_variants, storage._doc_makes_multikey = embedded_index_keys.make(
        storage._index_key_variants, storage._doc_makes_multikey,
        storage.encode_value_directed, storage.COMPOUND_SEP)
    # encode_value_directed reads it from its module at each call.
    sortkey.invert_bytes = embedded_index_keys.invert_bytes


def _patch_encode_once(storage, local: _Local) -> None:
    """An updated document is encoded once: ``_doc_changed`` (comparing
    the new document's BSON with the old one's), the size check and the
    write each encoded it again."""
    real = storage.bson
    encode = real.encode
    upstream_changed = storage._doc_changed
    checked = storage.Storage._chunk_doc_update_checked.__code__
    chunk, single = (getattr(storage.Storage, name).__wrapped__.__code__
                     for name in _UPDATE_BODIES)

    def doc_changed(new: Any, old: Any) -> bool:
        if local.updating and sys._getframe(1).f_code in (checked, single):
            try:
                new_bson, old_bson = encode(new), encode(old)
            except Exception:  # noqa: BLE001 - upstream's own fallback decides
                return upstream_changed(new, old)
            local.encoded = (new, new_bson)
            return new_bson != old_bson
        return upstream_changed(new, old)

    def encode_once(document: Any, *args: Any, **kwargs: Any) -> bytes:
        memo = local.encoded
        # The same object, not an equal one: nothing between the comparison
        # and the write changes the document (the checks only read it).
        if memo is not None and memo[0] is document and not args and not kwargs:
            caller = sys._getframe(1).f_code
            if caller is checked:  # the size check; the write follows
                return memo[1]
            if caller is chunk or caller is single:  # the write
                local.encoded = None
                return memo[1]
        return encode(document, *args, **kwargs)

    # storage's own view of bson: the module's names, with encode_once.
    proxy = types.ModuleType(real.__name__, real.__doc__)
    proxy.__dict__.update(real.__dict__)
    proxy.encode = encode_once  # type: ignore[attr-defined]
    storage.bson = proxy
    storage._doc_changed = doc_changed


def _patch_packing(storage) -> None:
    from wiredtiger import intpacking

    from service.runtime import embedded_packing

    binding: Any = sys.modules[storage.wt.Cursor.__module__]
    binding.pack, binding.unpack = embedded_packing.make(
        binding.pack, binding.unpack, intpacking.pack_int, intpacking.unpack_int)


def _patch_iter_indexes(cls, local: _Local) -> None:
    upstream = cls._iter_indexes
    mark = cls._maybe_mark_multikey

    @functools.wraps(upstream)
    def iter_indexes(self, db: str, coll: str) -> Any:
        if not local.depth:
            return upstream(self, db, coll)
        rows = local.indexes.get((db, coll))
        if rows is None:
            rows = local.indexes[(db, coll)] = list(upstream(self, db, coll))
        return iter(rows)

    @functools.wraps(mark)
    def maybe_mark_multikey(self, db: str, coll: str, doc: Any, indexes: Any,
                            already_multikey: set[str]) -> set[str]:
        before = len(already_multikey)
        try:
            return mark(self, db, coll, doc, indexes, already_multikey)
        finally:
            if len(already_multikey) != before:  # maybe flagged one: read again
                local.indexes.pop((db, coll), None)

    cls._iter_indexes = iter_indexes
    cls._maybe_mark_multikey = maybe_mark_multikey


# Rows of the document table counted per hold of the storage lock (patch 6):
# a few milliseconds each.
COUNT_CHUNK = 4096
COUNT_PAUSE = 0.001


def _patch_count(cls, storage) -> None:
    upstream = cls.count_matching

    @functools.wraps(upstream)
    def count_matching(self, db, coll, filter=None, *, let=None, collation=None):
        if filter or self._is_oplog_rs(db, coll) or self._is_system_users(db, coll) \
                or self._is_system_version(db, coll):
            return upstream(self, db, coll, filter, let=let, collation=collation)
        return _count_rows(self, storage, db, coll)

    cls.count_matching = count_matching


def _count_rows(self, storage, db: str, coll: str) -> int:
    """The rows of ``(db, coll)`` in the document table (keyed by
    ``(db, coll, RecordId)``), COUNT_CHUNK at a time under the lock."""
    table = storage._doc_table_for(db, coll)
    total = 0
    last: int | None = None
    while True:
        with self._lock:
            self._refresh_read_snapshot()
            cursor = self._cursor_optional(table)
            if cursor is None:
                return total
            cursor.reset()
            cursor.set_key(db, coll, storage._INT64_MIN if last is None else last)
            found = cursor.search_near()
            if found == storage.wt.WT_NOTFOUND or (found < 0 and cursor.next() != 0):
                return total
            for _ in range(COUNT_CHUNK):
                key = cursor.get_key()
                if key[0] != db or key[1] != coll:
                    return total
                if last is None or key[2] > last:
                    total += 1
                    last = key[2]
                if cursor.next() != 0:
                    return total
            cursor.reset()
        # Released, the lock goes straight back to this thread unless the
        # waiting ones get to run first.
        time.sleep(COUNT_PAUSE)


def _patch_options_map(cls, local: _Local) -> None:
    upstream = cls._index_options_map

    @functools.wraps(upstream)
    def options_map(self, db: str, coll: str) -> dict[str, dict[str, Any]]:
        if local.depth == 0:
            return upstream(self, db, coll)
        cached = local.options.get((db, coll))
        if cached is None:
            cached = local.options[(db, coll)] = upstream(self, db, coll)
        # Callers read it only, but a copy keeps one caller's change from
        # reaching the next, as upstream's fresh dict would.
        return {name: dict(opts) for name, opts in cached.items()}

    cls._index_options_map = options_map


def _patch_update_entries(cls, storage, local: _Local, update_loops: set) -> None:
    delete_upstream = cls._delete_index_entries
    write_upstream = cls._write_index_entries

    @functools.wraps(delete_upstream)
    def delete_entries(self, db, coll, doc, indexes, partials=None, *, recordid):
        if local.updating and sys._getframe(1).f_code in update_loops:
            # Called by an update's own loop, which writes the new
            # version's entries next in the same transaction: deleting
            # waits for it, so unchanged entries can stay. (Other deletes
            # inside an update, a capped collection's eviction, go ahead.)
            local.deferred[recordid] = (doc, partials)
            return None
        return delete_upstream(self, db, coll, doc, indexes, partials, recordid=recordid)

    @functools.wraps(write_upstream)
    def write_entries(self, db, coll, doc, indexes, partials=None, *, recordid):
        old = local.deferred.pop(recordid, None) if local.deferred else None
        if old is None:
            return write_upstream(self, db, coll, doc, indexes, partials, recordid=recordid)
        old_doc, old_partials = old
        if partials is None:
            partials = self._partial_filters(db, coll)
        # The statement holds the collection's lock: the same indexes and
        # filters for each of its documents.
        plans = local.entry_plans.get((db, coll))
        if plans is None or any(index[0] not in plans for index in indexes):
            options = self._index_options_map(db, coll)
            plans = local.entry_plans[(db, coll)] = {
                index[0]: _entry_plan(storage, index, partials, options) for index in indexes}
        changed = [index for index in indexes
                   if not _same_entries(storage, plans[index[0]], old_doc, doc)]
        if changed:
            delete_upstream(self, db, coll, old_doc, changed,
                            old_partials if old_partials is not None else partials,
                            recordid=recordid)
            write_upstream(self, db, coll, doc, changed, partials, recordid=recordid)
        return None

    cls._delete_index_entries = delete_entries
    cls._write_index_entries = write_entries


def _patch_in_of_strings(query) -> None:
    upstream = query._op_matches

    @functools.wraps(upstream)
    def op_matches(values, op, arg, collation=None, **kwargs):
        if (op == "$in" and collation is None and type(arg) is list
                and all(type(c) is str for c in arg)
                and all(type(v) is str for v in values)):
            return not set(arg).isdisjoint(values)
        return upstream(values, op, arg, collation, **kwargs)

    query._op_matches = op_matches


# The pipeline checks that walked into $literal operands (patch 4).
_LITERAL_WALKS = ("_literal_timezone_problem", "_expression_shape_problem")


def _patch_literals_are_data(aggregate) -> None:
    for name in _LITERAL_WALKS:
        upstream = getattr(aggregate, name)

        # The walks recurse through the module's name, so every level skips.
        def walk(spec: Any, *args: Any, _upstream: Any = upstream, **kwargs: Any) -> Any:
            if isinstance(spec, dict) and len(spec) == 1 and "$literal" in spec:
                return None
            return _upstream(spec, *args, **kwargs)

        setattr(aggregate, name, functools.wraps(upstream)(walk))


def _patch_fold_candidates(aggregate, local: _Local) -> None:
    upstream = aggregate.apply_pipeline
    scan = aggregate._switch_fold_candidates

    @functools.wraps(upstream)
    def apply_pipeline(docs, pipeline, ctx=None, *, fold_candidates=None):
        if fold_candidates is None and local.updating and isinstance(pipeline, list):
            key = tuple(map(id, pipeline))
            known = local.folds.get(key)
            if known is None:
                known = local.folds[key] = (list(pipeline), scan(pipeline, []))
            fold_candidates = known[1]
        return upstream(docs, pipeline, ctx, fold_candidates=fold_candidates)

    aggregate.apply_pipeline = apply_pipeline


def _patch_switch_by_id(expressions, local: _Local) -> None:
    upstream = expressions._op_switch
    evaluate = expressions._eval

    @functools.wraps(upstream)
    def op_switch(arg: Any, ctx: Any, ret: Any = None) -> Any:
        if not local.updating or not isinstance(getattr(ctx, "doc", None), dict):
            return upstream(arg, ctx, ret)
        known = local.switches.get(id(arg))
        if known is None or known[0] is not arg:
            known = local.switches[id(arg)] = (arg, _branches_by_id(arg))
        by_id = known[1]
        doc_id = ctx.doc.get("_id")
        if by_id is None or type(doc_id) is not str:
            return upstream(arg, ctx, ret)
        mine = by_id.get(doc_id)
        if mine:
            branches = arg["branches"]
            narrowed = {"branches": [branches[i] for i in mine]}
            if "default" in arg:
                narrowed["default"] = arg["default"]
            return upstream(narrowed, ctx, ret)
        if "default" in arg:
            return (ret or evaluate)(arg["default"], ctx)
        return upstream(arg, ctx, ret)  # upstream's own error

    expressions._OPS["$switch"] = op_switch
    expressions._MISSING_PROPAGATING["$switch"] = op_switch


def _branches_by_id(arg: Any) -> dict[str, list[int]] | None:
    """The branches of a ``$switch`` whose every case starts with
    ``$_id`` equal to a literal string, by that string; None for any
    other ``$switch``."""
    if type(arg) is not dict or not set(arg) <= {"branches", "default"}:
        return None
    branches = arg.get("branches")
    if type(branches) is not list or not branches:
        return None
    by_id: dict[str, list[int]] = {}
    for i, branch in enumerate(branches):
        if type(branch) is not dict or set(branch) != {"case", "then"}:
            return None
        case = branch["case"]
        terms = case.get("$and") if type(case) is dict and len(case) == 1 else None
        if type(terms) is not list or not terms:
            return None
        first = terms[0]
        pair = first.get("$eq") if type(first) is dict and len(first) == 1 else None
        if type(pair) is not list or len(pair) != 2 or pair[0] != "$_id":
            return None
        literal = pair[1]
        doc_id = literal.get("$literal") if type(literal) is dict and len(literal) == 1 else None
        if type(doc_id) is not str:
            return None
        by_id.setdefault(doc_id, []).append(i)
    return by_id


def _entry_plan(storage, index, partials: dict, options: dict) -> tuple[Any, ...] | None:
    """What ``_same_entries`` reads of an index: its key fields, its
    partial filter and that filter's fields; None for unique,
    prepareUnique and geo indexes, and for a partial filter with an
    operator at its top (always rewritten, as upstream does)."""
    name, key_spec, _sparse, unique = index
    if unique or options.get(name, {}).get("prepareUnique") \
            or storage._geo_type_of(key_spec) is not None:
        return None
    partial = partials.get(name)
    keys = tuple({key.split(".", 1)[0] for key in key_spec})
    filtered = tuple({key.split(".", 1)[0] for key in partial}) if partial is not None else ()
    if any(field.startswith("$") for field in keys + filtered):
        return None
    return keys, partial, filtered


def _same_entries(storage, plan: tuple[Any, ...] | None, old: dict, new: dict) -> bool:
    """Whether ``old`` and ``new`` put the same entries in an ordinary
    index (``plan``, from ``_entry_plan``); False (rewrite it, as upstream
    does) for the others."""
    if plan is None:
        return False
    keys, partial, filtered = plan
    if not all(_identical(old.get(field, _ABSENT), new.get(field, _ABSENT)) for field in keys):
        # A field of the key changed: its entries are rewritten without
        # computing them first (equal keys from unequal values, 1 and 1.0 or
        # a collation's "A" and "a", only cost a needless rewrite).
        return False
    if partial is None or all(_identical(old.get(field, _ABSENT), new.get(field, _ABSENT))
                              for field in filtered):
        return True  # no field it reads changed, to the type and the order
    # Only the partial filter's fields changed: same keys, so the same
    # entries unless the document enters or leaves the index.
    return bool(storage.matches(old, partial)) == bool(storage.matches(new, partial))


_ABSENT = object()


def _identical(a: Any, b: Any) -> bool:
    """Equal and of the same types throughout, sub-documents in the same
    order: what makes equal index keys certain without computing them
    (Python's ``1 == 1.0 == True`` and unordered ``dict`` equality do not)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            ka == kb and _identical(va, vb)
            for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True))
    if isinstance(a, list):
        return len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def main() -> int:
    # Run as a script: the project root, for embedded_packing.
    sys.path.insert(1, str(Path(__file__).resolve().parents[2]))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    apply()
    from secantus.cli import main as secantus_main
    sys.argv[0] = "secantusd-py"
    return secantus_main()


if __name__ == "__main__":
    sys.exit(main())
