"""storage.conditional's pipelines write what the update operators they
stand for write: the same documents as ``$set`` (dotted paths included)
where the condition holds, and nothing where it does not."""

import datetime as dt
import random

import pytest
from pymongo import MongoClient

from service.storage.conditional import each_only_if, merged, only_if


@pytest.fixture(scope="module")
def pair(mongo):
    client = MongoClient(mongo, tz_aware=True)
    db = client["conditional"]
    yield db["by_pipeline"], db["by_operators"]
    client.drop_database("conditional")


VALUES = [None, 0, 7, "done", "$status", "$$ROOT", {"$add": [1, 2]}, {"a": {"b": None}},
          ["x", {"$literal": 1}], dt.datetime(2026, 12, 6, tzinfo=dt.UTC)]


def _doc(i: int) -> dict:
    doc = {"_id": f"t{i}", "status": "running", "claim": f"c{i}", "n": i}
    if i % 2:
        doc["notification"] = {"status": "pending", "attempts": 1}
    return doc


def _fields(rng: random.Random) -> dict:
    names = ["status", "md5", "error", "n", "new", "notification.next_at",
             "notification.status", "callback.next_at"]
    return {name: rng.choice(VALUES) for name in rng.sample(names, rng.randrange(1, 6))}


def _fresh(pair, n: int) -> list[dict]:
    """Both collections holding the same ``n`` documents, which it returns."""
    docs = [_doc(i) for i in range(n)]
    for coll in pair:
        coll.delete_many({})
        coll.insert_many([dict(d) for d in docs])
    return docs


def _by_id(coll):
    return {d["_id"]: d for d in coll.find()}


def test_a_batch_of_conditional_ends_writes_what_set_writes(pair):
    by_pipeline, by_operators = pair
    rng = random.Random(5)
    for _ in range(30):
        docs = _fresh(pair, 12)
        cases = []
        for doc in rng.sample(docs, 8):
            fields, holds = _fields(rng), rng.random() < 0.7
            claim = doc["claim"] if holds else "another"
            cases.append((doc["_id"], {"$eq": ["$claim", {"$literal": claim}]},
                          {**merged(fields), "seen": {"$add": ["$n", 1]}}))
            if holds:
                by_operators.update_one({"_id": doc["_id"]},
                                        {"$set": {**fields, "seen": doc["n"] + 1}})
        result = by_pipeline.update_many({"_id": {"$in": [c[0] for c in cases]}},
                                         each_only_if(cases))
        expected = _by_id(by_operators)
        assert _by_id(by_pipeline) == expected
        assert result.modified_count == sum(
            expected[c[0]] != _doc(int(c[0][1:])) for c in cases)


def test_one_conditional_write_writes_what_set_writes(pair):
    by_pipeline, by_operators = pair
    rng = random.Random(9)
    for _ in range(20):
        _fresh(pair, 3)
        fields = _fields(rng)
        by_pipeline.update_many({}, only_if({"$eq": ["$status", "running"]}, merged(fields)))
        by_operators.update_many({}, {"$set": fields})
        assert _by_id(by_pipeline) == _by_id(by_operators)


def test_documents_without_a_case_are_left_alone(pair):
    """The cases' rows are found by ``_id``: a document the filter reaches
    but no case names (its index is -1, the last row) keeps itself."""
    by_pipeline, _ = pair
    docs = _fresh(pair, 6)
    cases = [(d["_id"], {"$literal": True}, merged({"status": "done"})) for d in docs[:3]]
    result = by_pipeline.update_many({}, each_only_if(cases))
    assert result.modified_count == 3
    after = _by_id(by_pipeline)
    assert [after[d["_id"]]["status"] for d in docs] == ["done"] * 3 + ["running"] * 3


def test_an_id_with_two_cases_takes_the_first_that_holds(pair):
    by_pipeline, _ = pair
    docs = _fresh(pair, 2)
    first, second = docs[0]["_id"], docs[1]["_id"]
    cases = [(first, {"$eq": ["$claim", {"$literal": "another"}]}, merged({"status": "a"})),
             (first, {"$eq": ["$claim", {"$literal": "c0"}]}, merged({"status": "b"})),
             (first, {"$literal": True}, merged({"status": "c"})),
             (second, {"$literal": True}, merged({"status": "d"}))]
    by_pipeline.update_many({"_id": {"$in": [first, second]}}, each_only_if(cases))
    after = _by_id(by_pipeline)
    assert (after[first]["status"], after[second]["status"]) == ("b", "d")
