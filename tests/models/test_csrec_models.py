"""Masked sharing: MaskedMLP and the Sparse Sharing / CSRec / ML-CSRec models.

Subnetwork outputs are checked against plain dense MLPs with weights ``W ⊙ M_s`` in float64, the
``pairs`` mode against the subnetworks, and the parameter / buffer life cycle (meta build,
TorchRec's materialisation, state dict, DCP) against all-one masks.
"""

from __future__ import annotations

import dataclasses
import math
import doctest
import types

import pytest
import torch
import torch.nn.functional as F

import recsys_mtl.models.csrec
import recsys_mtl.models.sparse_sharing
import recsys_mtl.modules.masked_mlp
from recsys_mtl.config import ModelConfig
from recsys_mtl.models import MODELS, CSRec, MLCSRec, SparseSharing, build_model
from recsys_mtl.modules.embeddings import build_ebc
from recsys_mtl.modules.masked_mlp import MaskedMLP, pair_key
from recsys_mtl.ops.masked_matmul import pack_masks
from recsys_mtl.testing import tiny_batch, tiny_schema

NAMES = ["sparse_sharing", "csrec", "ml_csrec"]
CFG = ModelConfig(embedding_dim=4, bottom_layer_sizes=(16, 8), tower_layer_sizes=(8,), num_levels=2)


def _build(name: str, num_tasks: int = 2, device: str = "cpu", **kw):
    torch.manual_seed(0)
    schema = tiny_schema(num_tasks=num_tasks)
    return schema, build_model(schema, dataclasses.replace(CFG, name=name, **kw), device)


def _randomise_masks(model, seed: int = 1, keep: float = 0.6) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer_block in model.masked_layers():
        for i in range(layer_block.num_layers):
            s, n, k = layer_block.get_masks(i).shape
            layer_block.set_masks(i, torch.rand(s, n, k, generator=g) < keep)


def _dense_mlp(x: torch.Tensor, block: MaskedMLP, subnet: int) -> torch.Tensor:
    """Reference: subnet ``subnet`` of ``block`` as a plain MLP with weights ``W ⊙ M``."""
    h = x
    for i in range(block.num_layers):
        w = block.weights()[i] * block.get_masks(i)[subnet].to(block.weights()[i].dtype)  # N x K
        h = torch.relu(F.linear(h, w, block.biases()[i]))
    return h


def _reference_bottom(model, x: torch.Tensor, subnet: int) -> torch.Tensor:
    """Reference bottom output of one subnet (``B x H``), per model definition."""
    if isinstance(model, MLCSRec):
        h, shared = _dense_mlp(x, model.levels[0], subnet), x
        for level in range(1, model.num_levels):
            shared = model.shared[level - 1](shared)
            h = _dense_mlp(torch.cat([h, shared], dim=1), model.levels[level], subnet)
        return h
    return _dense_mlp(x, model.bottom, subnet)


# ---- MaskedMLP -----------------------------------------------------------------------------------

def test_doctests_of_the_masked_modules() -> None:
    for module in (recsys_mtl.modules.masked_mlp, recsys_mtl.models.sparse_sharing, recsys_mtl.models.csrec):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_masked_mlp_init_matches_nn_linear_and_masks_are_all_ones() -> None:
    torch.manual_seed(3)
    m = MaskedMLP(11, [7, 5], num_subnets=3)
    torch.manual_seed(3)
    ref = [torch.nn.Linear(11, 7), torch.nn.Linear(7, 5)]
    for i, lin in enumerate(ref):
        assert torch.equal(m.weights()[i], lin.weight) and torch.equal(m.biases()[i], lin.bias)
        assert m.packed_masks(i).dtype == torch.uint8 and m.packed_masks(i).shape == (3, lin.out_features,
                                                                                     -(-lin.in_features // 8))
        assert torch.equal(m.packed_masks(i), pack_masks(torch.ones(3, lin.out_features, lin.in_features, dtype=torch.bool)))
        assert bool(m.get_masks(i).all())


@pytest.mark.parametrize("shared_input", [True, False])
def test_masked_mlp_subnets_equal_dense_mlps_with_masked_weights(shared_input: bool) -> None:
    torch.manual_seed(0)
    m = MaskedMLP(13, [9, 6, 4], num_subnets=4).double()
    g = torch.Generator().manual_seed(0)
    for i in range(m.num_layers):
        m.set_masks(i, torch.rand(m.get_masks(i).shape, generator=g) < 0.5)
    subnets = [3, 1, 2]
    x = torch.randn(5, 13, dtype=torch.float64) if shared_input else torch.randn(3, 5, 13, dtype=torch.float64)
    out = m(x, subnets)
    assert out.shape == (3, 5, 4) and out.dtype == torch.float64
    for j, s in enumerate(subnets):
        ref = _dense_mlp(x if shared_input else x[j], m, s)
        assert (out[j] - ref).abs().max() < 1e-10
    if shared_input:
        assert torch.equal(m(x), torch.stack([m(x, [s])[0] for s in range(4)]))  # default: all, in order
        assert (m(x, [1, 2]) - out[[1, 2]]).abs().max() < 1e-12  # contiguous run (a view of the buffer)


def test_set_masks_is_in_place_and_round_trips() -> None:
    m = MaskedMLP(10, [6], num_subnets=3)
    ptr = m.packed_masks(0).data_ptr()
    masks = torch.rand(3, 6, 10) < 0.5
    m.set_masks(0, masks)
    assert torch.equal(m.get_masks(0), masks)
    part = torch.rand(2, 6, 10) < 0.5
    m.set_masks(0, part, subnets=[2, 0])
    assert torch.equal(m.get_masks(0)[2], part[0]) and torch.equal(m.get_masks(0)[0], part[1])
    assert torch.equal(m.get_masks(0)[1], masks[1])
    assert m.packed_masks(0).data_ptr() == ptr
    with pytest.raises(ValueError, match="3 x 6 x 10"):
        m.set_masks(0, torch.ones(3, 6, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="distinct"):
        m.set_masks(0, part, subnets=[1, 1])
    with pytest.raises(ValueError, match="subnets"):
        m(torch.randn(2, 10), [3])


def test_masked_weights_get_no_gradient() -> None:
    torch.manual_seed(0)
    m = MaskedMLP(8, [6, 4], num_subnets=3)
    for i in range(2):
        m.set_masks(i, torch.rand(m.get_masks(i).shape) < 0.5)
    m(torch.randn(7, 8), [0, 2]).sum().backward()
    for i, w in enumerate(m.weights()):
        used = m.get_masks(i)[[0, 2]].any(0)  # N x K: in a computed subnet's mask
        assert bool((w.grad[~used] == 0).all())
        assert bool((w.grad[used] != 0).any())
        assert bool((m.biases()[i].grad != 0).any())


def test_masked_mlp_traces_with_fx() -> None:
    class Caller(torch.nn.Module):  # subnets fixed in the caller, as the models do
        def __init__(self) -> None:
            super().__init__()
            self.mlp = MaskedMLP(6, [5, 3], num_subnets=3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mlp(x, [2, 0])

    m = Caller()
    gm = torch.fx.symbolic_trace(m)  # traced through MaskedMLP: one wrapped call per layer
    assert sum(n.op == "call_function" and "masked_relu_layer" in str(n.target) for n in gm.graph.nodes) == 2
    x = torch.randn(4, 6)
    assert torch.equal(gm(x), m(x))


def test_subnet_param_counts() -> None:
    m = MaskedMLP(4, [3, 2], num_subnets=2)
    masks = torch.ones(2, 3, 4, dtype=torch.bool)
    masks[1, 0] = False  # subnet 1 drops a whole row (4 weights) of layer 0
    m.set_masks(0, masks)
    assert m.subnet_param_counts() == [12 + 6 + 5, 8 + 6 + 5]


# ---- models --------------------------------------------------------------------------------------

def test_registered_and_built() -> None:
    assert set(NAMES) <= set(MODELS)
    for name, cls in zip(NAMES, (SparseSharing, CSRec, MLCSRec)):
        _, m = _build(name)
        assert type(m) is cls and m.pairs is None and m.num_tasks == 2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_tasks", [1, 3])
def test_forward_shapes_and_interface(name: str, num_tasks: int) -> None:
    schema, m = _build(name, num_tasks)
    b = tiny_batch(schema, 6)
    out = m(b.dense, b.sparse)
    assert list(out) == schema.task_names and all(v.shape == (6,) for v in out.values())
    assert m.tasks == schema.task_names and m.num_tasks == num_tasks
    assert m.num_subnets == (1 if name == "sparse_sharing" else 2) * num_tasks
    layers = m.masked_layers()
    assert len(layers) == (CFG.num_levels if name == "ml_csrec" else 1)
    assert all(isinstance(l, MaskedMLP) and l.num_subnets == m.num_subnets for l in layers)
    cols = m.input_field_columns()
    assert list(cols) == [*schema.sparse_names, "dense"]
    assert cols["dense"].stop == layers[0].in_features


def test_input_field_columns_locate_each_field() -> None:
    schema, m = _build("csrec")
    b = tiny_batch(schema, 5)
    x = m.input(b.dense, b.sparse)
    emb = m.input.ebc(b.sparse).to_dict()
    cols = m.input_field_columns()
    assert torch.equal(x[:, cols["dense"]], b.dense)
    for f in schema.sparse_names:
        assert torch.equal(x[:, cols[f]], emb[f])


@pytest.mark.parametrize("name", NAMES)
def test_subnets_equal_dense_mlps_in_float64(name: str) -> None:
    schema, m = _build(name, 3)
    _randomise_masks(m)
    m = m.double()
    b = tiny_batch(schema, 9)
    dense = b.dense.double()
    x = m.input(dense, b.sparse)
    assert x.dtype == torch.float64
    subnets = list(range(m.num_subnets))
    h = m.bottom_outputs(x, subnets)
    for s in subnets:
        assert (h[s] - _reference_bottom(m, x, s)).abs().max() < 1e-10, s
    out = m(dense, b.sparse)
    for k, t in enumerate(m.tasks):
        assert (out[t] - m.towers[t](_reference_bottom(m, x, k))).abs().max() < 1e-10, t


@pytest.mark.parametrize("name", NAMES)
def test_pairs_mode_equals_the_subnets(name: str) -> None:
    schema, m = _build(name, 3)
    _randomise_masks(m)
    b = tiny_batch(schema, 8)
    plain = m(b.dense, b.sparse)
    x = m.input(b.dense, b.sparse)
    last = m.num_subnets - 1
    m.pairs = [(last, "click"), (0, "click"), (1, "click"), (1, "like")]  # other subnets through any tower
    out = m(b.dense, b.sparse)
    assert list(out) == [pair_key(s, t) for s, t in m.pairs]
    assert torch.equal(out["click@0"], plain["click"]) and torch.equal(out["like@1"], plain["like"])
    for s, t in m.pairs:
        assert torch.allclose(out[pair_key(s, t)], m.towers[t](m.bottom_outputs(x, [s])[0]), atol=1e-6, rtol=0)
    m.pairs = [(0, "ghost")]
    with pytest.raises(ValueError, match="task"):
        m(b.dense, b.sparse)
    m.pairs = [(m.num_subnets, "click")]
    with pytest.raises(ValueError, match="subnet"):
        m(b.dense, b.sparse)


def test_csrec_contrastive_pairs() -> None:
    schema, m = _build("csrec")
    assert [m.task_subnet(t) for t in m.tasks] == [0, 1] and [m.contrastive_subnet(t) for t in m.tasks] == [2, 3]
    b = tiny_batch(schema, 8)
    for k in range(2):  # contrastive masks of task k: reverse the first layer's mask
        layer = m.bottom.get_masks(0)
        m.bottom.set_masks(0, ~layer[k : k + 1], subnets=[2 + k])
    m.pairs = [(0, "click"), (m.contrastive_subnet("click"), "click")]
    out = m(b.dense, b.sparse)
    assert set(out) == {"click@0", "click@2"} and not torch.equal(out["click@0"], out["click@2"])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pairs", [[(0, "click")], [(1, "click")], [(0, "like"), (1, "like")], "all"])
def test_every_parameter_gets_a_gradient_from_any_pair_logit(name: str, pairs) -> None:
    schema, m = _build(name, 3)
    if pairs == "all":
        pairs = [(s, t) for s in range(m.num_subnets) for t in m.tasks]
    m.pairs = pairs
    b = tiny_batch(schema, 8)
    for key in list(m(b.dense, b.sparse)):
        m.zero_grad(set_to_none=True)
        out = m(b.dense, b.sparse)
        out[key].sum().backward()
        for pname, p in m.named_parameters():
            assert p.grad is not None, f"{name} {key}: {pname} got no gradient"
            assert torch.isfinite(p.grad).all(), pname
        task = key.split("@")[0]
        for t in m.tasks:  # towers that logit does not read: an exact zero gradient
            tower_grad = sum(float(p.grad.abs().sum()) for p in m.towers[t].parameters())
            assert (tower_grad > 0) == (t == task), (key, t)


@pytest.mark.parametrize("name", NAMES)
def test_weights_outside_the_computed_masks_get_zero_gradient(name: str) -> None:
    schema, m = _build(name, 2)
    _randomise_masks(m, keep=0.4)
    b = tiny_batch(schema, 16)
    m.pairs = [(m.num_subnets - 1, "click"), (0, "like")]
    used_subnets = [0, m.num_subnets - 1]
    out = m(b.dense, b.sparse)
    sum(v.sum() for v in out.values()).backward()
    for block in m.masked_layers():
        for i, w in enumerate(block.weights()):
            used = block.get_masks(i)[used_subnets].any(0)
            assert bool((w.grad[~used] == 0).all())
            assert bool((w.grad[used] != 0).any())


@pytest.mark.parametrize("name", NAMES)
def test_meta_build_then_materialisation_gives_all_one_masks(name: str) -> None:
    from torchrec.distributed.model_parallel import DistributedModelParallel

    schema, m = _build(name, device="meta")
    assert all(l.packed_masks(0).is_meta for l in m.masked_layers())
    # TorchRec's own meta initialisation (DMP's _init_parameters: buffers come out as zeros, then
    # reset_parameters() of each module that owned a meta parameter).
    DistributedModelParallel._init_parameters(types.SimpleNamespace(device=torch.device("cpu")), m)
    for block in m.masked_layers():
        for i in range(block.num_layers):
            assert not block.packed_masks(i).is_meta and bool(block.get_masks(i).all())
            full = torch.ones(block.get_masks(i).shape, dtype=torch.bool)
            assert torch.equal(block.packed_masks(i), pack_masks(full))
            assert block.weights()[i].abs().sum() > 0 and block.biases()[i].abs().sum() > 0
    b = tiny_batch(schema, 4)
    assert all(torch.isfinite(v).all() for v in m(b.dense, b.sparse).values())
    # to_empty (garbage buffers) + reset of every module that has reset_parameters
    _, m2 = _build(name, device="meta")
    m2.to_empty(device="cpu")
    for block in m2.masked_layers():
        block.packed_masks(0).fill_(7)
    for mod in m2.modules():
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
    assert all(bool(l.get_masks(i).all()) for l in m2.masked_layers() for i in range(l.num_layers))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_holds_the_packed_masks_and_round_trips(name: str, tmp_path) -> None:
    schema, m = _build(name)
    _randomise_masks(m, seed=5)
    sd = m.state_dict()
    mask_keys = [k for k in sd if ".masks_" in k]
    assert len(mask_keys) == sum(l.num_layers for l in m.masked_layers())
    assert all(sd[k].dtype == torch.uint8 for k in mask_keys)
    _, fresh = _build(name)
    fresh.load_state_dict(sd)
    b = tiny_batch(schema, 5)
    for a, c in zip(m.masked_layers(), fresh.masked_layers()):
        assert all(torch.equal(a.get_masks(i), c.get_masks(i)) for i in range(a.num_layers))
    assert all(torch.equal(m(b.dense, b.sparse)[t], fresh(b.dense, b.sparse)[t]) for t in m.tasks)
    # torch.distributed.checkpoint (the trainer's format), in one process
    import torch.distributed.checkpoint as dcp

    dense = {k: v for k, v in sd.items() if "ebc" not in k}
    dcp.save(dense, checkpoint_id=str(tmp_path / "ck"))
    _, other = _build(name)
    target = {k: v for k, v in other.state_dict().items() if "ebc" not in k}
    dcp.load(target, checkpoint_id=str(tmp_path / "ck"))
    for k in mask_keys:
        assert torch.equal(target[k], sd[k])


def test_ml_csrec_one_level_is_csrec() -> None:
    schema = tiny_schema()
    torch.manual_seed(0)
    a = CSRec(build_ebc(schema, 4), len(schema.dense), schema.task_names, [8, 4], [4])
    torch.manual_seed(0)
    c = MLCSRec(build_ebc(schema, 4), len(schema.dense), schema.task_names, 1, [8, 4], [4])
    assert len(c.shared) == 0 and c.num_subnets == a.num_subnets
    b = tiny_batch(schema, 5)
    assert all(torch.equal(a(b.dense, b.sparse)[t], c(b.dense, b.sparse)[t]) for t in a.tasks)
    with pytest.raises(ValueError, match="num_levels"):
        MLCSRec(build_ebc(schema, 4), len(schema.dense), schema.task_names, 0, [8], [4])


def test_ml_csrec_shared_path_is_reached_by_every_task() -> None:
    schema, m = _build("ml_csrec", 2, num_levels=3)
    assert len(m.levels) == 3 and len(m.shared) == 2
    b = tiny_batch(schema, 16)
    for t in m.tasks:
        m.zero_grad(set_to_none=True)
        m(b.dense, b.sparse)[t].sum().backward()
        assert all(p.grad.abs().sum() > 0 for p in m.shared.parameters())


# ---- sharded ---------------------------------------------------------------------------------------

def _dmp_worker(names: list[str]) -> dict:
    import torch.distributed as dist

    from recsys_mtl.config import OptimConfig, ShardingConfig
    from recsys_mtl.distributed.env import init_distributed
    from recsys_mtl.distributed.optim import make_optimizer
    from recsys_mtl.distributed.sharding import shard_model

    env = init_distributed()
    schema = tiny_schema()
    optim = OptimConfig(sparse_optimizer="sgd", sparse_lr=0.5, dense_optimizer="adam", dense_lr=1e-2)
    out = {}
    for name in names:
        torch.manual_seed(0)
        model = build_model(schema, dataclasses.replace(CFG, name=name), "meta")
        dmp, _ = shard_model(model, ShardingConfig(sharding_type="row_wise"), optim, device=env.device,
                             world_size=env.world_size, local_world_size=env.world_size, batch_size=16)
        inner = dmp.module
        all_ones = all(bool(l.get_masks(i).all()) for l in inner.masked_layers() for i in range(l.num_layers))
        opt = make_optimizer(dmp, optim)
        b = tiny_batch(schema, 16, seed=env.rank)
        t = inner.num_tasks
        # alternating modes through DDP (static graph): the parameters used must not change
        schedule = [None, [(inner.num_subnets - 1, "click")], [(1, "like"), (0, "like")], None, [(0, "click")]]
        losses = []
        for pairs in schedule:
            inner.pairs = pairs
            logits = dmp(b.dense, b.sparse)
            loss = sum(F.binary_cross_entropy_with_logits(v, b.labels[:, 0]) for v in logits.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        inner.pairs = None
        dense = torch.stack([p.detach().double().sum() for n, p in inner.named_parameters() if "ebc" not in n])
        gathered = [torch.zeros_like(dense) for _ in range(env.world_size)]
        dist.all_gather(gathered, dense)
        mask_keys = sorted(k for k in dmp.state_dict() if ".masks_" in k)
        out[name] = {"all_ones": all_ones, "ranks_agree": all(torch.equal(g, gathered[0]) for g in gathered),
                     "mask_keys": mask_keys, "finite": all(math.isfinite(x) for x in losses), "num_tasks": t}
    return out


@pytest.mark.multirank
def test_sharded_masks_materialise_and_pairs_modes_alternate_under_ddp() -> None:
    from multirank import run_ranks

    results = run_ranks(_dmp_worker, 2, NAMES, timeout=600)
    assert results[0] == results[1]
    for name, r in results[0].items():
        assert r["all_ones"] and r["ranks_agree"] and r["finite"], (name, r)
        assert len(r["mask_keys"]) == len(CFG.bottom_layer_sizes) * (CFG.num_levels if name == "ml_csrec" else 1)
