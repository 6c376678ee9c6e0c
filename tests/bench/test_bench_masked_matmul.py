"""`recsys-mtl bench masked-matmul` at toy size: the JSON fields, like-for-like outputs, the byte model."""

from __future__ import annotations

import json

import pytest

import recsys_mtl.bench.masked_matmul as bench_mm
from recsys_mtl.bench.masked_matmul import bench_layer, bytes_per_step, gpu_model, run_masked_matmul_bench


@pytest.fixture
def quick_gemm(monkeypatch):
    """Skip the 2048^3 GEMM-rate probe (seconds on 2 cores); it is context in the JSON, not a result."""
    monkeypatch.setattr(bench_mm, "measure_gemm_gflops", lambda threads: 100.0)


def test_bench_writes_the_json_and_the_contenders_agree(tmp_path, capsys, quick_gemm):
    out = tmp_path / "mm.json"
    r = run_masked_matmul_bench(batch_sizes=(8,), subnets=(2, 3), layers=((13, 8, True), (8, 4, False)),
                                steps=2, warmup=1, output=str(out), step_batch_sizes=(16,))
    assert json.loads(out.read_text()) == r
    assert "naive/fused" in capsys.readouterr().out
    assert len(r["layers"]) == 4 and r["ratio_min"] > 0 and r["ratio_geomean"] > 0 and r["target_ratio"] == 1.3
    assert r["torch_threads"] == 2 and r["gemm_gflops"] > 0 and "not measured" in r["layers"][0]["gpu_model"]["note"]
    for row in r["layers"]:
        assert set(row["ms_per_call"]) == {"naive", "fused"} and min(row["ms_per_call"].values()) > 0
        assert row["ratio"] == pytest.approx(row["ms_per_call"]["naive"] / row["ms_per_call"]["fused"])
        assert row["ratio"] > 0 and row["ratio_best"] > 0
        assert set(row["max_abs_diff"]) == {"y", "dx", "dw", "db"} and max(row["max_abs_diff"].values()) < 1e-4
        assert set(row["bytes_per_step"]) == {"naive", "fused_cpu", "fused_kernel"}
        assert row["saved_for_backward_bytes"]["fused"] < row["saved_for_backward_bytes"]["naive"]
        assert row["mask_storage_bytes"]["bit_packed"] * 8 < row["mask_storage_bytes"]["dense_fp32"]


def test_training_step_contenders_take_the_same_step():
    from recsys_mtl.bench.csrec_step import bench_csrec_step

    r = bench_csrec_step(32, steps=1, warmup=0, optimizer="sgd")
    assert set(r["ms_per_step"]) == {"naive", "ours", "ours_fused"} and min(r["ms_per_step"].values()) > 0
    assert r["ratio"] == pytest.approx(r["ms_per_step"]["naive"] / r["ms_per_step"]["ours"])
    assert r["max_param_diff"] < 1e-6  # after one SGD step (lr 0.1): the same step


def test_bench_layer_is_a_reusable_hook():
    row = bench_layer(4, 9, 5, 2, shared_input=False, steps=1, warmup=0)
    assert (row["B"], row["K"], row["N"], row["S"], row["shared_input"]) == (4, 9, 5, 2, False)
    assert row["flops_per_step"] == 3 * 2 * 2 * 4 * 5 * 9


def test_byte_model():
    b, n, k, s = 2048, 256, 429, 4
    m = bytes_per_step(b, n, k, s, shared_input=True)
    for v in m.values():
        assert v["total"] == v["masks"] + v["weights"] + v["activations"] > 0
    # The kernel reads 1 bit per weight and subnet, three times; the naive layer a dense fp32 mask, twice.
    assert m["fused_kernel"]["masks"] == 3 * s * n * ((k + 7) // 8)
    assert m["naive"]["masks"] == 2 * s * n * k * 4
    assert m["fused_kernel"]["total"] < m["fused_cpu"]["total"] < m["naive"]["total"]
    g = gpu_model(b, n, k, s, shared_input=True)
    assert g["flops"] == 3 * 2 * s * b * n * k and g["ratio_naive_over_fused"] > 1


def test_cli_runs_it(tmp_path, quick_gemm):
    from recsys_mtl.cli import main

    out = tmp_path / "cli.json"
    assert main(["bench", "masked-matmul", "--steps", "1", "--warmup", "0", "--batch-size", "4",
                 "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert {row["B"] for row in r["layers"]} == {4} and {row["S"] for row in r["layers"]} == {2, 4}
    assert main(["bench", "masked-matmul", "--steps", "0", "--output", str(out)]) == 2
