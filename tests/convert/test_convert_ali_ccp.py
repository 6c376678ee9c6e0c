"""Ali-CCP converter on small files in the raw release format."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys_mtl.cli import main
from recsys_mtl.data.convert import ConvertError, convert
from recsys_mtl.data.reader import check_dataset, make_dataloader
from recsys_mtl.data.schema import Schema


def _features(entries: list[tuple[str, int]]) -> str:
    return "\x01".join(f"{field}\x02{fid}\x031.0" for field, fid in entries)


def _write_split(tmp: Path, name: str, rng: np.random.Generator, n_users: int, n_rows: int, gz: bool) -> dict:
    """Writes sample_skeleton_<name>.csv and common_features_<name>.csv; returns the ground truth."""
    users = {}
    common_lines = []
    for u in range(n_users):
        key = hashlib.md5(f"{name}{u}".encode()).hexdigest()
        cats = sorted(rng.choice(np.arange(5000, 5010), size=int(rng.integers(1, 4)), replace=False).tolist())
        uid = (100 if name == "train" else 1000) + u
        entries = [("101", uid), ("121", 200 + u % 3)] + [("109_14", c) for c in cats]
        users[key] = {"f101": [uid], "f121": [200 + u % 3], "f109_14": cats}
        common_lines.append(f"{key},{len(entries)},{_features(entries)}\n")
    keys = list(users)
    truth = {"rows": []}
    skel_lines = []
    for i in range(n_rows):
        key = keys[int(rng.integers(len(keys)))] if i % 10 else "ffffffffffffffffffffffffffffffff"  # no match
        item = int(rng.integers(0, 8)) if i % 7 else 999_000 + i  # unique ids: rare
        entries = [("205", 300 + item), ("206", 400 + item % 2), ("301", 7)]
        if i % 3 == 0:
            entries += [("853", 600 + i % 4), ("853", 650)]
        click = int(rng.random() < 0.3)
        buy = int(click and rng.random() < 0.3)
        skel_lines.append(f"{i},{click},{buy},{key},{len(entries)},{_features(entries)}\n")
        own = {}
        for f, fid in entries:
            own.setdefault(f"f{f}", []).append(fid)
        truth["rows"].append({"click": click, "purchase": buy, "user": users.get(key), **own})
    opener = (lambda p: gzip.open(p, "wt")) if gz else (lambda p: open(p, "w"))
    ext = ".csv.gz" if gz else ".csv"
    with opener(tmp / f"sample_skeleton_{name}{ext}") as f:
        f.writelines(skel_lines)
    with opener(tmp / f"common_features_{name}{ext}") as f:
        f.writelines(common_lines)
    truth["files"] = [tmp / f"sample_skeleton_{name}{ext}", tmp / f"common_features_{name}{ext}"]
    return truth


def _decoder(d: Path, feature: str):
    v = pq.read_table(d / "vocab" / f"{feature}.parquet").to_pydict()
    return dict(zip(v["id"], v["value"]))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ali")
    rng = np.random.default_rng(0)
    train = _write_split(tmp, "train", rng, n_users=12, n_rows=300, gz=False)
    test = _write_split(tmp, "test", rng, n_users=6, n_rows=80, gz=True)
    out = tmp / "ds"
    convert("ali-ccp", train["files"] + test["files"], out, min_count=2, row_group_size=64)
    return out, train, test


def test_schema_split_and_labels(converted):
    out, train, test = converted
    schema = Schema.load(out)
    assert check_dataset(out) == {"train": 300, "eval": 80}
    assert schema.task_names == ["click", "purchase"] and schema.user_id_feature == "f101"
    assert schema.sparse_names == ["f101", "f109_14", "f121", "f205", "f206", "f301", "f853"]
    sides = {f.name: f.side for f in schema.sparse}
    assert sides["f101"] == sides["f109_14"] == "user" and sides["f205"] == "item" and sides["f853"] == "context"
    multi = {f.name for f in schema.sparse if f.multi_hot}
    assert multi == {"f109_14", "f853"}  # several ids per row in the train data
    for split, truth in (("train", train), ("eval", test)):
        t = pq.read_table(sorted((out / split).glob("*.parquet")))
        assert t.column("click").to_pylist() == [float(r["click"]) for r in truth["rows"]]
        assert t.column("purchase").to_pylist() == [float(r["purchase"]) for r in truth["rows"]]
    n = sum(b.batch_size for b in make_dataloader(out, "train", batch_size=50))
    assert n == 300


def test_join_with_common_features_and_multi_hot(converted):
    out, train, _ = converted
    t = pq.read_table(sorted((out / "train").glob("*.parquet"))).to_pydict()
    user, cats, ctx = _decoder(out, "f101"), _decoder(out, "f109_14"), _decoder(out, "f853")
    for i, r in enumerate(train["rows"]):
        if r["user"] is None:  # index missing from common_features: empty user side
            assert t["f101"][i] == 0 and t["f109_14"][i] == []
            continue
        assert user.get(t["f101"][i]) == r["user"]["f101"][0]  # every user appears >= 2 times
        assert [cats[j] for j in t["f109_14"][i]] == r["user"]["f109_14"]
        assert [ctx[j] for j in t["f853"][i]] == r.get("f853", [])  # skeleton's own multi-hot field


def test_min_count_maps_rare_ids_to_zero(converted):
    out, train, test = converted
    t = pq.read_table(sorted((out / "train").glob("*.parquet"))).to_pydict()
    item = _decoder(out, "f205")
    counts = {}
    for r in train["rows"]:
        counts[r["f205"][0]] = counts.get(r["f205"][0], 0) + 1
    for i, r in enumerate(train["rows"]):
        raw = r["f205"][0]
        if counts[raw] >= 2:
            assert item[t["f205"][i]] == raw
        else:
            assert t["f205"][i] == 0
    assert 0 in t["f205"] and Schema.load(out).feature("f205").num_embeddings == sum(c >= 2 for c in counts.values()) + 1
    ev = pq.read_table(sorted((out / "eval").glob("*.parquet"))).to_pydict()
    assert all(i == 0 for i, r in zip(ev["f101"], test["rows"]) if r["user"] is not None)  # test users unseen


def test_malformed_input(tmp_path, capsys):
    (tmp_path / "common_features_train.csv").write_text(f"abc,1,{_features([('101', 1)])}\n")
    skel = tmp_path / "sample_skeleton_train.csv"
    good = f"1,0,0,abc,2,{_features([('205', 1), ('206', 2)])}\n"
    skel.write_text(good + f"2,0,0,abc,3,{_features([('205', 1), ('206', 2)])}\n")
    files = [skel, tmp_path / "common_features_train.csv"]
    with pytest.raises(ConvertError, match=r"sample_skeleton_train\.csv, line 2: num_features is 3"):
        convert("ali-ccp", files, tmp_path / "a")
    skel.write_text(good + good + "3,0,0,abc,1,205\x03x\n")
    with pytest.raises(ConvertError, match=r"line 3: malformed feature entry"):
        convert("ali-ccp", files, tmp_path / "b")
    skel.write_text(good + "2,0,0,abc\n")
    with pytest.raises(ConvertError, match=r"line 2: expected 6 fields"):
        convert("ali-ccp", files, tmp_path / "c")
    skel.write_text(good + f"2,2,0,abc,1,{_features([('205', 1)])}\n")
    assert main(["data", "convert", "ali-ccp", "--input", *map(str, files), "--out", str(tmp_path / "d")]) == 2
    assert "line 2: column 'click': expected a 0/1 label" in capsys.readouterr().err
    with pytest.raises(ConvertError, match="no common_features"):
        convert("ali-ccp", [skel], tmp_path / "e")
