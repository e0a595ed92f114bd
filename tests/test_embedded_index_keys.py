"""The embedded database's direct index keys (embedded_patches, patch 9)
are upstream's keys, bytes and errors alike, for random documents and key
specs: scalars of every BSON type, paths through sub-documents, arrays on
the way or at the end (upstream's path), sparse indexes, descending and odd
directions, collations."""

import datetime as dt
import random

import bson
import pytest
from secantus import sortkey, storage

from service.runtime import embedded_index_keys

UPSTREAM_VARIANTS = storage._index_key_variants
UPSTREAM_MULTIKEY = storage._doc_makes_multikey
UPSTREAM_INVERT = sortkey.invert_bytes
variants, makes_multikey = embedded_index_keys.make(
    UPSTREAM_VARIANTS, UPSTREAM_MULTIKEY, storage.encode_value_directed, storage.COMPOUND_SEP)

FIELDS = ["status", "lane", "at", "url", "note.status", "note.next_at", "a.b.c", "tags",
          "items.k", "owner"]
DIRECTIONS = [1, -1, 1, -1, 1.0, -1.0, 2, -0.5, True, "hashed", "2dsphere", float("nan")]


def _scalar(rnd: random.Random):
    return rnd.choice([
        None, True, False, 0, -7, 2**40, 1.5, float("-inf"), "", "queued", "é\0x",
        "x" * 200, b"\x00\xff", bson.ObjectId(b"0123456789ab"), bson.Int64(5),
        bson.Decimal128("1.10"), dt.datetime(2026, 12, 6, tzinfo=dt.timezone.utc),
        dt.datetime(1960, 1, 1), bson.Timestamp(5, 1), bson.MinKey(), bson.MaxKey(),
        bson.Regex("^a", "i"), {}, {"x": 1, "y": [1]}])


def _value(rnd: random.Random, depth: int = 0):
    roll = rnd.random()
    if depth < 2 and roll < 0.15:
        return [_value(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    if depth < 2 and roll < 0.3:
        return {key: _value(rnd, depth + 1) for key in rnd.sample(["b", "c", "k", "0"], 2)}
    return _scalar(rnd)


def _doc(rnd: random.Random) -> dict:
    doc: dict = {"_id": rnd.randrange(10**6)}
    for name in ["status", "lane", "at", "url", "note", "a", "tags", "items", "owner"]:
        if rnd.random() < 0.7:
            doc[name] = _value(rnd)
    if rnd.random() < 0.5:
        doc["note"] = {"status": _scalar(rnd), "next_at": _scalar(rnd)}
    if rnd.random() < 0.3:
        doc["a"] = {"b": {"c": _scalar(rnd)}}
    return doc


def _outcome(fn, *args, **kwargs):
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - upstream's errors must be the same
        return "raised", type(exc), str(exc)


@pytest.mark.parametrize("seed", range(4))
def test_the_same_keys_as_upstream(seed):
    rnd = random.Random(seed)
    fast = 0
    for _ in range(3000):
        doc = _doc(rnd)
        spec = {field: rnd.choice(DIRECTIONS) for field in rnd.sample(FIELDS, rnd.randrange(1, 4))}
        sparse = rnd.random() < 0.4
        collation = None
        if rnd.random() < 0.1:
            collation = storage._parse_index_collation({"locale": "en", "strength": 2})
        expected = _outcome(UPSTREAM_VARIANTS, doc, spec, sparse=sparse, collation=collation)
        assert _outcome(variants, doc, spec, sparse=sparse, collation=collation) == expected, \
            (doc, spec, sparse)
        assert _outcome(makes_multikey, doc, spec) == _outcome(UPSTREAM_MULTIKEY, doc, spec), \
            (doc, spec)
        fast += expected[0] == "ok" and len(expected[1]) == 1
    assert fast > 1000  # the common case was exercised, not only fallbacks


def test_task_documents_take_the_direct_path(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("upstream was asked")

    direct, multikey = embedded_index_keys.make(refuse, refuse, storage.encode_value_directed,
                                                storage.COMPOUND_SEP)
    now = dt.datetime(2026, 12, 6, tzinfo=dt.timezone.utc)
    task = {"_id": "t1", "status": "queued", "lane": 0, "lease_until": now, "client": "::1",
            "created_at": now, "url": "http://x/y", "notification": {"status": "none"},
            "history": [{"at": now}]}
    for spec in [{"status": 1, "lane": 1, "lease_until": 1}, {"created_at": -1},
                 {"notification.status": 1, "notification.next_at": 1}]:
        assert direct(task, spec, sparse=False) == UPSTREAM_VARIANTS(task, spec, sparse=False)
        assert multikey(task, spec) is False
    assert direct(task, {"owner": 1, "manifest": 1}, sparse=True) == []  # in neither


def test_inverted_bytes_are_upstreams():
    rnd = random.Random(9)
    for data in [b"", b"\x00", b"\xff\x00\x7f", *(rnd.randbytes(rnd.randrange(64))
                                                   for _ in range(200))]:
        assert embedded_index_keys.invert_bytes(data) == UPSTREAM_INVERT(data)
