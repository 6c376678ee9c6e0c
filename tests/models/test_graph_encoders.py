"""Graph encoders over weighted bags: LightGCN's and NGCF's representations against dense
references (``Σ_k α_k Â^k E``, NGCF Eq. 7/9), K = 0 LightGCN against MF, the weighted batches and
their padding, full-ranking evaluation against brute force on the dense final embeddings, PMTRec
on weighted bags against per-task autograd, the refused multi-layer NGCF, and 2-rank runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ranking_check import assert_matches_brute_force
from recsys_mtl.config import GradConfig, ModelConfig
from recsys_mtl.data.convert.trust import convert_trust
from recsys_mtl.data.interactions import (
    GraphBags,
    InteractionBatches,
    InteractionData,
    load_training_schema,
    sample_batch,
)
from recsys_mtl.data.schema import Schema, SparseFeature, TaskSpec
from recsys_mtl.models import build_model
from recsys_mtl.train.grad_combiners import CombinerState, make_combiner, pmtrec_focus, pmtrec_row_combination
from recsys_mtl.train.losses import MultiTaskLoss
from recsys_mtl.train.loop import empty_batch, pad_batch
from recsys_mtl.train.pair_eval import evaluate_pairs
from recsys_mtl.train.row_grads import CombinedGradStep
from recsys_mtl.train.task import MTLTrainModule
from recsys_mtl.testing import write_trust_release

D = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("graph")
    out = d / "data"
    convert_trust("ciao", list(write_trust_release(d / "raw")), out, quiet=True)
    return out


def _dense_adjacency(data: InteractionData) -> np.ndarray:
    """``Â`` of the train graph, dense, built from the interaction pairs directly."""
    nu, n = data.num_users, data.num_users + data.num_items
    a = np.zeros((n, n))
    for u, i in zip(*data.splits["train"]):
        a[u, nu + i] = a[nu + i, u] = 1.0
    deg = a.sum(1)
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-12)), 0.0)
    return inv[:, None] * a * inv[None, :]


def _tables(model) -> np.ndarray:
    """``E``: the user rows then the item rows, ``(U+I) x D`` float64."""
    bags = model.ebc.embedding_bags
    return np.concatenate([bags["user_emb"].weight.detach().double().numpy(),
                           bags["item_emb"].weight.detach().double().numpy()])


def _batch(dataset: Path, schema: Schema, n: int = 24, seed: int = 1):
    data = InteractionData.load(dataset)
    g = schema.metadata.get("graph")
    graph = GraphBags.load(dataset, g["encoder"], g["layers"], g["max_neighbours"]) if g else None
    u, i = data.splits["train"]
    return data, sample_batch(data, u[:n], i[:n], schema.task_names, schema.sparse_names,
                              np.random.default_rng(seed), graph=graph)


def _dense(csr, cols: int) -> np.ndarray:
    """A :class:`GraphBags` CSR block as a dense ``(U+I) x cols`` float64 array."""
    out = np.zeros((csr.indptr.size - 1, cols))
    rows = np.repeat(np.arange(csr.indptr.size - 1), np.diff(csr.indptr))
    out[rows, csr.indices] = csr.data
    return out


def _nodes(data: InteractionData, role: str, ids: np.ndarray) -> np.ndarray:
    return ids if role in ("user", "friend", "neg_friend") else ids + data.num_users


def _sampled_ids(dataset: Path, schema: Schema, n: int = 24, seed: int = 1) -> dict[str, np.ndarray]:
    """The role ids the batch of :func:`_batch` draws (the same generator, one id per role)."""
    data = InteractionData.load(dataset)
    u, i = data.splits["train"]
    mf = load_training_schema(dataset)
    b = sample_batch(data, u[:n], i[:n], mf.task_names, mf.sparse_names, np.random.default_rng(seed))
    return {k: v.values().numpy() for k, v in b.sparse.to_dict().items()}


def test_schema_and_weighted_batches(dataset: Path) -> None:
    s = load_training_schema(dataset, ModelConfig(name="lightgcn", graph_layers=2))
    assert s.metadata["weighted"] and s.metadata["graph"] == {"encoder": "lightgcn", "layers": 2, "max_neighbours": 0}
    assert s.metadata["tables"]["user_emb"] == ["user__u", "friend__u", "neg_friend__u", "item__u", "neg_item__u",
                                                "cat_item__u", "neg_cat_item__u"]
    assert all(f.multi_hot for f in s.sparse)
    n = load_training_schema(dataset, ModelConfig(name="ngcf"))
    assert n.metadata["tables"]["user_emb"][:3] == ["user", "friend", "neg_friend"]
    assert "user__nbr" in n.metadata["tables"]["item_emb"]
    assert load_training_schema(dataset, ModelConfig(name="mf")) == load_training_schema(dataset)
    # an epoch's batches carry weights; padding and empty batches keep the weights aligned with the values
    batches = list(InteractionBatches(dataset, s, batch_size=40, world_size=2, rank=1))
    kjt = batches[-1].sparse
    assert kjt.weights().shape == kjt.values().shape
    padded = pad_batch(batches[-1], 64).sparse
    assert torch.equal(padded.weights(), kjt.weights()) and padded.stride() == 64
    empty = empty_batch(s, 3).sparse
    assert empty.weights().numel() == 0 and empty.values().numel() == 0


@pytest.mark.parametrize("layers,max_neighbours", [(0, 0), (1, 0), (2, 0), (2, 5)])
def test_lightgcn_embed_is_the_dense_propagation(dataset: Path, layers: int, max_neighbours: int) -> None:
    s = load_training_schema(dataset, ModelConfig(name="lightgcn", graph_layers=layers,
                                                  graph_max_neighbours=max_neighbours))
    torch.manual_seed(0)
    model = build_model(s, ModelConfig(name="lightgcn", embedding_dim=D, graph_layers=layers))
    data, batch = _batch(dataset, s)
    ah = _dense_adjacency(data)
    p = sum(np.linalg.matrix_power(ah, k) for k in range(layers + 1)) / (layers + 1)  # Σ_k α_k Â^k
    if max_neighbours:  # the documented truncation: each row keeps N of its largest weights
        graph = GraphBags.load(dataset, "lightgcn", layers, max_neighbours)
        kept = np.concatenate([_dense(graph.to_users, data.num_users), _dense(graph.to_items, data.num_items)], 1)
        on = kept != 0
        np.testing.assert_allclose(kept[on], p[on], rtol=1e-6)
        for row, keep in zip(p, on):
            assert keep.sum() == min(max_neighbours, (row != 0).sum())
            assert not keep.any() or row[keep].min() >= row[~keep].max(initial=0.0) - 1e-7
        p = np.where(on, p, 0.0)
    final = p @ _tables(model)  # (U+I) x D
    got = model.embed(batch.sparse)
    for role, ids in _sampled_ids(dataset, s).items():
        np.testing.assert_allclose(got[role].detach().double().numpy(), final[_nodes(data, role, ids)],
                                   rtol=1e-5, atol=1e-6)


def test_lightgcn_without_layers_is_mf(dataset: Path) -> None:
    s = load_training_schema(dataset, ModelConfig(name="lightgcn", graph_layers=0))
    mf_s = load_training_schema(dataset)
    torch.manual_seed(0)
    lgcn = build_model(s, ModelConfig(name="lightgcn", embedding_dim=D, graph_layers=0))
    mf = build_model(mf_s, ModelConfig(name="mf", embedding_dim=D))
    mf.load_state_dict(lgcn.state_dict())
    _, gb = _batch(dataset, s)
    _, mb = _batch(dataset, mf_s)
    got, want = lgcn(gb.dense, gb.sparse), mf(mb.dense, mb.sparse)
    for t in want:
        torch.testing.assert_close(got[t], want[t])


def test_ngcf_embed_is_its_formula(dataset: Path) -> None:
    s = load_training_schema(dataset, ModelConfig(name="ngcf"))
    torch.manual_seed(0)
    model = build_model(s, ModelConfig(name="ngcf", embedding_dim=D))
    data, batch = _batch(dataset, s)
    e = _tables(model)
    ah = _dense_adjacency(data)  # bipartite: Â's row of a user has only item columns
    side = ah @ e  # s_x = Σ_{y ∈ N(x)} Â_xy e_y
    w1, b1 = model.w1.weight.detach().double().numpy(), model.w1.bias.detach().double().numpy()
    w2, b2 = model.w2.weight.detach().double().numpy(), model.w2.bias.detach().double().numpy()
    z = (e + side) @ w1.T + b1 + (e * side) @ w2.T + b2
    final = np.concatenate([e, np.where(z > 0, z, 0.2 * z)], axis=1)  # concat(e, LeakyReLU(...)): NGCF Eq. 9
    got = model.embed(batch.sparse)
    for role, ids in _sampled_ids(dataset, s).items():
        np.testing.assert_allclose(got[role].detach().double().numpy(), final[_nodes(data, role, ids)],
                                   rtol=1e-5, atol=1e-6)
    out = model(batch.dense, batch.sparse)
    ids = _sampled_ids(dataset, s)
    fu, fi, fn = (final[_nodes(data, r, ids[r])] for r in ("user", "item", "neg_item"))
    np.testing.assert_allclose(out["rec"].detach().double().numpy(), (fu * fi).sum(1) - (fu * fn).sum(1),
                               rtol=1e-4, atol=1e-5)


def test_multi_layer_ngcf_is_refused() -> None:
    with pytest.raises(ValueError, match="graph-layers.*ngcf.*layer-1 state"):
        ModelConfig(name="ngcf", graph_layers=2)
    with pytest.raises(ValueError, match="graph_layers"):
        ModelConfig(name="lightgcn", graph_layers=4)
    from recsys_mtl.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--data", "d", "--output-dir", "o", "--model", "ngcf",
                                      "--graph-layers", "2"])
    with pytest.raises(ValueError, match="layer-1 state"):
        config_from_args(args)


@pytest.mark.parametrize("name,layers", [("lightgcn", 2), ("ngcf", 1)])
def test_full_ranking_evaluation_is_brute_force(dataset: Path, name: str, layers: int) -> None:
    cfg = ModelConfig(name=name, embedding_dim=D, graph_layers=layers)
    s = load_training_schema(dataset, cfg)
    torch.manual_seed(0)
    model = build_model(s, cfg)
    data = InteractionData.load(dataset)
    got = evaluate_pairs(model, str(dataset), s, split="test", batch_users=7)["rec"]
    graph = GraphBags.load(dataset, name, layers)
    with torch.no_grad():  # every user's and item's final representation, looked up at once
        users = model.embed(graph.kjt(s.sparse_names, {"user": np.arange(data.num_users)}))["user"]
        items = model.embed(graph.kjt(s.sparse_names, {"item": np.arange(data.num_items)}))["item"]
    assert_matches_brute_force(got, (users @ items.T).numpy(), data, "test")


def _weighted_model(seed: int = 0) -> tuple[MTLTrainModule, Schema]:
    """Shared-bottom over a weighted SUM collection; ``t_items`` is shared by ``item`` and ``tags``."""
    from recsys_mtl.data.schema import DenseFeature
    from recsys_mtl.models.shared_bottom import SharedBottom

    schema = Schema(sparse=(SparseFeature("user", 6, multi_hot=True, side="user"),
                            SparseFeature("item", 7, multi_hot=True, side="item"),
                            SparseFeature("tags", 7, multi_hot=True, side="item")),
                    dense=(DenseFeature("d0"),), tasks=(TaskSpec("a"), TaskSpec("b"), TaskSpec("c")))
    torch.manual_seed(seed)
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="t_users", embedding_dim=4, num_embeddings=6, feature_names=["user"]),
        EmbeddingBagConfig(name="t_items", embedding_dim=4, num_embeddings=7, feature_names=["item", "tags"]),
    ], is_weighted=True)
    return MTLTrainModule(SharedBottom(ebc, 1, schema.task_names, (8,), (4,)), MultiTaskLoss(schema.tasks)), schema


def test_pmtrec_on_weighted_bags_matches_per_task_autograd() -> None:
    from recsys_mtl.types import MTLBatch

    tm, schema = _weighted_model()
    ref = copy.deepcopy(tm)
    g = torch.Generator().manual_seed(3)
    b = 6
    lengths = torch.randint(0, 4, (3 * b,), generator=g, dtype=torch.int32)  # empty bags too
    n = int(lengths.sum())
    values = torch.randint(0, 5, (n,), generator=g)  # rows repeat inside and across bags
    weights = torch.rand(n, generator=g) * 2 - 0.5  # negative and zero-ish weights as well
    kjt = KeyedJaggedTensor(keys=["user", "item", "tags"], values=values, lengths=lengths, weights=weights)
    batch = MTLBatch(dense=torch.randn(b, 1, generator=g), sparse=kjt,
                     labels=(torch.rand(b, 3, generator=g) > 0.5).float(), label_mask=torch.ones(b, 3, dtype=torch.bool))

    tables = [ref.model.input.ebc.embedding_bags[t].weight for t in ("t_users", "t_items")]
    logits = ref.model(batch.dense, batch.sparse)
    w = ref.loss.current_weights()
    losses = [w[k] * ref.loss.task_loss(k, logits[t], batch.labels, batch.label_mask)
              for k, t in enumerate(ref.task_names)]
    per_task = [torch.autograd.grad(lt, tables, retain_graph=True) for lt in losses]
    jac = torch.stack([torch.cat(list(gs)) for gs in per_task])  # T x 13 x D
    touched = torch.unique(torch.cat([kjt["user"].values(), 6 + kjt["item"].values(), 6 + kjt["tags"].values()]))
    focus = pmtrec_focus(3, 0, 1.2, 1)
    want = torch.zeros(13, 4)
    want[touched] = pmtrec_row_combination(jac[:, touched], focus, 0.1)

    state = CombinerState(3)
    state.epoch.fill_(1)
    cfg = GradConfig(combiner="pmtrec", alpha=1.2, tau=0.1, main_task="a")
    step = CombinedGradStep(tm, make_combiner(cfg, schema.task_names, 0, state), schema)
    assert step.capture.inject == [True]
    tm.grad_step = step
    tm.train()
    tm(batch)[0].backward()
    got = torch.cat([tm.model.input.ebc.embedding_bags[t].weight.grad for t in ("t_users", "t_items")])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.e2e
@pytest.mark.multirank
@pytest.mark.parametrize("name", ["lightgcn", "ngcf"])
def test_graph_encoder_pmtrec_trains_on_two_ranks(dataset: Path, tmp_path: Path, name: str) -> None:
    from recsys_mtl.cli import main

    out = tmp_path / "out"
    rc = main(["train", "--data", str(dataset), "--model", name, "--embedding-dim", "8", "--output-dir", str(out),
               "--nproc-per-node", "2", "--steps", "4", "--batch-size", "32", "--sparse-lr", "0.1",
               "--grad-combiner", "pmtrec", "--sharding", "row_wise", "--graph-layers", "1"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == name and m["steps"] == 4
    for where in (m["tasks"]["rec"], m["test"]["rec"]):
        assert {f"{x}@{k}" for x in ("recall", "ndcg", "hit") for k in (5, 10, 20, 40)} <= set(where)
    assert m["config"]["model"]["graph_layers"] == 1
