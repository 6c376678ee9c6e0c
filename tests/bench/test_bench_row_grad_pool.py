"""``bench row-grad-pool`` at toy size: every contender runs in its own process and the result has
the keys the CLI contract names (the speed itself is measured by the benchmark, not asserted)."""

from __future__ import annotations

import json

from recsys_mtl.bench.row_grad_pool import run_row_grad_pool_bench


def test_row_grad_pool_bench_toy(tmp_path) -> None:
    out = tmp_path / "r.json"
    r = run_row_grad_pool_bench(steps=2, warmup=1, batch_size=64, users=300, items=500, output=str(out),
                                print_table=False)
    assert json.loads(out.read_text())["workload"] == "row_grad_pool"
    assert set(r["steps"]) == {"ew", "pmtrec", "reference"}
    for key in ("speedup", "step_vs_ew", "peak_rss_mb", "date", "machine"):
        assert key in r
    assert r["speedup"]["op"] > 0 and r["speedup"]["step"] > 0 and r["step_vs_ew"] > 0
    assert all(v > 0 for v in r["peak_rss_mb"].values())
