"""Task-gradient combiners: PMTRec's per-row pooling and the torchjd baselines, against a reference
that takes every task's gradient of the whole tables with one autograd pass per task, on an
unsharded model (single-hot, multi-hot sum and mean bags, repeated rows, a table shared by two
features)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchjd.aggregation as jd
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys_mtl.config import GradConfig
from recsys_mtl.data.schema import DenseFeature, Schema, SparseFeature, TaskSpec
from recsys_mtl.models.shared_bottom import SharedBottom
from recsys_mtl.testing import tiny_batch
from recsys_mtl.train.grad_combiners import (
    AGGREGATORS,
    AggregatorCombiner,
    CombinerState,
    make_combiner,
    pmtrec_focus,
    pmtrec_row_combination,
)
from recsys_mtl.train.losses import MultiTaskLoss
from recsys_mtl.train.row_grads import CombinedGradStep
from recsys_mtl.train.task import MTLTrainModule

D = 4


def _schema(pooling: str = "mean", multi_hot: bool = True) -> Schema:
    return Schema(
        sparse=(SparseFeature("user", 12, side="user"), SparseFeature("item", 15, side="item"),
                SparseFeature("tags", 15, multi_hot=multi_hot, pooling=pooling, side="item")),
        dense=(DenseFeature("d0"), DenseFeature("d1")),
        tasks=(TaskSpec("a"), TaskSpec("b"), TaskSpec("c", "regression")),
    )


def _model(schema: Schema, seed: int = 0) -> MTLTrainModule:
    """Shared-bottom over two tables; ``items`` is shared by the ``item`` and ``tags`` features."""
    torch.manual_seed(seed)
    pooling = PoolingType.MEAN if schema.feature("tags").pooling == "mean" else PoolingType.SUM
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="t_users", embedding_dim=D, num_embeddings=12, feature_names=["user"]),
        EmbeddingBagConfig(name="t_items", embedding_dim=D, num_embeddings=15, feature_names=["item", "tags"],
                           pooling=pooling),
    ])
    model = SharedBottom(ebc, 2, schema.task_names, (8,), (4,))
    return MTLTrainModule(model, MultiTaskLoss(schema.tasks))


def _batch(schema: Schema, seed: int, n: int = 10):
    b = tiny_batch(schema, n, seed=seed)
    # few distinct ids: rows repeat across samples and inside bags
    kjt = b.sparse
    vals = kjt.values() % 5
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    b = type(b)(dense=b.dense, sparse=KeyedJaggedTensor(keys=kjt.keys(), values=vals, lengths=kjt.lengths()),
                labels=b.labels, label_mask=b.label_mask)
    return b


def _tables(tm: MTLTrainModule) -> list[torch.Tensor]:
    return [tm.model.input.ebc.embedding_bags[name].weight for name in ("t_users", "t_items")]


def _reference(tm: MTLTrainModule, batch, combine_rows, combine_dense):
    """Per-task gradients of the whole tables and the dense parameters, one autograd pass per task."""
    tables = _tables(tm)
    ids = {id(t) for t in tables}
    dense = [p for p in tm.parameters() if id(p) not in ids]
    logits = tm.model(batch.dense, batch.sparse)
    w = tm.loss.current_weights()
    losses = [w[k] * tm.loss.task_loss(k, logits[t], batch.labels, batch.label_mask) for k, t in enumerate(tm.task_names)]
    grads = [torch.autograd.grad(lt, tables + dense, retain_graph=True, allow_unused=True) for lt in losses]
    grads = [[torch.zeros_like(x) if g is None else g for g, x in zip(gs, tables + dense)] for gs in grads]
    table_jac = torch.stack([torch.cat([g[0], g[1]]) for g in grads])  # T x (12 + 15) x D
    touched = torch.unique(torch.cat([batch.sparse["user"].values(), 12 + batch.sparse["item"].values(),
                                      12 + batch.sparse["tags"].values()]))
    rows = combine_rows(table_jac[:, touched])  # U x D
    full = torch.zeros(27, D)
    full[touched] = rows
    dense_out = combine_dense([[g[2 + j] for g in grads] for j in range(len(dense))], dense)
    return [full[:12], full[12:]], dense_out


def _run_combined(tm: MTLTrainModule, batch, schema, cfg: GradConfig):
    state = CombinerState(len(schema.tasks))
    tm.grad_step = CombinedGradStep(tm, make_combiner(cfg, schema.task_names, 7, state), schema, cfg.stats)
    tm.train()
    surrogate, (total, *_) = tm(batch)
    surrogate.backward()
    tables = _tables(tm)
    ids = {id(t) for t in tables}
    return [t.grad for t in tables], [p.grad for p in tm.parameters() if id(p) not in ids], total


@pytest.mark.parametrize("pooling", ["mean", "sum"])
@pytest.mark.parametrize("tau,alpha,epoch", [(0.05, 1.3, 2), (1.0, 1.0, 0), (1e6, 1.1, 1)])
def test_pmtrec_matches_per_task_autograd(pooling: str, tau: float, alpha: float, epoch: int) -> None:
    schema = _schema(pooling)
    tm = _model(schema)
    ref_tm = copy.deepcopy(tm)
    batch = _batch(schema, seed=3)
    cfg = GradConfig(combiner="pmtrec", alpha=alpha, tau=tau, main_task="b")
    focus = pmtrec_focus(3, 1, alpha, epoch)
    rows_ref, dense_ref = _reference(
        ref_tm, batch, lambda j: pmtrec_row_combination(j, focus, tau),
        lambda gs, ps: [torch.stack(g).sum(0) for g in gs])
    state_epoch = epoch
    state = CombinerState(3)
    state.epoch.fill_(state_epoch)
    tm.grad_step = CombinedGradStep(tm, make_combiner(cfg, schema.task_names, 7, state), schema)
    tm.train()
    surrogate, (total, *_) = tm(batch)
    surrogate.backward()
    got = [t.grad for t in _tables(tm)]
    for g, r in zip(got, rows_ref):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    ids = {id(t) for t in _tables(tm)}
    for p, r in zip([p for p in tm.parameters() if id(p) not in ids], dense_ref):
        torch.testing.assert_close(p.grad, r, atol=1e-6, rtol=1e-5)
    # the reported loss is the ordinary weighted sum
    torch.testing.assert_close(total, ref_tm(batch)[0].detach())


def test_pmtrec_single_hot_uses_the_pooled_output() -> None:
    """All features single-valued: no second lookup, the same exact gradients."""
    schema = _schema("sum", multi_hot=False)
    tm = _model(schema)
    batch = tiny_batch(schema, 9, seed=1)
    ref_tm = copy.deepcopy(tm)
    focus = pmtrec_focus(3, 0, 1.1, 0)
    rows_ref, _ = _reference(ref_tm, batch, lambda j: pmtrec_row_combination(j, focus, GradConfig().tau),
                             lambda gs, ps: [torch.stack(g).sum(0) for g in gs])
    step = CombinedGradStep(tm, make_combiner(GradConfig(combiner="pmtrec"), schema.task_names, 0, CombinerState(3)),
                            schema)
    assert step.capture.inject == [False]
    tm.grad_step = step
    tm.train()
    tm(batch)[0].backward()
    for g, r in zip([t.grad for t in _tables(tm)], rows_ref):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_baselines_match_the_library_on_batch_rows(name: str) -> None:
    """One aggregation over every embedding row of the batch, one over the dense parameters."""
    schema = _schema("mean")
    tm = _model(schema)
    ref_tm = copy.deepcopy(tm)
    batch = _batch(schema, seed=5)
    cfg = GradConfig(combiner=name)
    ref = AggregatorCombiner(name, 3, 7, CombinerState(3), cfg)

    def rows(j):  # T x U x D -> U x D
        return ref.combine_rows(j.reshape(3, -1)).view(-1, D)

    def dense(gs, ps):
        flat = ref.combine_dense(torch.cat([torch.stack(g).reshape(3, -1) for g in gs], dim=1))
        out, s = [], 0
        for p in ps:
            out.append(flat[s:s + p.numel()].view_as(p))
            s += p.numel()
        return out

    rows_ref, dense_ref = _reference(ref_tm, batch, rows, dense)
    got_rows, got_dense, _ = _run_combined(tm, batch, schema, cfg)
    for g, r in zip(got_rows, rows_ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    for g, r in zip(got_dense, dense_ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregator_combiner_is_the_library_aggregator(name: str) -> None:
    """On small Jacobians the combiner returns what torchjd's own aggregator returns."""
    g = torch.Generator().manual_seed(0)
    jac = torch.randn(3, 11, generator=g)
    jac[1] = -0.5 * jac[0] + 0.1 * jac[1]  # a conflicting pair
    combiner = AggregatorCombiner(name, 3, 5, CombinerState(3), GradConfig(combiner=name))
    lib = {"graddrop": jd.GradDrop(), "pcgrad": jd.PCGrad(), "gradvac": jd.GradVac(), "cagrad": jd.CAGrad(c=0.5),
           "aligned_mtl": jd.AlignedMTL(), "nash_mtl": jd.NashMTL(n_tasks=3, max_norm=1.0), "rlw": jd.Random()}[name]
    for step in range(3):
        got = combiner.combine_rows(jac)
        with combiner.step_rng(0):
            want = lib(jac)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        combiner.step_done()
        jac = jac + 0.1


def test_stateful_aggregators_resume_from_the_state_buffers() -> None:
    """GradVac's targets and Nash-MTL's previous weights survive a state-dict round trip."""
    for name in ("gradvac", "nash_mtl"):
        g = torch.Generator().manual_seed(1)
        jacs = [torch.randn(3, 9, generator=g) for _ in range(4)]
        state = CombinerState(3)
        a = AggregatorCombiner(name, 3, 0, state, GradConfig(combiner=name))
        outs = []
        for j in jacs:
            outs.append(a.combine_rows(j))
            a.step_done()
        state2 = CombinerState(3)
        b = AggregatorCombiner(name, 3, 0, state2, GradConfig(combiner=name))
        for j in jacs[:2]:
            b.combine_rows(j)
            b.step_done()
        saved = copy.deepcopy(state2.state_dict())
        state3 = CombinerState(3)
        state3.load_state_dict(saved)
        c = AggregatorCombiner(name, 3, 0, state3, GradConfig(combiner=name))
        for j, want in zip(jacs[2:], outs[2:]):
            torch.testing.assert_close(c.combine_rows(j), want, atol=1e-6, rtol=1e-5)
            c.step_done()


def test_bad_combiner_settings() -> None:
    with pytest.raises(ValueError, match="--grad-combiner"):
        GradConfig(combiner="nope")
    with pytest.raises(ValueError, match="--pmtrec-tau"):
        GradConfig(combiner="pmtrec", tau=0.0)
    with pytest.raises(ValueError, match="--pmtrec-main-task"):
        make_combiner(GradConfig(combiner="pmtrec", main_task="zzz"), ["a", "b"], 0, CombinerState(2))
