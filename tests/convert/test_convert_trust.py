"""Ciao / Epinions converter (recsys_mtl.data.convert.trust) on synthetic .mat files and the real Ciao release."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io

from recsys_mtl.cli import main
from recsys_mtl.data.convert import ConvertError, convert
from recsys_mtl.data.convert.trust import DEFAULT_SEED, convert_trust, core_filter, split_sizes
from recsys_mtl.data.schema import Schema

CIAO = Path("/work/shared/data/ciao")

# raw rows: userid, productid, categoryid, rating, helpfulness (non-contiguous ids, repeats, ties)
RATINGS = [
    [10, 500, 3, 4, 1],
    [3, 500, 3, 5, 2],
    [42, 70, 9, 2, 1],
    [3, 70, 4, 1, 1],
    [10, 500, 7, 1, 1],  # repeated pair (10, 500): dropped, but its category still counts
    [7, 70, 4, 3, 1],
    [42, 500, 7, 4, 1],
    [7, 12, 9, 5, 1],
    [10, 12, 9, 4, 1],
    [3, 12, 2, 3, 1],
    [42, 12, 9, 1, 1],
    [7, 900, 2, 2, 1],
    [10, 900, 5, 5, 1],
]
TRUST = [[3, 10], [10, 3], [3, 10], [42, 42], [7, 99], [8, 3], [42, 7], [10, 42]]


def _write_pair(d: Path, ratings=RATINGS, trust=TRUST, *, rating_var: str = "rating", trust_var: str = "trustnetwork",
                rating_file: str = "rating.mat", trust_file: str = "trustnetwork.mat", dtype=np.int32):
    d.mkdir(parents=True, exist_ok=True)
    r, t = d / rating_file, d / trust_file
    scipy.io.savemat(r, {rating_var: np.array(ratings, dtype)})
    scipy.io.savemat(t, {trust_var: np.array(trust, np.uint16 if dtype == np.int32 else dtype)})
    return r, t


def _read(path: Path) -> dict:
    return pq.read_table(path).to_pydict()


def _expected_interactions(ratings=RATINGS) -> list[tuple[int, int, float]]:
    seen, out = set(), []
    for u, p, _, r, *_ in ratings:
        if (u, p) not in seen:
            seen.add((u, p))
            out.append((u, p, float(r)))
    return out


def test_synthetic_mapping_split_and_side_tables(tmp_path, capsys):
    r, t = _write_pair(tmp_path / "raw")
    out = tmp_path / "ds"
    schema = convert_trust("ciao", [t, r], out, seed=5)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("ciao: ") for line in lines)
    assert "loaded 13 ratings" in lines[0] and "kept 4 of 8" in lines[3]

    users, items = [3, 7, 10, 42], [12, 70, 500, 900]
    uid, iid = {u: i for i, u in enumerate(users)}, {p: i for i, p in enumerate(items)}
    assert _read(out / "vocab" / "user.parquet") == {"raw": users, "id": [0, 1, 2, 3]}
    assert _read(out / "vocab" / "item.parquet") == {"raw": items, "id": [0, 1, 2, 3]}
    # majorities: 12 -> 9 (3 of 4), 70 -> 4 (2 of 3), 500 -> tie 3/7 -> 3, 900 -> tie 2/5 -> 2
    assert _read(out / "vocab" / "category.parquet") == {"raw": [2, 3, 4, 9], "id": [0, 1, 2, 3]}
    assert _read(out / "side" / "item_category.parquet") == {"item": [0, 1, 2, 3], "category": [3, 2, 1, 0]}
    # trust: (3,10) twice, (42,42) self-loop, (7,99) and (8,3) unknown endpoints
    want = sorted({(uid[a], uid[b]) for a, b in [[3, 10], [10, 3], [42, 7], [10, 42]]})
    tr = _read(out / "side" / "trust.parquet")
    assert list(zip(tr["user"], tr["friend"])) == want

    inter = [(uid[u], iid[p], x) for u, p, x in _expected_interactions()]
    n = len(inter)
    assert n == 12 and split_sizes(n, (0.6, 0.2, 0.2)) == (7, 3, 2)
    perm = np.random.default_rng(5).permutation(n)
    shuffled = [inter[j] for j in perm]
    got = {}
    for part in ("train", "eval", "test"):
        d = _read(out / part / "part-00000.parquet")
        got[part] = list(zip(d["user"], d["item"], d["rating"]))
    assert got["train"] == shuffled[:7] and got["eval"] == shuffled[7:10] and got["test"] == shuffled[10:]
    for part in ("train", "eval", "test"):
        sch = pq.read_schema(out / part / "part-00000.parquet")
        assert sch.names == ["user", "item", "rating"] and [str(x) for x in sch.types] == ["int64", "int64", "float"]
    for path, names in (("side/trust.parquet", ["user", "friend"]), ("side/item_category.parquet", ["item", "category"]),
                        ("vocab/user.parquet", ["raw", "id"])):
        sch = pq.read_schema(out / path)
        assert sch.names == names and [str(x) for x in sch.types] == ["int64", "int64"]

    loaded = Schema.load(out)
    assert loaded == schema and loaded.task_names == ["rec", "social", "category"]
    assert [(f.name, f.num_embeddings, f.side) for f in loaded.sparse] == [("user", 4, "user"), ("item", 4, "item")]
    assert loaded.dense == () and loaded.user_id_feature == "user"
    m = loaded.metadata
    assert m["format"] == "interactions" and m["source"] == "ciao" and m["seed"] == 5 and m["core"] == 0
    assert m["split"] == [0.6, 0.2, 0.2] and m["interactions"] == {"train": 7, "eval": 3, "test": 2}
    assert (m["num_users"], m["num_items"], m["num_categories"], m["trust_edges"]) == (4, 4, 4, 4)
    assert m["trust_dropped"] == {"unknown_endpoint": 2, "self_loop": 1, "duplicate": 1}
    assert m["side"] == {"trust": "side/trust.parquet", "item_category": "side/item_category.parquet"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "raw"]  # no temporary directory left


def _split_pairs(out: Path) -> dict[str, list[tuple[int, int]]]:
    res = {}
    for part in ("train", "eval", "test"):
        d = _read(out / part / "part-00000.parquet")
        res[part] = list(zip(d["user"], d["item"]))
    return res


def _random_ratings(seed: int, n: int = 600) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(rng.integers(1, 40)), int(rng.integers(1, 80)), int(rng.integers(1, 6)), int(rng.integers(1, 6)), 1]
            for _ in range(n)]


def test_split_is_a_deterministic_partition(tmp_path):
    ratings = _random_ratings(0)
    trust = [[a, b] for a in range(1, 40, 3) for b in range(2, 40, 7)]
    r, t = _write_pair(tmp_path / "raw", ratings, trust)
    for name, seed in (("a", DEFAULT_SEED), ("b", DEFAULT_SEED), ("c", DEFAULT_SEED + 1)):
        convert_trust("epinions", [r, t], tmp_path / name, seed=seed, quiet=True)
    a, b, c = (_split_pairs(tmp_path / name) for name in "abc")
    assert a == b and a != c
    vocab_u = _read(tmp_path / "a" / "vocab" / "user.parquet")["raw"]
    vocab_i = _read(tmp_path / "a" / "vocab" / "item.parquet")["raw"]
    dedup = {(u, p) for u, p, *_ in ratings}
    for split in (a, c):
        pairs = split["train"] + split["eval"] + split["test"]
        assert len(pairs) == len(set(pairs)) == len(dedup)  # no overlap, nothing lost
        assert {(vocab_u[u], vocab_i[i]) for u, i in pairs} == dedup
        assert tuple(len(split[p]) for p in ("train", "eval", "test")) == split_sizes(len(dedup), (0.6, 0.2, 0.2))
    s = convert_trust("ciao", [r, t], tmp_path / "d", split=(0.5, 0.25, 0.25), quiet=True)
    assert s.metadata["interactions"] == dict(zip(("train", "eval", "test"), split_sizes(len(dedup), (0.5, 0.25, 0.25))))


def test_core_filter_cascades(tmp_path):
    # core 2: item 30 has users 3, 4; user 4 has one rating -> out, then item 30 -> out, then user 3 -> out
    ratings = [[1, 10, 1, 5], [1, 20, 2, 4], [2, 10, 1, 3], [2, 20, 2, 2], [3, 10, 1, 1], [3, 30, 3, 5], [4, 30, 3, 4]]
    trust = [[1, 2], [2, 1], [3, 1], [4, 2]]
    r, t = _write_pair(tmp_path / "raw", ratings, trust, dtype=np.float64)  # 4 columns, MATLAB doubles
    s = convert_trust("epinions", [r, t], tmp_path / "ds", core=2, quiet=True)
    m = s.metadata
    assert (m["num_users"], m["num_items"], m["num_categories"], m["core"]) == (2, 2, 2, 2)
    assert sum(m["interactions"].values()) == 4 and m["trust_edges"] == 2
    assert m["trust_dropped"] == {"unknown_endpoint": 2, "self_loop": 0, "duplicate": 0}
    assert _read(tmp_path / "ds" / "vocab" / "item.parquet")["raw"] == [10, 20]
    s0 = convert_trust("epinions", [r, t], tmp_path / "ds0", quiet=True)
    assert (s0.metadata["num_users"], s0.metadata["num_items"]) == (4, 3)

    rng = np.random.default_rng(1)
    u, i = rng.integers(0, 30, 400), rng.integers(0, 50, 400)
    keep = core_filter(u, i, 4)
    pairs = list(zip(u.tolist(), i.tolist()))
    alive = [True] * len(pairs)
    while True:  # brute force
        cu, ci = {}, {}
        for (a, b), k in zip(pairs, alive):
            if k:
                cu[a], ci[b] = cu.get(a, 0) + 1, ci.get(b, 0) + 1
        new = [k and cu[a] >= 4 and ci[b] >= 4 for (a, b), k in zip(pairs, alive)]
        if new == alive:
            break
        alive = new
    assert keep.tolist() == alive and 0 < sum(alive) < len(pairs)


def test_inputs_found_by_variable_file_name_or_shape(tmp_path):
    ratings = [r[:4] for r in RATINGS]
    # epinions-like: 4 columns, other variable names; file names tell the roles
    r, t = _write_pair(tmp_path / "a", ratings, TRUST, rating_var="R", trust_var="T", rating_file="ratings_all.mat",
                       trust_file="trust.mat", dtype=np.float64)
    assert convert_trust("epinions", [t, r], tmp_path / "out_a", quiet=True).metadata["num_users"] == 4
    # neither names help: 4 columns = ratings, 2 columns = trust edges
    r, t = _write_pair(tmp_path / "b", ratings, TRUST, rating_var="x", trust_var="y", rating_file="one.mat",
                       trust_file="two.mat")
    assert convert_trust("epinions", [r, t], tmp_path / "out_b", quiet=True).metadata["trust_edges"] == 4


def _err(inputs, out, **kw) -> str:
    with pytest.raises(ConvertError) as e:
        convert_trust("ciao", inputs, out, quiet=True, **kw)
    return str(e.value)


def test_bad_inputs_name_the_file(tmp_path):
    r, t = _write_pair(tmp_path / "raw")
    out = tmp_path / "ds"
    missing = tmp_path / "nope.mat"
    assert str(missing) in _err([r, missing], out) and "not found" in _err([r, missing], out)
    text = tmp_path / "rating.mat.txt"
    text.write_text("1,2,3,4,5\n")
    msg = _err([text, t], out)
    assert str(text) in msg and "not a MATLAB .mat file" in msg
    empty = tmp_path / "empty.mat"
    scipy.io.savemat(empty, {})
    assert str(empty) in _err([r, empty], out) and "no matrix variable" in _err([r, empty], out)
    two = tmp_path / "two.mat"
    scipy.io.savemat(two, {"rating": np.ones((2, 5)), "other": np.ones((2, 5))})
    assert "expected one matrix variable" in _err([two, t], out)
    bad = _write_pair(tmp_path / "cols", [row[:3] for row in RATINGS])[0]
    msg = _err([bad, t], out)
    assert str(bad) in msg and "3 columns" in msg
    bad_t = _write_pair(tmp_path / "tcols", RATINGS, [[1, 2, 3, 4]])[1]
    msg = _err([r, bad_t], out)
    assert str(bad_t) in msg and "4 columns" in msg
    zero = _write_pair(tmp_path / "zero", RATINGS[:3] + [[0, 5, 1, 1, 1]])[0]
    msg = _err([zero, t], out)
    assert str(zero) in msg and "row 4" in msg and "positive integer id" in msg
    frac = _write_pair(tmp_path / "frac", [[1.5, 2, 1, 3]] + [[1, 2, 1, 3]], dtype=np.float64)[0]
    msg = _err([frac, t], out)
    assert str(frac) in msg and "row 1" in msg and "integer id" in msg
    neg_t = _write_pair(tmp_path / "negt", RATINGS, [[3, 10], [-1, 3]], dtype=np.float64)[1]
    assert str(neg_t) in _err([r, neg_t], out)
    msg = _err([r, r], out)
    assert "second rating file" in msg
    assert "expected two inputs" in _err([r], out)
    msg = _err([r, t], out, core=50)
    assert str(r) in msg and "no interactions left" in msg
    lonely = _write_pair(tmp_path / "lonely", RATINGS, [[1000, 1001]])[1]
    assert str(lonely) in _err([r, lonely], out)
    tiny = _write_pair(tmp_path / "tiny", RATINGS[:2])[0]
    assert "would be empty" in _err([tiny, t], out)
    assert not out.exists() and not list(tmp_path.glob("ds.tmp-*"))


def test_existing_output_refused_unless_overwrite(tmp_path):
    r, t = _write_pair(tmp_path / "raw")
    out = tmp_path / "ds"
    out.mkdir()
    convert_trust("ciao", [r, t], out, quiet=True)  # an empty directory is fine
    (out / "keep.txt").write_text("x")
    assert "not empty" in _err([r, t], out) and (out / "keep.txt").exists()
    convert_trust("ciao", [r, t], out, quiet=True, overwrite=True, seed=1)
    assert not (out / "keep.txt").exists() and Schema.load(out).metadata["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "raw"]
    assert convert("ciao", [r, t], tmp_path / "via_convert", quiet=True).metadata["source"] == "ciao"


def test_cli(tmp_path, capsys):
    r, t = _write_pair(tmp_path / "raw")
    out = tmp_path / "ds"
    assert main(["data", "convert", "epinions", "--input", str(t), str(r), "--out", str(out), "--seed", "9",
                 "--core", "0", "--split", "0.5,0.25,0.25"]) == 0
    stdout = capsys.readouterr().out
    assert "epinions: split (seed 9): train 6, eval 3, test 3" in stdout and "wrote" in stdout.splitlines()[-1]
    m = Schema.load(out).metadata
    assert m["source"] == "epinions" and m["seed"] == 9 and m["split"] == [0.5, 0.25, 0.25]
    assert main(["data", "convert", "ciao", "--input", str(r), str(t), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["data", "convert", "ciao", "--input", str(r), str(t), "--out", str(out), "--overwrite"]) == 0
    assert Schema.load(out).metadata["seed"] == DEFAULT_SEED
    assert main(["data", "convert", "ciao", "--input", str(r), "--out", str(tmp_path / "x")]) == 2
    assert "expected two inputs" in capsys.readouterr().err
    assert main(["data", "convert", "ciao", "--input", str(r), str(t), "--out", str(tmp_path / "x"),
                 "--tasks", "a"]) == 2
    raw = tmp_path / "final_track2_train.txt"
    raw.write_text("1\t1\t1\t3\t4\t0\t1\t0\t-1\t7\t0\t15\n")
    assert main(["data", "convert", "icme2019", "--input", str(raw), "--out", str(tmp_path / "y"), "--core", "5"]) == 2
    assert "options of ciao and epinions" in capsys.readouterr().err


@pytest.mark.skipif(not (CIAO / "rating.mat").is_file(), reason="the Ciao release is not in /work/shared/data/ciao")
def test_real_ciao(tmp_path, capsys):
    start = time.perf_counter()
    s = convert_trust("ciao", [CIAO / "rating.mat", CIAO / "trustnetwork.mat"], tmp_path / "ciao")
    elapsed = time.perf_counter() - start
    m = s.metadata
    raw = scipy.io.loadmat(CIAO / "rating.mat")["rating"].astype(np.int64)
    distinct = np.unique(raw[:, :2], axis=0).shape[0]
    assert raw.shape[0] == 284_086 and (m["num_users"], m["num_items"]) == (7_375, 105_114)
    assert m["num_categories"] == 28 and m["raw"]["ratings"] == 284_086
    assert sum(m["interactions"].values()) == distinct
    assert tuple(m["interactions"].values()) == split_sizes(distinct, (0.6, 0.2, 0.2))
    assert m["trust_edges"] <= 111_781 and m["trust_edges"] + sum(m["trust_dropped"].values()) == 111_781
    for part, n in m["interactions"].items():
        d = pq.read_table(tmp_path / "ciao" / part / "part-00000.parquet")
        assert d.num_rows == n
        assert 0 <= min(d["user"].to_pylist()) and max(d["user"].to_pylist()) < 7_375
        assert max(d["item"].to_pylist()) < 105_114
    assert pq.read_metadata(tmp_path / "ciao" / "side" / "item_category.parquet").num_rows == 105_114
    assert elapsed < 30, elapsed
    print(f"ciao: {elapsed:.2f} s")
