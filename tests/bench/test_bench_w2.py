"""W2 (embedding-heavy STEM-Net): the plain peer is the same model, and run_bench honours the contract."""

from __future__ import annotations

import torch

from recsys_mtl.bench import run_bench
from recsys_mtl.bench.gemm import dense_flops_per_sample
from recsys_mtl.bench.peers import PlainSTEM, build_plain, load_from_recsys_mtl, plain_inputs, plain_loss
from recsys_mtl.bench.workloads import get_workload, make_batches
from recsys_mtl.models import build_model


def _pair(seed: int = 0):
    w = get_workload("w2_tiny")
    torch.manual_seed(seed)
    ours = build_model(w.schema, w.model, "cpu")
    plain = load_from_recsys_mtl(build_plain(w), ours)
    return w, ours, plain


def _table(ebc, feature: str) -> torch.Tensor:
    name = next(c.name for c in ebc.embedding_bag_configs() if feature in c.feature_names)
    return ebc.embedding_bags[name].weight


def _dense_grad(p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        return torch.zeros_like(p)
    return p.grad.to_dense() if p.grad.is_sparse else p.grad


def test_w2_workload_matches_design():
    w = get_workload("w2")
    s = w.schema
    assert len(s.sparse) == 26 and sum(f.multi_hot for f in s.sparse) == 8 and len(s.tasks) == 2
    assert sorted(f.num_embeddings for f in s.sparse) == [100_000] * 18 + [1_000_000] * 8
    c = w.model
    assert (c.name, c.embedding_dim, c.expert_layer_sizes, c.tower_layer_sizes) == ("stem", 32, (128,), (64,))
    assert (c.num_shared_experts, c.num_task_experts, c.stem_specific_fields) == (1, 1, "all")
    assert w.batch_size == 4096 and w.scale == 1.0
    table_bytes = 3 * sum(f.num_embeddings for f in s.sparse) * 32 * 4  # shared + 2 task sets, fp32
    assert 3.7e9 < table_bytes < 3.8e9
    assert 4.6e6 < dense_flops_per_sample(c, 26, 0, 2)["fwd_bwd"] < 4.8e6


def test_w2_batches_have_multi_hot_bags():
    w = get_workload("w2_tiny")
    b = make_batches(w, 1, batch_size=512, seed=1)[0]
    lengths = b.sparse.to_dict()
    multi = [f.name for f in w.schema.sparse if f.multi_hot]
    single = [f.name for f in w.schema.sparse if not f.multi_hot]
    for name in single:
        assert bool((lengths[name].lengths() == 1).all())
    lens = torch.cat([lengths[n].lengths() for n in multi]).float()
    assert lens.min() >= 1 and lens.max() <= 20
    assert 4.7 < lens.mean().item() < 5.3
    again = make_batches(w, 1, batch_size=512, seed=1)[0]
    assert torch.equal(again.sparse.values(), b.sparse.values())  # same batches in every process


def test_plain_stem_computes_the_same_function_as_ours():
    w, ours, plain = _pair()
    assert isinstance(plain, PlainSTEM)
    batch = make_batches(w, 1, batch_size=32, seed=3)[0]
    ids, offsets = plain_inputs(batch)
    a = ours(batch.dense, batch.sparse)
    b = plain(batch.dense, ids, offsets)
    assert set(a) == set(b) == set(w.schema.task_names)
    for t in w.schema.task_names:
        assert a[t].shape == (32,)
        torch.testing.assert_close(a[t], b[t], rtol=1e-5, atol=1e-5)
    _, ours2, _ = _pair(seed=1)  # not trivially equal
    assert not torch.allclose(ours2(batch.dense, batch.sparse)["click"], a["click"], atol=1e-4)


def test_plain_stem_gradients_match_ours():
    w, ours, plain = _pair()
    batch = make_batches(w, 1, batch_size=16, seed=4)[0]
    ids, offsets = plain_inputs(batch)
    plain_loss(ours(batch.dense, batch.sparse), batch.labels, w.schema.task_names).backward()
    plain_loss(plain(batch.dense, ids, offsets), batch.labels, w.schema.task_names).backward()
    close = dict(rtol=1e-4, atol=1e-6)
    for f in (w.schema.sparse_names[0], w.schema.sparse_names[-1]):  # a multi-hot and a single-valued feature
        torch.testing.assert_close(_dense_grad(_table(ours.shared_ebc, f)), _dense_grad(plain.shared_tables[f].weight), **close)
        for t in w.schema.task_names:
            torch.testing.assert_close(_dense_grad(_table(ours.task_ebcs[t], f)),
                                       _dense_grad(plain.task_tables[t][f].weight), **close)
    wi, _ = ours.task_experts.expert_index(0, 1)  # task "like"'s expert, first layer
    torch.testing.assert_close(ours.task_experts.weight_0.grad[wi].t(), plain.task_experts[1][0][0].weight.grad, **close)
    torch.testing.assert_close(ours.gates["click"][0][0].weight.grad, plain.gates["click"][0][0].weight.grad, **close)


def test_stop_gradient_one_task_loss_leaves_other_task_tables_untouched():
    w, ours, plain = _pair()
    batch = make_batches(w, 1, batch_size=16, seed=5)[0]
    ids, offsets = plain_inputs(batch)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    bce(ours(batch.dense, batch.sparse)["click"], batch.labels[:, 0]).backward()
    bce(plain(batch.dense, ids, offsets)["click"], batch.labels[:, 0]).backward()
    for f in w.schema.sparse_names[:2]:
        # click's loss trains click's and the shared tables...
        assert _dense_grad(_table(ours.task_ebcs["click"], f)).abs().sum() > 0
        assert _dense_grad(plain.task_tables["click"][f].weight).abs().sum() > 0
        assert _dense_grad(plain.shared_tables[f].weight).abs().sum() > 0
        # ...but never like's: like's experts enter click's mixture detached.
        assert _dense_grad(_table(ours.task_ebcs["like"], f)).abs().sum() == 0
        assert _dense_grad(plain.task_tables["like"][f].weight).abs().sum() == 0
        torch.testing.assert_close(_dense_grad(_table(ours.task_ebcs["click"], f)),
                                   _dense_grad(plain.task_tables["click"][f].weight), rtol=1e-4, atol=1e-6)


def test_run_bench_w2_tiny_with_peers_follows_the_contract():
    # (eager only here: the compiled STEM-Net head is checked in tests/train/test_compiled_head*.py)
    r = run_bench("w2_tiny", peers=True, steps=2, warmup=1, batch_size=32, show_progress=False, print_table=False,
                  variants=("eager",))
    assert r["workload"] == "w2_tiny" and r["batch_size"] == 32 and r["gemm_gflops"] > 0
    assert set(r["samples_per_s"]) == {"recsys_mtl", "plain_pytorch"}  # torch-rechub has no STEM-Net
    assert all(v > 0 for v in r["samples_per_s"].values())
    assert set(r["ratios"]) == {"recsys_mtl/plain_pytorch"}
    assert "torch_rechub" in r["absent"] and r["sequential"] is True and r["scale"] == 1e-3
    assert {"data", "embedding", "dense", "optimizer"} <= set(r["ms_per_step"]["plain_pytorch"])
    assert not torch.distributed.is_initialized()
