"""`recsys-mtl bench plans`: Census-Income's table shapes, and one short run on 2 gloo ranks."""

from __future__ import annotations

import json

import pytest


def test_workload_has_the_census_converters_tables():
    from recsys_mtl.bench.plans import census_schema
    from recsys_mtl.data.convert.census import CATEGORICAL, DENSE, TASK_SOURCE_COLUMN

    s = census_schema()
    assert s.sparse_names == [c for c in CATEGORICAL if c != TASK_SOURCE_COLUMN["marital"]]
    assert s.dense_names == list(DENSE) and s.task_names == ["income", "marital"]
    assert len(s.sparse) == 32 and max(f.num_embeddings for f in s.sparse) <= 54  # many small tables


@pytest.mark.multirank
def test_plans_bench_runs_the_contenders_in_one_launch(tmp_path):
    from recsys_mtl.bench.plans import run_plans_bench

    out = tmp_path / "plans.json"
    r = run_plans_bench(steps=2, warmup=1, batch_size=32, contenders=("default", "row_wise"), output=str(out),
                        print_table=False)
    assert json.loads(out.read_text()) == r
    assert set(r["samples_per_s"]) == {"default", "row_wise"} and min(r["samples_per_s"].values()) > 0
    assert r["ratios"]["default/row_wise"] == pytest.approx(r["samples_per_s"]["default"] / r["samples_per_s"]["row_wise"])
    assert r["plans"] == {"default": {"data_parallel": 32}, "row_wise": {"row_wise": 32}}
    assert r["world_size"] == 2 and r["threads_per_rank"] >= 1
