"""Analyses against reference computations on known inputs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from recsys_mtl.analysis import (
    SubsetSpec,
    auc,
    equal_frequency_buckets,
    expert_utilisation,
    gate_weights,
    gauc,
    mtl_gain,
    plot_expert_utilisation,
    plot_subsets,
    subset_analysis,
)


def test_auc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    s = np.round(rng.random(500), 2)  # many ties
    y = (rng.random(500) < s).astype(int)
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(auc(s, np.ones(500)))


def test_gauc_is_size_weighted_mean_of_group_aucs_skipping_one_class_groups() -> None:
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 30, 2000)
    s = rng.random(2000)
    y = (rng.random(2000) < 0.2 + 0.6 * s).astype(int)
    y[groups == 3] = 1  # an all-positive group: skipped
    num = den = 0.0
    for g in np.unique(groups):
        m = groups == g
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * roc_auc_score(y[m], s[m])
            den += m.sum()
    assert gauc(s, y, groups) == pytest.approx(num / den, abs=1e-12)


def test_mtl_gain_sign_convention() -> None:
    assert mtl_gain(0.8, 0.7) == pytest.approx(0.1)
    assert mtl_gain(0.3, 0.2, higher_is_better=False) == pytest.approx(-0.1)


def test_equal_frequency_buckets() -> None:
    b = equal_frequency_buckets(np.random.default_rng(0).random(1000), 10)
    assert np.bincount(b).tolist() == [100] * 10


def test_subset_analysis_partitions_and_scores() -> None:
    rng = np.random.default_rng(2)
    n = 5000
    pa, pb = rng.random(n), rng.random(n)
    y = (rng.random(n) < pa).astype(int)
    res = subset_analysis(pa, pb, {"good": pa, "noise": rng.random(n)}, y, SubsetSpec(comparable=2))
    assert sum(r["size"] for r in res.values()) == n
    diff = equal_frequency_buckets(pa) - equal_frequency_buckets(pb)
    m = np.abs(diff) <= 2
    assert res["comparable"]["size"] == m.sum()
    assert res["comparable"]["good"] == pytest.approx(roc_auc_score(y[m], pa[m]))
    assert res["comparable"]["good"] > res["comparable"]["noise"]


@pytest.mark.parametrize("name", ["mmoe", "ple", "stem"])
def test_expert_utilisation_from_gates(name: str, tmp_path) -> None:
    import dataclasses

    from recsys_mtl.config import ModelConfig
    from recsys_mtl.models import build_model
    from recsys_mtl.testing import tiny_batch, tiny_schema
    from recsys_mtl.train.losses import MultiTaskLoss
    from recsys_mtl.train.task import MTLTrainModule

    schema = tiny_schema()
    cfg = ModelConfig(name=name, embedding_dim=4, expert_layer_sizes=(8,), tower_layer_sizes=(4,),
                      gate_layer_sizes=(8,), num_experts=3, num_task_experts=2, num_shared_experts=1)
    model = MTLTrainModule(build_model(schema, cfg), MultiTaskLoss(schema.tasks))
    w = gate_weights(model, [tiny_batch(schema, 16, seed=i) for i in range(3)], schema.task_names)
    expected_e = {"mmoe": 3, "ple": 3, "stem": 2 * 2 + 1}[name]
    for t in schema.task_names:
        assert w[t].shape == (48, expected_e)
        assert np.allclose(w[t].sum(1), 1.0, atol=1e-5)
    util = expert_utilisation(w)
    assert len(util["click"]["mean"]) == expected_e
    png = plot_expert_utilisation(util, tmp_path / "util.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_plot_subsets_writes_png(tmp_path) -> None:
    res = {"a_overwhelming": {"size": 10, "m": 0.7}, "comparable": {"size": 5, "m": 0.6},
           "b_overwhelming": {"size": 8, "m": 0.8}}
    assert plot_subsets(res, tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
