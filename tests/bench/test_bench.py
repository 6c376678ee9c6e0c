"""The benchmark compares like with like, and run_bench honours the `bench` JSON contract."""

from __future__ import annotations

import json

import pytest
import torch

from recsys_mtl.bench import run_bench
from recsys_mtl.bench.gemm import ple_dense_flops_per_sample
from recsys_mtl.bench.peers import build_plain, load_from_recsys_mtl, plain_inputs, plain_loss
from recsys_mtl.bench.workloads import get_workload, make_batches
from recsys_mtl.models import build_model


def _pair(seed: int = 0):
    w = get_workload("w1_tiny")
    torch.manual_seed(seed)
    ours = build_model(w.schema, w.model, "cpu")
    plain = load_from_recsys_mtl(build_plain(w), ours)
    return w, ours, plain


def test_plain_peer_computes_the_same_function_as_ours():
    w, ours, plain = _pair()
    batch = make_batches(w, 1, batch_size=32, seed=3)[0]
    ids, offsets = plain_inputs(batch)
    a = ours(batch.dense, batch.sparse)
    b = plain(batch.dense, ids, offsets)
    assert set(a) == set(b) == set(w.schema.task_names)
    for t in w.schema.task_names:
        assert a[t].shape == (32,)
        torch.testing.assert_close(a[t], b[t], rtol=1e-5, atol=1e-5)
    # Not trivially equal: a different seed gives different logits.
    _, ours2, _ = _pair(seed=1)
    assert not torch.allclose(ours2(batch.dense, batch.sparse)["click"], a["click"], atol=1e-4)


def test_plain_peer_gradients_match_ours():
    w, ours, plain = _pair()
    batch = make_batches(w, 1, batch_size=16, seed=4)[0]
    ids, offsets = plain_inputs(batch)
    plain_loss(ours(batch.dense, batch.sparse), batch.labels, w.schema.task_names).backward()
    plain_loss(plain(batch.dense, ids, offsets), batch.labels, w.schema.task_names).backward()
    shared = ours.levels[0].shared_experts
    g_ours = shared.weight_0.grad[shared.expert_index(0, 1)[0]]  # expert 1's D x H1 block (no padding rows)
    torch.testing.assert_close(g_ours.t(), plain.levels[0].shared_experts[1][0].weight.grad, rtol=1e-4, atol=1e-6)
    name = w.schema.sparse_names[0]
    g_plain = plain.embeddings[name].weight.grad.to_dense()
    torch.testing.assert_close(ours.input.ebc.embedding_bags[name].weight.grad, g_plain, rtol=1e-4, atol=1e-6)


def test_w1_dense_flops_match_design():
    w = get_workload("w1")
    f = ple_dense_flops_per_sample(w.model, len(w.schema.sparse), len(w.schema.dense), len(w.schema.tasks))
    assert 7.5e6 < f["fwd_bwd"] < 7.8e6  # docs/design.md §7: ~7.6 MFLOP/sample
    assert [f.num_embeddings for f in w.schema.sparse].count(1_000_000) == 4 and len(w.schema.dense) == 13


def test_unknown_workload_is_rejected():
    with pytest.raises(ValueError, match="w1, w2"):
        run_bench("w3")


def test_run_bench_tiny_follows_the_contract(tmp_path):
    out = tmp_path / "r" / "bench.json"
    r = run_bench("w1_tiny", output=str(out), steps=3, warmup=1, show_progress=False)
    assert r["workload"] == "w1_tiny" and r["batch_size"] == 64
    assert set(r["samples_per_s"]) == {"recsys_mtl", "recsys_mtl_compiled"}  # eager and --compile-head
    assert all(v > 0 for v in r["samples_per_s"].values()) and r["gemm_gflops"] > 0
    assert r["torch_threads"] == 2
    assert set(r["ratios"]) == {"recsys_mtl_compiled/recsys_mtl"}
    for name in ("recsys_mtl", "recsys_mtl_compiled"):
        assert {"data", "embedding", "dense", "optimizer"} <= set(r["ms_per_step"][name])
        # The per-group profile: GEMM time and rate, element-wise, copies, tables, optimizer.
        p = r["profile"][name]
        assert set(p["ms"]) == {"gemm", "elementwise", "copies", "compiled_kernels", "embedding", "optimizer",
                                "communication", "other"}
        assert p["ms"]["gemm"] > 0 and p["gemm_gflops"] > 0 and p["ms"]["embedding"] > 0 and p["wall_ms"] > 0
    assert r["profile"]["recsys_mtl_compiled"]["ms"]["compiled_kernels"] > 0
    assert r["profile"]["recsys_mtl"]["ms"]["compiled_kernels"] == 0
    assert json.loads(out.read_text())["profile"] == r["profile"]
    assert not torch.distributed.is_initialized()  # the one-rank group it created is gone
    with pytest.raises(ValueError, match="variants"):
        run_bench("w1_tiny", steps=1, variants=("fast",))


def test_run_bench_tiny_with_peers():
    import torch_rechub  # noqa: F401  (scripts/setup.sh installs the bench extra with the test set-up)

    # (The workload's batch size: the compiled head of the contract test above is reused, not
    # compiled again for another shape; test_bench_w2 overrides the batch size.)
    r = run_bench("w1_tiny", peers=True, steps=2, warmup=1, show_progress=False)
    assert r["batch_size"] == 64
    assert set(r["samples_per_s"]) == {"recsys_mtl", "recsys_mtl_compiled", "plain_pytorch", "torch_rechub"}
    assert all(v > 0 for v in r["samples_per_s"].values())
    assert set(r["ratios"]) == {f"{o}/{p}" for o in ("recsys_mtl", "recsys_mtl_compiled")
                                for p in ("plain_pytorch", "torch_rechub")} | {"recsys_mtl_compiled/recsys_mtl"}
    assert set(r["profile"]) == set(r["samples_per_s"])
