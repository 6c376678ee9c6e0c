"""Synthetic generators: determinism, layout, schema, label knobs and learnable signal."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_mtl.data import Schema, generate_mmoe, generate_recsys
from recsys_mtl.data.synth import _MMoEWorld, _rank_auc, _RecsysWorld

SMALL = dict(num_users=500, num_items=1_000, num_categories=20, num_tags=100)


def _read(d, split: str) -> pa.Table:
    files = sorted((d / split).glob("part-*.parquet"))
    return pa.concat_tables(pq.read_table(f) for f in files)


def _world(seed: int = 0, **kw) -> _RecsysWorld:
    args = dict(
        seed=seed, num_tasks=2, num_users=2_000, num_items=4_000, zipf_a=1.1, latent_dim=8,
        task_divergence=0.5, positive_rates=(0.3, 0.05), num_dense=4, num_multi_hot=2, sample_space=None,
        num_categories=100, num_tags=1_000, max_history=10, max_tags=5, signal_scale=2.0,
    )  # fmt: skip
    args.update(kw)
    return _RecsysWorld(**args)


def test_rank_auc_matches_definition_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 300).astype(float)  # many ties
    labels = rng.random(300) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert _rank_auc(scores, labels) == pytest.approx(pairwise, abs=1e-12)
    assert np.isnan(_rank_auc(scores, np.zeros(300, bool)))


def test_recsys_deterministic_by_seed_and_layout_independent(tmp_path):
    a = generate_recsys(tmp_path / "a", rows=3_000, seed=7, **SMALL)
    generate_recsys(tmp_path / "b", rows=3_000, seed=7, **SMALL)
    generate_recsys(tmp_path / "c", rows=3_000, seed=8, **SMALL)
    generate_recsys(tmp_path / "d", rows=3_000, seed=7, rows_per_file=1_000, row_group_size=300, **SMALL)
    for split in ("train", "eval"):
        ta = _read(tmp_path / "a", split)
        assert ta.equals(_read(tmp_path / "b", split))
        assert ta.equals(_read(tmp_path / "d", split))  # same rows, other file layout
        assert not ta.equals(_read(tmp_path / "c", split))
    assert Schema.load(tmp_path / "a") == a
    assert Schema.load(tmp_path / "a").metadata["oracle_auc"] == a.metadata["oracle_auc"]
    # file layout knobs: 2_700 train rows -> files of 1_000, row groups of <= 300
    files = sorted((tmp_path / "d" / "train").glob("*.parquet"))
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    md = [pq.ParquetFile(f).metadata for f in files]
    assert [m.num_rows for m in md] == [1_000, 1_000, 700]
    assert [md[0].row_group(g).num_rows for g in range(md[0].num_row_groups)] == [300, 300, 300, 100]


def test_recsys_regeneration_replaces_old_parts(tmp_path):
    generate_recsys(tmp_path, rows=3_000, rows_per_file=500, **SMALL)
    assert len(list((tmp_path / "train").glob("*.parquet"))) == 6
    generate_recsys(tmp_path, rows=1_000, **SMALL)
    assert len(list((tmp_path / "train").glob("*.parquet"))) == 1
    assert _read(tmp_path, "train").num_rows == 900


@pytest.mark.parametrize("rows, eval_fraction", [(2_000, 0.1), (1_001, 0.25), (500, 0.0)])
def test_recsys_row_counts(tmp_path, rows, eval_fraction):
    generate_recsys(tmp_path, rows=rows, eval_fraction=eval_fraction, **SMALL)
    n_eval = round(rows * eval_fraction)
    assert _read(tmp_path, "train").num_rows == rows - n_eval
    if n_eval:
        assert _read(tmp_path, "eval").num_rows == n_eval
    else:
        assert not list((tmp_path / "eval").glob("*.parquet"))


def test_recsys_schema_and_columns(tmp_path):
    s = generate_recsys(tmp_path, rows=4_000, num_tasks=3, num_dense=3, max_history=6, max_tags=4, **SMALL)
    assert s.sparse_names == [
        "user_id", "user_age_bucket", "user_region", "item_id", "item_category", "item_author",
        "context_hour", "user_recent_items", "item_tags",
    ]  # fmt: skip
    assert s.dense_names == ["dense_0", "dense_1", "dense_2"]
    assert s.task_names == ["click", "like", "finish"]
    assert s.user_id_feature == "user_id"
    assert {f.name: f.side for f in s.sparse}["item_tags"] == "item"
    t = _read(tmp_path, "train")
    assert t.column_names == s.sparse_names + s.dense_names + s.task_names
    for f in s.sparse:
        col = t[f.name].combine_chunks()
        if f.multi_hot:
            assert col.type == pa.list_(pa.int64())
            lengths = np.diff(np.asarray(col.offsets))
            limit = 6 if f.name == "user_recent_items" else 4
            assert lengths.min() >= 1 and lengths.max() <= limit
            values = col.flatten().to_numpy()
        else:
            assert col.type == pa.int64()
            values = col.to_numpy()
        assert values.min() >= 0 and values.max() < f.num_embeddings, f.name
    for name in s.dense_names:
        x = t[name].to_numpy()
        assert t[name].type == pa.float32() and np.isfinite(x).all() and 0.3 < x.std() < 3.0
    for name in s.task_names:
        y = t[name].to_numpy()
        assert t[name].type == pa.float32() and set(np.unique(y)) == {0.0, 1.0}
    # attributes are functions of the id
    users = t.select(["user_id", "user_age_bucket", "user_region"]).group_by("user_id").aggregate(
        [("user_age_bucket", "count_distinct"), ("user_region", "count_distinct")]
    )
    assert users["user_age_bucket_count_distinct"].to_numpy().max() == 1
    assert users["user_region_count_distinct"].to_numpy().max() == 1
    # Zipf popularity: the most popular item is far above the mean frequency
    counts = np.bincount(t["item_id"].to_numpy())
    assert counts.max() > 20 * counts[counts > 0].mean()


def test_recsys_no_dense_no_multi_hot(tmp_path):
    s = generate_recsys(tmp_path, rows=500, num_dense=0, num_multi_hot=0, num_tasks=1, **SMALL)
    assert s.dense_names == [] and not any(f.multi_hot for f in s.sparse) and s.task_names == ["click"]


def test_label_sparsity_knob(tmp_path):
    generate_recsys(tmp_path, rows=20_000, num_tasks=4, positive_rates=(0.3, 0.05, 0.15, 0.02), **SMALL)
    t = _read(tmp_path, "train")
    rates = {n: float(np.mean(t[n].to_numpy())) for n in ("click", "like", "finish", "share")}
    assert rates["like"] < rates["click"] and rates["share"] < rates["like"]
    for name, target in zip(rates, (0.3, 0.05, 0.15, 0.02)):
        assert rates[name] == pytest.approx(target, rel=0.2), (name, rates)


def test_sample_space_cvr_after_click(tmp_path):
    s = generate_recsys(
        tmp_path, rows=20_000, num_tasks=3, sample_space="cvr_after_click", positive_rates=(0.3, 0.2, 0.1), **SMALL
    )
    t = _read(tmp_path, "train")
    click = t["click"].to_numpy()
    like = t["like"]
    defined = np.asarray(like.is_valid())
    np.testing.assert_array_equal(defined, click == 1.0)  # label defined exactly where clicked
    assert t["click"].null_count == 0 and t["finish"].null_count == 0  # other tasks untouched
    cvr = like.drop_null().to_numpy()
    assert set(np.unique(cvr)) == {0.0, 1.0}
    assert cvr.mean() == pytest.approx(0.2, abs=0.04)  # rate is conditional on click
    assert s.metadata["knobs"]["sample_space"] == "cvr_after_click"

    generate_recsys(tmp_path / "all", rows=5_000, num_tasks=3, sample_space="after_click", **SMALL)
    t = _read(tmp_path / "all", "train")
    clicked = t["click"].to_numpy() == 1.0
    for name in ("like", "finish"):
        np.testing.assert_array_equal(np.asarray(t[name].is_valid()), clicked)


def test_true_logit_carries_signal():
    world = _world()
    rows = world.sample(np.random.default_rng([0, 99]), 30_000)
    for t, name in enumerate(world.task_names):
        auc = _rank_auc(rows["logits"][:, t], rows["labels"][:, t])
        assert auc > 0.8, (name, auc)
        assert world.oracle_auc[name] == pytest.approx(auc, abs=0.02)
    assert rows["labels"][:, 0].mean() == pytest.approx(0.3, abs=0.02)


def test_task_divergence_controls_task_correlation():
    corr = []
    for delta in (0.0, 0.5, 1.0):
        rows = _world(task_divergence=delta).sample(np.random.default_rng(1), 20_000, with_labels=False)
        corr.append(np.corrcoef(rows["logits"][:, 0], rows["logits"][:, 1])[0, 1])
    assert corr[0] > 0.99  # identical logits up to the bias
    assert corr[0] > corr[1] > corr[2]
    assert abs(corr[2]) < 0.3


def test_signal_is_learnable_from_features(tmp_path):
    """A plain logistic regression on one-hot side features and dense values beats chance clearly."""
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import OneHotEncoder

    s = generate_recsys(tmp_path, rows=20_000, eval_fraction=0.3, **SMALL)
    cat_cols = ["user_age_bucket", "user_region", "item_category", "context_hour", "item_author"]

    def features(t, enc=None):
        cats = np.stack([t[c].to_numpy() for c in cat_cols], axis=1)  # N x 5
        enc = enc or OneHotEncoder(handle_unknown="ignore").fit(cats)
        dense = np.stack([t[c].to_numpy() for c in s.dense_names], axis=1)  # N x F
        return sparse.hstack([enc.transform(cats), sparse.csr_matrix(dense)]).tocsr(), enc

    train, test = _read(tmp_path, "train"), _read(tmp_path, "eval")
    x_train, enc = features(train)
    x_test, _ = features(test, enc)
    for name in s.task_names:
        model = LogisticRegression(C=0.5, max_iter=200).fit(x_train, train[name].to_numpy())
        auc = _rank_auc(model.decision_function(x_test), test[name].to_numpy())
        assert auc > 0.72, (name, auc)


def test_progress_bar_on_stderr(tmp_path, capsys):
    generate_recsys(tmp_path, rows=1_000, progress=True, **SMALL)
    assert "recsys" in capsys.readouterr().err
    generate_recsys(tmp_path, rows=1_000, **SMALL)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_tasks=9), "num_tasks"),
        (dict(num_tasks=1, sample_space="cvr_after_click"), "needs num_tasks >= 2"),
        (dict(sample_space="ctcvr"), "unknown sample_space"),
        (dict(task_divergence=1.5), "task_divergence"),
        (dict(num_multi_hot=3), "num_multi_hot"),
        (dict(positive_rates=(0.3, 1.0)), "positive rate"),
        (dict(rows=0), "rows must be positive"),
        (dict(eval_fraction=1.0), "eval_fraction"),
    ],
)
def test_recsys_invalid_knobs(tmp_path, kw, match):
    args = dict(rows=100, **SMALL)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        generate_recsys(tmp_path, **args)


# --------------------------------------------------------------------------- MMoE benchmark


def test_mmoe_schema_and_determinism(tmp_path):
    s = generate_mmoe(tmp_path / "a", rows=2_000, d=16, seed=3)
    generate_mmoe(tmp_path / "b", rows=2_000, d=16, seed=3)
    generate_mmoe(tmp_path / "c", rows=2_000, d=16, seed=4)
    assert s.sparse_names == ["bias_id"] and s.feature("bias_id").num_embeddings == 1
    assert s.dense_names == [f"x{j}" for j in range(16)]
    assert [(t.name, t.kind) for t in s.tasks] == [("y1", "regression"), ("y2", "regression")]
    assert Schema.load(tmp_path / "a") == s
    t = _read(tmp_path / "a", "train")
    assert t.num_rows == 1_800 and _read(tmp_path / "a", "eval").num_rows == 200
    assert t["bias_id"].type == pa.int64() and set(t["bias_id"].to_numpy()) == {0}
    assert all(t[f"x{j}"].type == pa.float32() for j in range(16))
    x = np.stack([t[f"x{j}"].to_numpy() for j in range(16)], axis=1)  # N x d
    assert abs(x.mean()) < 0.05 and x.std() == pytest.approx(1.0, abs=0.05)
    assert t.equals(_read(tmp_path / "b", "train"))
    assert not t.equals(_read(tmp_path / "c", "train"))


def test_mmoe_world_matches_paper():
    world = _MMoEWorld(seed=0, correlation=0.3, c=2.0, m=10, d=32)
    w1, w2 = world.w[:, 0], world.w[:, 1]
    assert np.linalg.norm(w1) == pytest.approx(2.0) and np.linalg.norm(w2) == pytest.approx(2.0)
    assert w1 @ w2 / (np.linalg.norm(w1) * np.linalg.norm(w2)) == pytest.approx(0.3)
    rng = np.random.default_rng(5)
    x, y = world.sample(rng, 1_000)
    wx = x.astype(np.float64) @ world.w  # N x 2
    clean = wx + np.sin(wx[:, :, None] * world.alpha + world.beta).sum(axis=2)
    resid = y - clean
    assert resid.std() == pytest.approx(0.1, rel=0.15)  # N(0, 0.01) noise


def test_mmoe_correlation_knob(tmp_path):
    corr = []
    for p in (0.0, 0.5, 0.9, 1.0):
        generate_mmoe(tmp_path / str(p), rows=5_000, d=32, correlation=p)
        t = _read(tmp_path / str(p), "train")
        corr.append(np.corrcoef(t["y1"].to_numpy(), t["y2"].to_numpy())[0, 1])
    assert corr == sorted(corr), corr
    assert abs(corr[0]) < 0.2 and corr[3] > 0.99
