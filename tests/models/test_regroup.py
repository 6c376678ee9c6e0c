"""Model inputs assembled with ``KTRegroupAsDict`` equal the by-name ``to_dict()`` + ``cat`` assembly, bit for bit.

The references below are the feature assembly the models used before the regroup path: look
every feature up by name in ``ebc(kjt).to_dict()`` and concatenate in the module's feature
order. They run on the same EBC outputs, including ``KeyedTensor``s whose keys come in
another order than the table configs (as a sharded EBC returns them). Both assemblies of
``FeatureRegroup`` are checked: TorchRec's fused ``KTRegroupAsDict`` (forced on here; by default it
runs off CPU) and the by-name path it uses on CPU.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from multirank import run_ranks
from recsys_mtl.data.schema import DenseFeature, Schema, SparseFeature, TaskSpec
from recsys_mtl.models.stem import STEMNet
from recsys_mtl.modules.embeddings import FeatureRegroup, SparseDenseInput, build_ebc, padded_width
from recsys_mtl.modules.multi_embedding import TableSetInputs

DIM = 3


def _schema(num_dense: int = 2) -> Schema:
    return Schema(
        sparse=(
            SparseFeature("user", 30, side="user"),
            SparseFeature("item", 40, side="item"),
            SparseFeature("tags", 15, multi_hot=True, pooling="mean", side="item"),
            SparseFeature("clicks", 25, multi_hot=True, side="user"),  # sum-pooled multi-hot
            SparseFeature("hour", 24, side="context"),
        ),
        dense=tuple(DenseFeature(f"d{i}") for i in range(num_dense)),
        tasks=(TaskSpec("click"), TaskSpec("like"), TaskSpec("share")),
    )


def _kjt(schema: Schema, batch: int, seed: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for f in schema.sparse:
        ln = torch.randint(0, 5, (batch,), generator=g) if f.multi_hot else torch.ones(batch, dtype=torch.long)
        lengths.append(ln)
        values.append(torch.randint(0, f.num_embeddings, (int(ln.sum()),), generator=g))
    return KeyedJaggedTensor.from_lengths_sync(schema.sparse_names, torch.cat(values), torch.cat(lengths))


class PermutedKeys(nn.Module):
    """An EBC whose ``KeyedTensor`` lists its keys in ``order`` instead of table-config order."""

    def __init__(self, ebc: nn.Module, order: list[str] | None) -> None:
        super().__init__()
        self.ebc = ebc
        self.order = order

    def embedding_bag_configs(self):
        return self.ebc.embedding_bag_configs()

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        kt = self.ebc(kjt)
        if self.order is None:
            return kt
        d = kt.to_dict()
        assert sorted(self.order) == sorted(d)
        return KeyedTensor.from_tensor_list(self.order, [d[k] for k in self.order])


def _order(ebc: nn.Module, how: str) -> list[str] | None:
    names = [f for c in ebc.embedding_bag_configs() for f in c.feature_names]
    if how == "config":
        return None
    if how == "reversed":
        return names[::-1]
    return names[1::2] + names[0::2]  # interleaved


ORDERS = ["config", "reversed", "interleaved"]


# --- the reference assembly: to_dict() by name, then cat -------------------------------------------------


def _ref_sparse_dense(m: SparseDenseInput, dense, sparse):
    emb = m.ebc(sparse).to_dict()
    parts = [emb[f] for f in m.features] + ([dense] if m.dense_in_features > 0 else [])
    padding = [torch.zeros(dense.shape[0], m.padding)] if m.padding else []  # zero columns up to the width multiple
    return torch.cat(parts + padding, dim=1)


def _ref_table_sets(m: TableSetInputs, dense, sparse):
    dense_part = [dense] if m.dense_in_features > 0 else []
    shared, x_s = {}, None
    if m.shared_ebc is not None:
        shared = m.shared_ebc(sparse).to_dict()
        x_s = torch.cat([shared[f] for f in m.features] + dense_part, dim=1)
    groups = []
    for name in m.names:
        own = m.ebcs[name](sparse).to_dict()
        parts = [own[f] if f in m.group_features[name] else shared[f] for f in m.features]
        groups.append(torch.cat(parts + dense_part, dim=1))
    return torch.stack(groups), x_s


def _ref_stem_embed(m: STEMNet, dense, sparse):
    shared = m.shared_ebc(sparse).to_dict()
    dense_part = [dense] if m.dense_in_features > 0 else []
    x_s = torch.cat([shared[f] for f in m.features] + dense_part, dim=1)
    if not m.specific_features:
        return x_s, torch.stack([x_s] * len(m.tasks))
    x_t = []
    for t in m.tasks:
        own = m.task_ebcs[t](sparse).to_dict()
        parts = [own[f] if f in m.specific_features else shared[f] for f in m.features]
        x_t.append(torch.cat(parts + dense_part, dim=1))
    return x_s, torch.stack(x_t)


FUSED = [pytest.param(True, id="fused"), pytest.param(None, id="auto")]


def _set_fused(m: nn.Module, fused: bool | None) -> nn.Module:
    regroups = [r for r in m.modules() if isinstance(r, FeatureRegroup)]
    assert regroups
    for r in regroups:
        r.fused = fused
    return m


def _assert_same(a, b) -> None:
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a, b)


def _assert_same_grads(new: nn.Module, ref: nn.Module, exact: bool) -> None:
    ref_params = dict(ref.named_parameters())
    for name, p in new.named_parameters():
        q = ref_params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is None:
            continue
        if exact:
            assert torch.equal(p.grad, q.grad), (name, float((p.grad - q.grad).abs().max()))
        else:
            # The fused permute sums the gradient of a feature read by several groups (a shared
            # table in x_s and in other sets' inputs) in another order than autograd does: equal
            # to rounding. Features read once get bit-identical gradients (SparseDenseInput test).
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


# --- SparseDenseInput ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("num_dense", [0, 2])
def test_sparse_dense_input(order: str, num_dense: int, fused: bool | None) -> None:
    torch.manual_seed(0)
    s = _schema(num_dense)
    ebc = build_ebc(s, DIM)
    m = _set_fused(SparseDenseInput(PermutedKeys(ebc, _order(ebc, order)), num_dense), fused)
    assert m.features == s.sparse_names
    assert m.unpadded_features == DIM * len(s.sparse) + num_dense
    assert m.out_features == padded_width(m.unpadded_features) and m.out_features % 16 == 0
    for seed in range(3):  # the cached permutation is reused after the first call
        dense, kjt = torch.randn(6, num_dense), _kjt(s, 6, seed)
        out = m(dense, kjt)
        assert out.shape == (6, m.out_features)
        _assert_same(out, _ref_sparse_dense(m, dense, kjt))


@pytest.mark.parametrize("fused", FUSED)
def test_sparse_dense_input_gradients(fused: bool | None) -> None:
    torch.manual_seed(0)
    s = _schema()
    ebc = build_ebc(s, DIM)
    m = _set_fused(SparseDenseInput(PermutedKeys(ebc, _order(ebc, "interleaved")), 2), fused)
    dense, kjt = torch.randn(5, 2, requires_grad=True), _kjt(s, 5, 1)
    w = torch.randn(5, m.out_features)
    (m(dense, kjt) * w).sum().backward()
    new_grads = [p.grad.clone() for p in m.parameters()] + [dense.grad.clone()]
    m.zero_grad()
    dense.grad = None
    (_ref_sparse_dense(m, dense, kjt) * w).sum().backward()
    ref_grads = [p.grad for p in m.parameters()] + [dense.grad]
    for a, b in zip(new_grads, ref_grads):
        assert torch.equal(a, b)


def test_layout_change_rebuilds_the_cached_permutation() -> None:
    """A module first run on one key order (say unsharded) stays right on another (sharded)."""
    torch.manual_seed(0)
    s = _schema()
    ebc = build_ebc(s, DIM)
    wrapped = PermutedKeys(ebc, None)
    m = _set_fused(SparseDenseInput(wrapped, 2), True)
    for order in ["config", "reversed", "interleaved", "config"]:
        wrapped.order = _order(ebc, order)
        dense, kjt = torch.randn(4, 2), _kjt(s, 4, 7)
        _assert_same(m(dense, kjt), _ref_sparse_dense(m, dense, kjt))
    assert m.regroup.regroup._is_inited  # the fused TorchRec path ran


# --- TableSetInputs (ME-MMoE / ME-PLE) ------------------------------------------------------------------


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("num_dense", [0, 2])
@pytest.mark.parametrize("with_shared", [False, True])
def test_table_set_inputs(order: str, num_dense: int, with_shared: bool, fused: bool | None) -> None:
    torch.manual_seed(0)
    s = _schema(num_dense)
    if with_shared:  # the sets cover some features; the rest come from the shared set
        feats = {"a": ["tags", "user"], "b": ["hour", "clicks", "item"], "c": ["tags"]}
        shared = build_ebc(s, DIM, prefix="shared")
        shared = PermutedKeys(shared, _order(shared, order))
    else:
        feats = {"a": None, "b": None}
        shared = None
    sets = {}
    for name, f in feats.items():
        ebc = build_ebc(s, DIM, prefix=name, features=f)
        sets[name] = PermutedKeys(ebc, _order(ebc, "reversed" if order == "interleaved" else order))
    m = _set_fused(TableSetInputs(sets, num_dense, shared), fused)
    for seed in range(3):
        dense, kjt = torch.randn(5, num_dense), _kjt(s, 5, seed)
        groups, x_s = m(dense, kjt)
        assert groups.shape == (len(feats), 5, m.out_features)
        ref_groups, ref_x_s = _ref_table_sets(m, dense, kjt)
        _assert_same(groups, ref_groups)
        _assert_same(x_s, ref_x_s)


@pytest.mark.parametrize("fused", FUSED)
def test_table_set_inputs_gradients(fused: bool | None) -> None:
    torch.manual_seed(0)
    s = _schema()
    shared = build_ebc(s, DIM, prefix="shared")
    sets = {n: build_ebc(s, DIM, prefix=n, features=f) for n, f in {"a": ["user"], "b": ["tags", "item"]}.items()}
    m = TableSetInputs({n: PermutedKeys(e, _order(e, "reversed")) for n, e in sets.items()}, 2,
                       PermutedKeys(shared, _order(shared, "interleaved")))
    _set_fused(m, fused)
    ref = copy.deepcopy(m)
    ref.forward = types.MethodType(_ref_table_sets, ref)
    dense, kjt = torch.randn(6, 2), _kjt(s, 6, 3)
    wg, ws = torch.randn(2, 6, m.out_features), torch.randn(6, m.out_features)
    for mod in (m, ref):
        groups, x_s = mod(dense, kjt)
        ((groups * wg).sum() + (x_s * ws).sum()).backward()
    _assert_same_grads(m, ref, exact=not fused)


# --- STEM-Net -------------------------------------------------------------------------------------------


def _stem(s: Schema, specific: list[str], order: str, num_dense: int) -> STEMNet:
    shared = build_ebc(s, DIM, prefix="shared")
    tasks = {}
    for t in s.task_names if specific else []:
        ebc = build_ebc(s, DIM, prefix=f"task_{t}", features=specific)
        tasks[t] = PermutedKeys(ebc, _order(ebc, "reversed" if order != "config" else "config"))
    return STEMNet(PermutedKeys(shared, _order(shared, order)), tasks, num_dense, num_shared_experts=2,
                   num_task_experts=1, expert_layer_sizes=[8], gate_layer_sizes=[8], tower_layer_sizes=[4],
                   tasks=None if specific else s.task_names)


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("num_dense", [0, 2])
@pytest.mark.parametrize("specific", [["user", "tags"], ["hour", "clicks", "item", "tags", "user"], []])
def test_stem_embed_and_outputs(order: str, num_dense: int, specific: list[str], fused: bool | None) -> None:
    torch.manual_seed(0)
    s = _schema(num_dense)
    m = _set_fused(_stem(s, specific, order, num_dense), fused)
    ref = copy.deepcopy(m)
    ref.embed = types.MethodType(_ref_stem_embed, ref)  # the whole model on the reference assembly
    for seed in range(2):
        dense, kjt = torch.randn(7, num_dense), _kjt(s, 7, seed)
        x_s, x_t = m.embed(dense, kjt)
        ref_x_s, ref_x_t = _ref_stem_embed(m, dense, kjt)
        _assert_same(x_s, ref_x_s)
        _assert_same(x_t, ref_x_t)
        out, ref_out = m(dense, kjt), ref(dense, kjt)
        assert list(out) == list(ref_out) == s.task_names
        for t in s.task_names:
            _assert_same(out[t], ref_out[t])
    m.zero_grad()
    ref.zero_grad()
    sum(v.sum() for v in out.values()).backward()
    sum(v.sum() for v in ref_out.values()).backward()
    _assert_same_grads(m, ref, exact=not fused)


def test_state_dict_keys_unchanged() -> None:
    """The regroup modules hold no persistent state: checkpoints keep their keys."""
    s = _schema()
    m = _stem(s, ["user"], "config", 2)
    assert not [k for k in m.state_dict() if "regroup" in k]
    inp = SparseDenseInput(build_ebc(s, DIM), 2)
    assert sorted(inp.state_dict()) == sorted(f"ebc.{k}" for k in inp.ebc.state_dict())


# --- FeatureRegroup itself -------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_feature_regroup_mixes_sources_with_the_same_keys(fused: bool) -> None:
    a = KeyedTensor.from_tensor_list(["x", "y"], [torch.full((2, 1), 1.0), torch.full((2, 2), 2.0)])
    b = KeyedTensor.from_tensor_list(["y", "x"], [torch.full((2, 2), 3.0), torch.full((2, 1), 4.0)])
    r = FeatureRegroup([[(0, "x"), (1, "y")], [(1, "x"), (0, "y"), (0, "x")]], fused=fused)
    g0, g1 = r([a, b])
    assert g0.tolist() == [[1.0, 3.0, 3.0]] * 2
    assert g1.tolist() == [[4.0, 2.0, 2.0, 1.0]] * 2


def test_feature_regroup_picks_the_assembly_by_device() -> None:
    kt = KeyedTensor.from_tensor_list(["x"], [torch.zeros(2, 1)])
    assert not FeatureRegroup([[(0, "x")]])._use_fused([kt])  # CPU: by name
    assert FeatureRegroup([[(0, "x")]], fused=True)._use_fused([kt])
    meta = KeyedTensor.from_tensor_list(["x"], [torch.zeros(2, 1, device="meta")])
    assert FeatureRegroup([[(0, "x")]])._use_fused([meta])  # any accelerator: fused


def test_feature_regroup_traces_by_name() -> None:
    """Plain ``torch.fx`` tracing (not the train pipeline's, which keeps it opaque) gives a graph
    that needs no cached permutation."""
    s = _schema()
    m = _set_fused(SparseDenseInput(build_ebc(s, DIM), 2), True)
    gm = torch.fx.symbolic_trace(m.regroup)
    kt = m.ebc(_kjt(s, 4, 0))
    emb = kt.to_dict()
    _assert_same(gm([kt])[0], torch.cat([emb[f] for f in m.features], dim=1))
    assert not m.regroup.regroup._is_inited


def test_feature_regroup_errors() -> None:
    kt = KeyedTensor.from_tensor_list(["x"], [torch.zeros(2, 1)])
    with pytest.raises(ValueError, match="not among"):
        FeatureRegroup([[(0, "z")]], fused=True)([kt])
    with pytest.raises(ValueError, match="expects 2"):
        FeatureRegroup([[(0, "x"), (1, "x")]], fused=True)([kt])
    with pytest.raises(ValueError, match="clashing"):
        FeatureRegroup([[(0, "x"), (1, "x")]], fused=True)(
            [KeyedTensor.from_tensor_list(["#1/x"], [torch.zeros(2, 1)]), kt]
        )
    with pytest.raises(KeyError):
        FeatureRegroup([[(0, "z")]], fused=False)([kt])
    with pytest.raises(ValueError, match="empty"):
        FeatureRegroup([[]])


# --- a real sharded EBC (1 gloo rank) under TorchRec's train pipeline ------------------------------------


def _wait(x):
    return x.wait() if hasattr(x, "wait") else x


def _sharded_worker() -> dict:
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.distributed.types import ShardedModule

    from recsys_mtl.config import ModelConfig, OptimConfig, ShardingConfig
    from recsys_mtl.distributed.env import init_distributed
    from recsys_mtl.distributed.optim import make_optimizer
    from recsys_mtl.distributed.sharding import shard_model
    from recsys_mtl.distributed.state import load_full_state_dict
    from recsys_mtl.models import build_model
    from recsys_mtl.testing import tiny_batch, tiny_schema
    from recsys_mtl.train.losses import MultiTaskLoss
    from recsys_mtl.train.task import MTLTrainModule

    env = init_distributed()
    schema = tiny_schema()
    lr = 0.1
    optim = OptimConfig(sparse_optimizer="sgd", sparse_lr=lr, dense_optimizer="sgd", dense_lr=lr)
    out = {}
    for name in ["stem", "me_ple", "me_mmoe", "mmoe"]:
        cfg = ModelConfig(name=name, embedding_dim=4, expert_layer_sizes=(8,), tower_layer_sizes=(4,),
                          gate_layer_sizes=(4,), num_experts=2, num_task_experts=1, num_shared_experts=1,
                          num_levels=1, stem_specific_fields="user_id,item_tags")
        torch.manual_seed(0)
        ref = MTLTrainModule(build_model(schema, cfg, "cpu"), MultiTaskLoss(schema.tasks))
        model = MTLTrainModule(build_model(schema, cfg, "meta"), MultiTaskLoss(schema.tasks))
        dmp, _ = shard_model(model, ShardingConfig(sharding_type="table_wise"), optim, device=env.device,
                             world_size=1, local_world_size=1, batch_size=8)
        load_full_state_dict(dmp, ref.state_dict())
        inner = next(m for m in dmp.modules() if type(m) is type(ref.model))
        ref_modules = dict(ref.named_modules())
        sharded = {n: m for n, m in dmp.named_modules() if isinstance(m, ShardedModule)}
        keys, config_keys = [], []
        for n, m in sharded.items():
            keys.append(_wait(m(tiny_batch(schema, 8).sparse)).keys())
            twin = ref_modules[n[n.index("model.") :]]  # the same EBC, unsharded
            config_keys.append([f for c in twin.embedding_bag_configs() for f in c.feature_names])

        # The assembly on real sharded outputs equals the by-name reference, on both paths.
        b = tiny_batch(schema, 8, seed=5)
        same = {}
        for fused in (False, True):
            _set_fused(inner, fused)
            with torch.no_grad():
                if isinstance(inner, STEMNet):
                    got, want = inner.embed(b.dense, b.sparse), _ref_stem_embed(inner, b.dense, b.sparse)
                else:
                    mod = next(m for m in inner.modules() if isinstance(m, (TableSetInputs, SparseDenseInput)))
                    ref_fn = _ref_table_sets if isinstance(mod, TableSetInputs) else _ref_sparse_dense
                    got, want = mod(b.dense, b.sparse), ref_fn(mod, b.dense, b.sparse)
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            same[fused] = all((g is None and w is None) or torch.equal(g, w) for g, w in zip(got, want))

        # Train through TorchRec's pipeline on the fused path; the unsharded twin steps alongside.
        _set_fused(inner, True)
        pipeline = TrainPipelineSparseDist(dmp, make_optimizer(dmp, optim), env.device)
        batches = [tiny_batch(schema, 8, seed=10 + i) for i in range(3)]
        it = iter(batches)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=lr)
        losses, ref_losses = [], []
        for batch in batches:
            losses.append(float(pipeline.progress(it)[0]))
            ref_opt.zero_grad()
            loss = ref(batch)[0]
            loss.backward()
            ref_opt.step()
            ref_losses.append(float(loss))
        out[name] = {
            "keys_differ": any(k != c for k, c in zip(keys, config_keys)),
            "same": same,
            "num_sharded": len(sharded),
            "num_pipelined": len(pipeline._pipelined_modules),
            "fused_ran": all(r.regroup._is_inited for r in inner.modules() if isinstance(r, FeatureRegroup)),
            "losses": losses,
            "ref_losses": ref_losses,
        }
    return out


@pytest.mark.multirank
def test_sharded_ebc_outputs_and_pipeline() -> None:
    (result,) = run_ranks(_sharded_worker, 1)
    for name, r in result.items():
        assert r["keys_differ"], (name, "the sharded KeyedTensor should reorder keys for this test to bite")
        assert r["same"] == {False: True, True: True}, (name, r)
        assert r["num_pipelined"] == r["num_sharded"] > 0, (name, r)  # every EBC lookup is pipelined
        assert r["fused_ran"], name
        assert r["losses"] == pytest.approx(r["ref_losses"], abs=1e-5), (name, r)
        assert abs(r["ref_losses"][0] - r["ref_losses"][-1]) > 1e-4, (name, r)  # training moved
