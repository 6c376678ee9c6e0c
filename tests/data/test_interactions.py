"""Interaction datasets: sampled training batches (BPR negatives, trusted friends, same-category
items), rank shares and resume determinism, the MF model's pairwise logits, and the full-ranking
evaluation against a brute-force computation; an end-to-end 2-rank run with PMTRec."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ranking_check import assert_matches_brute_force
from recsys_mtl.config import ModelConfig
from recsys_mtl.data.convert.trust import convert_trust
from recsys_mtl.data.interactions import (
    InteractionBatches,
    InteractionData,
    load_training_schema,
    sample_batch,
    training_schema,
)
from recsys_mtl.data.schema import Schema
from recsys_mtl.models import build_model
from recsys_mtl.testing import write_trust_release
from recsys_mtl.train.pair_eval import evaluate_pairs

@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pairs")
    out = d / "data"
    convert_trust("ciao", list(write_trust_release(d / "raw")), out, quiet=True)
    return out


def test_training_schema_roles(dataset: Path) -> None:
    s = load_training_schema(dataset)
    assert s.sparse_names == ["user", "friend", "neg_friend", "item", "neg_item", "cat_item", "neg_cat_item"]
    assert s.task_names == ["rec", "social", "category"]
    assert s.metadata["tables"] == {"user_emb": ["user", "friend", "neg_friend"],
                                    "item_emb": ["item", "neg_item", "cat_item", "neg_cat_item"]}
    assert training_schema(Schema.load(dataset)) == s


def test_sampled_pairs_follow_the_side_information(dataset: Path) -> None:
    data = InteractionData.load(dataset)
    s = load_training_schema(dataset)
    u, i = data.splits["train"]
    b = sample_batch(data, u, i, s.task_names, s.sparse_names, np.random.default_rng(0))
    f = {k: v.values().numpy() for k, v in b.sparse.to_dict().items()}
    mask = b.label_mask.numpy()
    assert (f["user"] == u).all() and (f["item"] == i).all()
    assert not data.seen(f["user"], f["neg_item"]).any()  # BPR negatives: not train items of the user
    social, category = data.sides["social"], data.sides["category"]
    ip, fr = social.indptr, social.partners
    for k in range(u.size):
        friends = set(fr[ip[u[k]]:ip[u[k] + 1]].tolist())
        assert mask[k, 1] == bool(friends)
        if friends:
            assert f["friend"][k] in friends
    same = category.group[f["cat_item"]] == category.group[i]
    assert (same | ~mask[:, 2]).all() and ((f["cat_item"] != i) | ~mask[:, 2]).all()
    assert mask[:, 2].mean() > 0.9 and 0.2 < mask[:, 1].mean() < 1.0
    assert (b.labels == 1).all()


def test_epoch_shares_and_resume(dataset: Path) -> None:
    s = load_training_schema(dataset)
    kw = dict(batch_size=16, world_size=2, seed=3, epoch=1)
    shares = [list(InteractionBatches(dataset, s, rank=r, **kw)) for r in range(2)]
    n = InteractionData.load(dataset).rows("train")
    seen = sorted(int(x) for sh in shares for b in sh for x in b.sparse["user"].values() * 1000
                  + b.sparse["item"].values())
    u, i = InteractionData.load(dataset).splits["train"]
    assert seen == sorted((u * 1000 + i).tolist()) and len(seen) == n  # every interaction once per epoch
    again = list(InteractionBatches(dataset, s, rank=1, start_batch=2, **kw))
    for a, b in zip(again, shares[1][2:]):  # a resumed share draws the same samples
        assert torch.equal(a.sparse.values(), b.sparse.values())
    other = list(InteractionBatches(dataset, s, rank=1, **{**kw, "epoch": 2}))
    assert not torch.equal(other[0].sparse.values(), shares[1][0].sparse.values())


def test_mf_logits_are_score_differences(dataset: Path) -> None:
    s = load_training_schema(dataset)
    torch.manual_seed(0)
    model = build_model(s, ModelConfig(name="mf", embedding_dim=8))
    data = InteractionData.load(dataset)
    u, i = data.splits["train"]
    b = sample_batch(data, u[:5], i[:5], s.task_names, s.sparse_names, np.random.default_rng(1))
    out = model(b.dense, b.sparse)
    ue = model.ebc.embedding_bags["user_emb"].weight
    ie = model.ebc.embedding_bags["item_emb"].weight
    f = {k: v.values() for k, v in b.sparse.to_dict().items()}
    want = (ue[f["user"]] * ie[f["item"]]).sum(1) - (ue[f["user"]] * ie[f["neg_item"]]).sum(1)
    torch.testing.assert_close(out["rec"], want)
    want = (ie[f["item"]] * ie[f["cat_item"]]).sum(1) - (ie[f["item"]] * ie[f["neg_cat_item"]]).sum(1)
    torch.testing.assert_close(out["category"], want)


@pytest.mark.parametrize("split", ["eval", "test"])
def test_full_ranking_evaluation_is_brute_force(dataset: Path, split: str) -> None:
    s = load_training_schema(dataset)
    torch.manual_seed(0)
    model = build_model(s, ModelConfig(name="mf", embedding_dim=8))
    data = InteractionData.load(dataset)
    got = evaluate_pairs(model, str(dataset), s, split=split, batch_users=7)["rec"]
    ue = model.ebc.embedding_bags["user_emb"].weight.detach().numpy()
    ie = model.ebc.embedding_bags["item_emb"].weight.detach().numpy()
    assert_matches_brute_force(got, ue @ ie.T, data, split)


@pytest.mark.e2e
@pytest.mark.multirank
def test_mf_pmtrec_trains_on_two_ranks(dataset: Path, tmp_path: Path) -> None:
    from recsys_mtl.cli import main

    out = tmp_path / "out"
    rc = main(["train", "--data", str(dataset), "--model", "mf", "--embedding-dim", "8", "--output-dir", str(out),
               "--nproc-per-node", "2", "--epochs", "3", "--batch-size", "32", "--sparse-lr", "0.1",
               "--grad-combiner", "pmtrec", "--pmtrec-tau", "0.01", "--sharding", "row_wise",
               "--eval-every", "5", "--keep-best", "rec/ndcg@20"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for where in (m["tasks"]["rec"], m["test"]["rec"]):
        assert {f"{x}@{k}" for x in ("recall", "ndcg", "hit") for k in (5, 10, 20, 40)} <= set(where)
    assert m["config"]["grad"]["combiner"] == "pmtrec"
    assert m["best"]["metric"] == "rec/ndcg@20" if "metric" in m["best"] else True
    # the planted groups are learnt: far above random ranking (recall@20 ≈ 20/60 of held-out items by chance
    # is an upper bound for random; a group-aware ranking puts the group's 15 items first)
    assert m["test"]["rec"]["hit@5"] > 0.3, m["test"]
