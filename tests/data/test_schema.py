"""Schema: JSON round trip, validation errors, fingerprint."""

from __future__ import annotations

import json

import pytest

from recsys_mtl.data.schema import SCHEMA_FILE, DenseFeature, Schema, SchemaError, SparseFeature, TaskSpec


def _schema(**overrides) -> Schema:
    kwargs = dict(
        sparse=(
            SparseFeature("user_id", 100, side="user"),
            SparseFeature("tags", 50, multi_hot=True, pooling="mean", side="item"),
        ),
        dense=(DenseFeature("d0"), DenseFeature("d1")),
        tasks=(TaskSpec("click"), TaskSpec("watch_time", "regression")),
        user_id_feature="user_id",
        metadata={"generator": "test"},
    )
    kwargs.update(overrides)
    return Schema(**kwargs)


def test_round_trip_dict_and_file(tmp_path):
    s = _schema()
    assert Schema.from_dict(s.to_dict()) == s
    path = s.save(tmp_path)
    assert path == tmp_path / SCHEMA_FILE
    loaded = Schema.load(tmp_path)
    assert loaded == s
    assert loaded.metadata == {"generator": "test"}
    assert loaded.sparse_names == ["user_id", "tags"]
    assert loaded.dense_names == ["d0", "d1"]
    assert loaded.task_names == ["click", "watch_time"]
    assert loaded.feature("tags").multi_hot and loaded.feature("tags").pooling == "mean"
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file


def test_fingerprint_ignores_metadata_but_not_shape():
    s = _schema()
    assert s.fingerprint() == _schema(metadata={"other": 1}).fingerprint()
    bigger = _schema(sparse=(SparseFeature("user_id", 101, side="user"),))
    assert s.fingerprint() != bigger.fingerprint()


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(dense=(DenseFeature("click"),)), "duplicate column names"),
        (dict(tasks=()), "at least one task"),
        (dict(sparse=(SparseFeature("user_id", 0),)), "num_embeddings=0"),
        (dict(sparse=(SparseFeature("user_id", 5, pooling="max"),)), "unknown pooling"),
        (dict(sparse=(SparseFeature("user_id", 5, side="device"),)), "unknown side"),
        (dict(tasks=(TaskSpec("click", "ranking"),)), "unknown kind"),
        (dict(user_id_feature="d0"), "user_id_feature 'd0' is not a sparse feature"),
    ],
)
def test_invalid_schema_raises(overrides, match):
    with pytest.raises(SchemaError, match=match):
        _schema(**overrides)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(SchemaError, match="schema file not found"):
        Schema.load(tmp_path)
    (tmp_path / SCHEMA_FILE).write_text("{not json")
    with pytest.raises(SchemaError, match=f"{SCHEMA_FILE}: not valid JSON"):
        Schema.load(tmp_path)
    d = _schema().to_dict()
    d["sparse_features"] = []
    (tmp_path / SCHEMA_FILE).write_text(json.dumps(d))
    with pytest.raises(SchemaError, match=r"unknown schema keys \['sparse_features'\]"):
        Schema.load(tmp_path)
    d = _schema().to_dict()
    d["sparse"][0]["vocab"] = 3
    (tmp_path / SCHEMA_FILE).write_text(json.dumps(d))
    with pytest.raises(SchemaError, match="malformed schema"):
        Schema.load(tmp_path)
    d = _schema().to_dict()
    del d["tasks"]
    (tmp_path / SCHEMA_FILE).write_text(json.dumps(d))
    with pytest.raises(SchemaError, match="malformed schema"):
        Schema.load(tmp_path)


def test_feature_lookup_error():
    with pytest.raises(KeyError, match="no sparse feature 'nope'"):
        _schema().feature("nope")
