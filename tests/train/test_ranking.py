"""Full-ranking Recall/NDCG/HitRate@K (recsys_mtl.ranking) against a brute-force computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys_mtl.ranking import RANKING_KS, InteractionSets, _topk_stable, full_ranking_eval, metric_names, topk_metrics
from multirank import run_ranks


def _brute(scores: np.ndarray, test: dict[int, set], train: dict[int, set], users, ks) -> dict[str, list]:
    """Loop over users: rank the non-excluded items by (score desc, item asc) with Python sorted()."""
    out: dict[str, list] = {n: [] for n in metric_names(ks)}
    out["valid"] = []
    for row, u in enumerate(users):
        t = test.get(u, set())
        cands = [i for i in range(scores.shape[1]) if i not in train.get(u, set())]
        ranked = sorted(cands, key=lambda i: (-scores[row, i], i))
        out["valid"].append(bool(t))
        for k in ks:
            top = ranked[:k]
            hits = [i in t for i in top]
            if not t:
                r = n = h = 0.0
            else:
                r = sum(hits) / len(t)
                dcg = sum(1.0 / math.log2(j + 2) for j, x in enumerate(hits) if x)
                idcg = sum(1.0 / math.log2(j + 2) for j in range(min(len(t), k)))
                n, h = dcg / idcg, float(any(hits))
            out[f"recall@{k}"].append(r)
            out[f"ndcg@{k}"].append(n)
            out[f"hit@{k}"].append(h)
    return out


def _random_case(seed: int, num_users: int = 40, num_items: int = 25):
    """Integer scores (many ties), users without test items, users with nearly all items in train."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(num_users, num_items)).astype(np.float32)
    train: dict[int, set] = {}
    test: dict[int, set] = {}
    for u in range(num_users):
        kind = u % 5
        n_train = num_items - 2 if kind == 1 else int(rng.integers(0, num_items // 2))
        perm = rng.permutation(num_items)
        train[u] = set(perm[:n_train].tolist())
        n_test = 0 if kind == 2 else int(rng.integers(1, min(6, num_items - n_train) + 1))
        test[u] = set(perm[n_train:n_train + n_test].tolist())
    return scores, train, test


def _sets(d: dict[int, set], num_users: int, repeat: bool = False) -> InteractionSets:
    users = [u for u, s in d.items() for _ in s]
    items = [i for s in d.values() for i in s]
    if repeat:  # duplicated pairs in the input count once
        users, items = users + users[::3], items + items[::3]
    return InteractionSets.from_pairs(np.array(users, np.int64), np.array(items, np.int64), num_users)


def test_interaction_sets_csr_and_mask_index():
    s = InteractionSets.from_pairs(torch.tensor([3, 1, 3, 3, 1, 0]), torch.tensor([7, 2, 0, 7, 9, 4]), num_users=5)
    assert s.indptr.tolist() == [0, 1, 3, 3, 5, 5] and s.indices.tolist() == [4, 2, 9, 0, 7]
    assert s.users_with_items().tolist() == [0, 1, 3]
    row, col = s.mask_index(torch.tensor([3, 4, 1]))
    assert row.tolist() == [0, 0, 2, 2] and col.tolist() == [0, 7, 2, 9]
    row, col = s.mask_index(torch.zeros(0, dtype=torch.int64))
    assert row.numel() == col.numel() == 0
    with pytest.raises(ValueError):
        InteractionSets.from_pairs([5], [0], num_users=5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_metrics_matches_brute_force(seed):
    scores, train, test = _random_case(seed)
    ks = (1, 3, 5, 10, 40)  # 40 > the 25 items; K > candidates for the near-full-train users
    users = list(range(scores.shape[0]))
    got = topk_metrics(torch.from_numpy(scores), _sets(test, len(users)), torch.tensor(users),
                       _sets(train, len(users), repeat=True), ks)
    want = _brute(scores, test, train, users, ks)
    assert got["valid"].tolist() == want["valid"] and not all(want["valid"])
    for name in metric_names(ks):
        np.testing.assert_allclose(got[name].numpy(), want[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_no_exclusion_and_user_subset():
    scores, _, test = _random_case(7)
    users = [5, 0, 12, 3]
    got = topk_metrics(torch.from_numpy(scores[users]), _sets(test, 40), torch.tensor(users), None)
    want = _brute(scores[users], test, {}, users, RANKING_KS)
    for name in metric_names(RANKING_KS):
        np.testing.assert_allclose(got[name].numpy(), want[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_exclusion_really_excludes():
    num_items = 12
    test = InteractionSets.from_pairs([0, 0], [3, 4], num_users=1)
    train = InteractionSets.from_pairs([0, 0, 0], [3, 5, 6], num_users=1)  # item 3 is also a test item
    scores = torch.ones(1, num_items)
    scores[0, [3, 5, 6]] = 100.0  # the excluded items score highest
    m = topk_metrics(scores, test, torch.tensor([0]), train, ks=(1, 2, 5, 12))
    # ranking: 0, 1, 2, 4, 7, ... (ties by index, excluded items gone); item 4 is hit at rank 4
    assert m["hit@2"].item() == 0.0 and m["recall@5"].item() == 0.5 and m["recall@12"].item() == 0.5
    assert m["ndcg@5"].item() == pytest.approx((1 / math.log2(5)) / (1 + 1 / math.log2(3)))
    assert scores[0, 3].item() == 100.0  # the caller's scores are left alone
    top = _topk_stable(scores.masked_fill(torch.isin(torch.arange(num_items), torch.tensor([3, 5, 6])), -math.inf), 4)
    assert top.tolist() == [[0, 1, 2, 4]]
    nan = torch.full((1, 4), float("nan"))
    nan[0, 2] = 0.0
    m = topk_metrics(nan, InteractionSets.from_pairs([0], [2], 1), torch.tensor([0]), None, ks=(1,))
    assert m["hit@1"].item() == 1.0  # NaN scores rank last


def test_topk_stable_ties_toward_lower_index():
    rng = np.random.default_rng(3)
    for n_items, k in ((50, 7), (50, 50), (8, 3), (1000, 40)):
        s = torch.from_numpy(rng.integers(0, 3, size=(30, n_items)).astype(np.float32))
        s[0] = 1.0  # one all-tied row
        got = _topk_stable(s, k)
        want = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(got, want)


def _problem(n_eval_users: int, seed: int = 0, num_users: int = 50, num_items: int = 30):
    """Train/test sets with exactly ``n_eval_users`` users holding test items, and fixed scores."""
    rng = np.random.default_rng(seed)
    eval_users = np.sort(rng.choice(num_users, n_eval_users, replace=False))
    tu, ti, xu, xi = [], [], [], []
    for u in range(num_users):
        perm = rng.permutation(num_items)
        n_train = int(rng.integers(0, num_items - 5))
        xu += [u] * n_train
        xi += perm[:n_train].tolist()
        if u in eval_users:
            n = int(rng.integers(1, 5))
            tu += [u] * n
            ti += perm[n_train:n_train + n].tolist()
    test = InteractionSets.from_pairs(np.array(tu, np.int64), np.array(ti, np.int64), num_users)
    train = InteractionSets.from_pairs(np.array(xu, np.int64), np.array(xi, np.int64), num_users)
    table = torch.from_numpy(rng.integers(0, 5, size=(num_users, num_items)).astype(np.float32))
    return test, train, table


def test_full_ranking_eval_single_rank_means():
    test, train, table = _problem(33)
    calls = []
    r = full_ranking_eval(lambda u: (calls.append(u.numel()), table[u])[1], test, train, num_items=30, batch_users=8)
    assert r["users"] == 33 and calls == [8, 8, 8, 8, 1]
    users = test.users_with_items()
    m = topk_metrics(table[users], test, users, train)
    for name in metric_names(RANKING_KS):
        assert r[name] == pytest.approx(float(m[name].double().mean()), rel=1e-12)
    empty = InteractionSets.from_pairs([], [], 50)
    r = full_ranking_eval(lambda u: table[u], empty, train, num_items=30)
    assert r["users"] == 0 and math.isnan(r["recall@20"])


def _rank_fn(cases: list[tuple[int, int]]) -> list[tuple[dict, list[int]]]:
    """On each rank: full_ranking_eval of every (n_eval_users, batch_users) case; score_fn runs an
    all-reduce like a sharded model would, so mismatched call counts would hang or fail."""
    import torch.distributed as dist

    from recsys_mtl.distributed.env import init_distributed

    env = init_distributed("gloo")
    out = []
    for n_eval, batch in cases:
        test, train, table = _problem(n_eval)
        sizes: list[int] = []

        def score_fn(users: torch.Tensor) -> torch.Tensor:
            sizes.append(users.numel())
            probe = torch.ones(1)
            dist.all_reduce(probe)
            assert probe.item() == env.world_size
            return table[users]

        r = full_ranking_eval(score_fn, test, train, num_items=30, batch_users=batch,
                              rank=env.rank, world_size=env.world_size)
        out.append((r, sizes))
    return out


CASES = [(33, 4), (1, 4), (20, 100)]


@pytest.mark.multirank
def test_two_ranks_equal_one_rank():
    single = []
    for n_eval, batch in CASES:
        test, train, table = _problem(n_eval)
        single.append(full_ranking_eval(lambda u: table[u], test, train, num_items=30, batch_users=batch))
    ranks = run_ranks(_rank_fn, 2, CASES)
    for c, (n_eval, batch) in enumerate(CASES):
        (r0, s0), (r1, s1) = ranks[0][c], ranks[1][c]
        assert len(s0) == len(s1) == -(-n_eval // (2 * batch))
        assert sum(s0) + sum(s1) >= n_eval
        assert r0 == r1 and r0["users"] == single[c]["users"] == n_eval
        for name in metric_names(RANKING_KS):
            assert r0[name] == pytest.approx(single[c][name], rel=1e-12, abs=1e-15), name
    # 33 users, 2 ranks, batches of 4: rank 0 holds 17 users (4, 4, 4, 4, 1), rank 1 holds 16
    # (4, 4, 4, 4) and scores a one-user stand-in batch at the fifth call.
    assert ranks[0][0][1] == [4, 4, 4, 4, 1] and ranks[1][0][1] == [4, 4, 4, 4, 1]
    assert ranks[0][1][1] == [1] and ranks[1][1][1] == [1]  # one user: rank 1 only scores the stand-in
