"""The embedded database's write-path fixes (service/runtime/embedded_patches.py)
must not change a single answer. The same random writes run on a patched and
an unpatched SecantusDB, with indexes created and dropped between them, and
every index's answers are compared: between the two servers, and on the
patched one against a scan of the whole collection. A second test creates
and drops indexes while other threads write."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import random
import threading
import time

import pytest
from pymongo import MongoClient
from pymongo.errors import DuplicateKeyError, OperationFailure

from service.runtime import embedded_patches
from service.storage.conditional import each_only_if, merged
from service.runtime.embedded_db import EmbeddedDatabase

# (name, keys, options): compound, sparse, partial, multikey (tags is an
# array in some documents), collation, unique (the patch leaves unique
# indexes on upstream's path, and they must still refuse duplicates).
INDEXES = [
    ("claim", [("status", 1), ("lane", 1), ("lease_until", 1)], {}),
    ("client", [("client", 1), ("status", 1)], {}),
    ("note", [("note.status", 1), ("note.next_at", 1)], {"sparse": True}),
    ("mine", [("owner", 1), ("n", -1)], {"sparse": True}),
    ("open", [("n", 1)], {"partialFilterExpression": {"status": "queued"}}),
    ("tags", [("tags", 1)], {}),
    ("names", [("name", 1)], {"collation": {"locale": "en", "strength": 2}}),
    ("serial", [("serial", 1)], {"unique": True, "sparse": True}),
    # a path through sub-documents or arrays (patch 9's direct keys, or
    # upstream's), and a descending date
    ("deep", [("at", -1), ("items.k", 1)], {}),
]
STATUSES = ["queued", "running", "done", "failed"]
EPOCH = dt.datetime(2026, 12, 6, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    patched = EmbeddedDatabase(str(tmp_path_factory.mktemp("patched")), database="eq")
    plain = EmbeddedDatabase(str(tmp_path_factory.mktemp("plain")), database="eq", patches=False)
    for db in (patched, plain):
        db.start()
    yield patched, plain
    for db in (patched, plain):
        db.stop()


def _client(db: EmbeddedDatabase) -> MongoClient:
    return MongoClient(db.uri, serverSelectionTimeoutMS=10000)


def test_the_patched_server_says_so_and_the_plain_one_does_not(servers):
    patched, plain = servers
    assert "embedded database patches applied" in (patched.data_dir / "secantusd.log").read_text()
    assert "patches" not in (plain.data_dir / "secantusd.log").read_text()


def test_another_version_runs_unpatched(monkeypatch, caplog):
    from secantus import storage
    before = storage.Storage._index_options_map
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.7.1")
    with caplog.at_level(logging.WARNING):
        assert embedded_patches.apply() is False
    assert storage.Storage._index_options_map is before
    assert "written for secantusdb 0.7.0b3, this is 0.7.1" in caplog.text


def _doc(rng: random.Random, i: int) -> dict:
    doc = {"_id": f"d{i:05d}", "n": rng.randrange(50), "status": rng.choice(STATUSES),
           "lane": rng.randrange(3), "lease_until": rng.randrange(1000),
           "client": rng.choice(["a", "b", "c"]), "name": rng.choice(["Ann", "ann", "Bob"])}
    if rng.random() < 0.4:
        doc["note"] = {"status": rng.choice(["pending", "sent"]), "next_at": rng.randrange(9)}
    if rng.random() < 0.3:
        doc["owner"] = rng.choice(["k1", "k2"])
    if rng.random() < 0.3:
        doc["tags"] = rng.sample(["x", "y", "z"], rng.randrange(1, 3))
    if rng.random() < 0.2:
        doc["serial"] = i
    if rng.random() < 0.5:
        doc["items"] = rng.choice([{"k": rng.choice("pq")}, [{"k": "p"}, {"k": "q"}], "p"])
    if rng.random() < 0.7:
        doc["at"] = EPOCH + dt.timedelta(seconds=rng.randrange(100))
    return doc


def _update(rng: random.Random, chosen: list[str] | None = None) -> object:
    kind = rng.randrange(7)
    if chosen and rng.random() < 0.5:
        # A batch of ends, as the service writes them (storage.conditional):
        # a condition each, values as literals, some of which look like
        # operators and field paths; read from a table by _id, or, when an
        # id comes twice (with tests that may fail), one $switch branch per
        # case where the first that holds wins (patch 8 must keep that order).
        cases = [
            (doc_id, rng.choice([{"$ne": ["$status", "gone"]},
                                 {"$eq": ["$status", rng.choice(STATUSES)]}]),
             merged({"status": rng.choice(STATUSES), "lease_until": rng.randrange(1000),
                     "note.status": "pending",
                     "result": {"$add": [1, 2], "path": "$n", "at": rng.random()}}))
            for doc_id in rng.sample(chosen, min(len(chosen), 8))
            for _ in range(rng.choice([1, 1, 2]))]
        rng.shuffle(cases)
        return each_only_if(cases)
    if kind == 0:
        return {"$set": {"status": rng.choice(STATUSES), "lease_until": rng.randrange(1000)}}
    if kind == 1:  # only fields no index reads: every entry stays
        return {"$set": {"payload": rng.random()}, "$inc": {"tries": 1}}
    if kind == 2:
        return {"$unset": {"note": "", "owner": ""}}
    if kind == 3:
        return {"$set": {"note": {"status": "pending", "next_at": rng.randrange(9)},
                         "owner": rng.choice(["k1", "k2"])}}
    if kind == 4:
        return {"$push": {"tags": rng.choice(["x", "y", "z", "w"])}}
    if kind == 5:
        return {"$set": {"name": rng.choice(["ANN", "bob", "Cy"]), "n": rng.randrange(50)}}
    # A pipeline, as the service's finish writes it.
    return [{"$set": {"status": {"$literal": rng.choice(STATUSES)},
                      "n": {"$add": [{"$ifNull": ["$n", 0]}, 1]}}}]


def _same_writes(colls, rng: random.Random, start: int, count: int) -> int:
    """One random step, applied alike to every collection in ``colls``;
    how many documents it inserted."""
    ids = [f"d{i:05d}" for i in range(start)]
    step = rng.randrange(6)
    if step == 0:
        docs = [_doc(rng, start + j) for j in range(count)]
        for coll in colls:
            coll.insert_many([dict(d) for d in docs], ordered=False)
        return count
    elif step in (1, 2):
        chosen = rng.sample(ids, min(len(ids), count))
        update = _update(rng, chosen)
        for coll in colls:
            coll.update_many({"_id": {"$in": chosen}}, update)
    elif step == 3:
        target, update = rng.choice(ids), _update(rng)
        for coll in colls:
            coll.update_one({"_id": target, "status": {"$ne": "gone"}}, update)
    elif step == 4:
        target = rng.choice(ids)
        serial = rng.randrange(start)
        for coll in colls:  # a unique index: maybe a duplicate, alike on both
            try:
                coll.update_one({"_id": target}, {"$set": {"serial": serial}})
            except DuplicateKeyError:
                pass
    else:
        chosen = rng.sample(ids, min(len(ids), max(1, count // 4)))
        for coll in colls:
            coll.delete_many({"_id": {"$in": chosen}})
    return 0


QUERIES = [{}, {"status": "queued"}, {"status": {"$in": ["running", "done"]}, "lane": 1},
           {"client": "a"}, {"note.status": "pending"}, {"owner": "k1"},
           {"n": {"$gte": 20}}, {"tags": "x"}, {"name": "ann"}, {"serial": {"$gte": 0}},
           {"items.k": "p"}, {"at": {"$gte": EPOCH + dt.timedelta(seconds=50)}},
           {"at": {"$lt": EPOCH + dt.timedelta(seconds=20)}, "items.k": "q"}]


def _answers(coll, index: str | None) -> list:
    out = []
    for query in QUERIES:
        cursor = coll.find(query, {"_id": 1}).sort("_id", 1)
        if index is not None:
            cursor = cursor.hint(index)
        if index == "names":
            cursor = cursor.collation({"locale": "en", "strength": 2})
        try:
            out.append([d["_id"] for d in cursor])
        except OperationFailure as exc:  # a hint the query cannot use
            out.append(f"refused: {exc.code}")
    return out


def _indexes(coll) -> list[str]:
    return sorted(name for name in coll.index_information() if name != "_id_")


def test_same_answers_as_the_unpatched_server(servers):
    colls = [_client(db).get_default_database()["t"] for db in servers]
    for coll in colls:
        coll.drop()
    rng = random.Random(25)
    present: set[str] = set()
    count = 0
    for coll in colls:
        coll.insert_many([_doc(random.Random(i), i) for i in range(200)])
    count = 200
    for round_ in range(60):
        if round_ % 6 == 0:  # an index comes or goes, alike on both
            name, keys, options = rng.choice(INDEXES)
            built = []
            for coll in colls:
                if name in present:
                    coll.drop_index(name)
                    continue
                try:
                    coll.create_index(keys, name=name, **options)
                    built.append(True)
                except DuplicateKeyError:  # the unique index, over duplicates
                    built.append(False)
            assert len(set(built)) <= 1
            if name in present or all(built):
                present ^= {name}
        count += _same_writes(colls, rng, count, 40)
        patched, plain = colls
        assert _indexes(patched) == _indexes(plain) == sorted(present)
        for index in sorted(present):
            assert _answers(patched, index) == _answers(plain, index), (round_, index)
    # And every index on the patched server holds what a whole scan finds
    # for the documents it covers.
    patched = colls[0]
    for name, keys, options in INDEXES:
        if name not in present and not options.get("unique"):
            patched.create_index(keys, name=name, **options)
    scan = _answers(patched, None)
    for name in ("claim", "client", "tags", "deep"):
        assert _answers(patched, name) == scan, name
    assert patched.count_documents({}) == colls[1].count_documents({}) > 200
    assert patched.estimated_document_count() == colls[1].estimated_document_count() \
        == patched.count_documents({})
    # The documents themselves, field by field and in order.
    everything = [list(coll.find().sort("_id", 1)) for coll in colls]
    assert everything[0] == everything[1]
    assert sum("result" in doc for doc in everything[0]) > 10


SWITCHES = [
    # no branch for a document and no default: upstream's error, on both
    [{"$replaceWith": {"$switch": {"branches": [
        {"case": {"$and": [{"$eq": ["$_id", {"$literal": "s1"}]}]}, "then": "$$ROOT"}]}}}],
    # in field-value position: a missing path leaves the field out
    [{"$set": {"x": {"$switch": {"branches": [
        {"case": {"$and": [{"$eq": ["$_id", {"$literal": "s1"}]}, True]}, "then": "$nosuch"},
        {"case": {"$and": [{"$eq": ["$_id", {"$literal": "s2"}]}, False]}, "then": 1}],
        "default": "$n"}}}}],
    # an id twice (the first's test holds for s2, not for s1); a
    # non-string id (upstream's path); other shapes
    [{"$set": {"x": {"$switch": {"branches": [
        {"case": {"$and": [{"$eq": ["$_id", {"$literal": "s1"}]}, {"$gt": ["$n", 1]}]},
         "then": "first"},
        {"case": {"$and": [{"$eq": ["$_id", {"$literal": "s2"}]}, {"$gt": ["$n", 1]}]},
         "then": "first"},
        {"case": {"$and": [{"$eq": ["$_id", {"$literal": "s1"}]}]}, "then": "second"},
        {"case": {"$and": [{"$eq": ["$_id", {"$literal": "s2"}]}]}, "then": "second"}],
        "default": "none"}}}}],
    [{"$set": {"x": {"$switch": {"branches": [
        {"case": {"$and": [{"$eq": ["$_id", {"$literal": "s2"}]}]}, "then": "string"},
        {"case": {"$and": [{"$eq": ["$_id", {"$literal": 3}]}]}, "then": "number"}],
        "default": "none"}}}}],
    [{"$set": {"x": {"$switch": {"branches": [
        {"case": {"$eq": ["$_id", "s3"]}, "then": "plain"}], "default": "none"}}}}],
    [{"$set": {"x": {"$switch": {"branches": [
        {"case": {"$and": [{"$eq": ["$_id", {"$literal": "s1"}]}, {"$divide": [1, 0]}]},
         "then": "boom"}], "default": "none"}}}}],
]


@pytest.mark.parametrize("pipeline", SWITCHES)
def test_a_switch_on_ids_answers_as_upstream(servers, pipeline):
    """Patch 8: the same documents, or the same error, on both servers."""
    answers = []
    for server in servers:
        coll = _client(server).eq[f"switch{SWITCHES.index(pipeline)}"]
        coll.drop()
        coll.insert_many([{"_id": "s1", "n": 1}, {"_id": "s2", "n": 2}, {"_id": 3, "n": 9},
                          {"_id": "s3", "n": 4}])
        try:
            coll.update_many({}, pipeline)
            answers.append(("ok", list(coll.find().sort("n", 1))))
        except OperationFailure as exc:
            answers.append(("error", exc.code, str(exc.details.get("errmsg"))))
    assert answers[0] == answers[1]


def test_a_literal_is_data_and_an_expression_is_still_checked(servers):
    """Patch 4: what is inside a $literal is stored as it is (mongod does
    not parse it; unpatched SecantusDB refused it); the same expression
    outside one is refused by both servers alike."""
    colls = [_client(db).get_default_database()["lit"] for db in servers]
    bad_zone = {"$hour": {"date": "$d", "timezone": "Not/AZone"}}
    for coll in colls:
        coll.drop()
        coll.insert_one({"_id": 1, "d": 0})
    patched, plain = colls
    patched.update_one({"_id": 1}, [{"$set": {"x": {"$literal": bad_zone}}}])
    assert patched.find_one({"_id": 1})["x"] == bad_zone
    with pytest.raises(OperationFailure):
        plain.update_one({"_id": 1}, [{"$set": {"x": {"$literal": bad_zone}}}])
    codes = []
    for coll in colls:
        with pytest.raises(OperationFailure) as refused:
            coll.update_one({"_id": 1}, [{"$set": {"x": bad_zone}}])
        codes.append(refused.value.code)
    assert codes[0] == codes[1]


def test_indexes_made_and_dropped_under_writes(servers):
    patched, _ = servers
    coll = _client(patched).get_default_database()["busy"]
    coll.drop()
    rng = random.Random(7)
    coll.insert_many([_doc(rng, i) for i in range(600)])
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        own = random.Random(seed)
        try:
            while not stop.is_set():
                ids = [f"d{own.randrange(600):05d}" for _ in range(20)]
                coll.update_many({"_id": {"$in": ids}}, _update(own))
                coll.update_one({"_id": own.choice(ids)},
                                {"$set": {"status": own.choice(STATUSES)}})
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    try:
        for turn in range(24):
            name, keys, options = INDEXES[turn % 6]
            if name in coll.index_information():
                coll.drop_index(name)
            else:
                coll.create_index(keys, name=name, **options)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors
    for name, keys, options in INDEXES[:6]:
        if name not in coll.index_information():
            coll.create_index(keys, name=name, **options)
    scan = _answers(coll, None)
    for name in ("claim", "client", "tags"):
        assert _answers(coll, name) == scan, name
    # The sparse and partial indexes hold exactly the documents they cover.
    assert _answers(coll, "note")[4] == scan[4]
    assert _answers(coll, "mine")[5] == scan[5]
    assert ([d["_id"] for d in coll.find({"status": "queued"}, {"_id": 1}).sort("_id", 1)
             .hint("open")] == scan[1])


def test_a_collection_count_lets_other_statements_run(servers):
    """Patch 6: counting a big collection (estimated_document_count, as
    the queue counters' recount does) walks it in chunks; between them
    other clients' statements run, where upstream held its lock for the
    whole walk (9 s at a million tasks). Judged against the count's own
    length, not a clock."""
    patched = _client(servers[0]).get_default_database()
    big, other = patched["many"], patched["other"]
    big.drop()
    other.drop()
    for start in range(0, 120_000, 10_000):
        big.insert_many([{"_id": i} for i in range(start, start + 10_000)], ordered=False)
    other.insert_one({"_id": "probe"})
    assert patched.command("count", "missing_collection")["n"] == 0
    done_at: list[float] = []
    counting = threading.Event()
    finished = threading.Event()

    def probe() -> None:
        client = _client(servers[0]).get_default_database()["other"]
        counting.wait(10)
        while not finished.is_set():
            client.find_one({"_id": "probe"})
            done_at.append(time.monotonic())

    thread = threading.Thread(target=probe)
    thread.start()
    started = time.monotonic()
    counting.set()
    n = big.estimated_document_count()
    ended = time.monotonic()
    finished.set()
    thread.join(10)
    assert n == 120_000
    during = [started] + [t for t in done_at if started <= t <= ended] + [ended]
    longest = max(b - a for a, b in zip(during, during[1:]))
    assert len(during) > 5 and longest < (ended - started) / 2, (len(during), longest,
                                                                ended - started)
