"""Full-ranking metrics by brute force, for checking ``evaluate_pairs`` (shared by the tests)."""

from __future__ import annotations

import math

import numpy as np
import pytest


def brute_force(scores: np.ndarray, held: dict, known: dict, k: int) -> tuple[float, float, float]:
    """Recall, NDCG and hit rate at ``k`` by sorting every user's unknown items (ties: lower id)."""
    rec, ndcg, hit = 0.0, 0.0, 0.0
    for u, items in held.items():
        s = scores[u].astype(np.float64)
        s[list(known.get(u, ()))] = -np.inf
        top = sorted(range(s.size), key=lambda j: (-s[j], j))[:k]
        hits = [j in items for j in top]
        rec += sum(hits) / len(items)
        ndcg += (sum(h / math.log2(r + 2) for r, h in enumerate(hits))
                 / sum(1 / math.log2(r + 2) for r in range(min(len(items), k))))
        hit += any(hits)
    return rec / len(held), ndcg / len(held), hit / len(held)


def assert_matches_brute_force(got: dict, scores: np.ndarray, data, split: str, ks=(5, 20)) -> None:
    """``got`` (``evaluate_pairs(...)["rec"]``) equals the brute-force metrics of ``scores``
    (users x items) on ``split``, train items (and on test the validation items) excluded."""
    held, known = {}, {}
    for u, i in zip(*data.splits[split]):
        held.setdefault(int(u), set()).add(int(i))
    for sp in ["train"] + (["eval"] if split == "test" else []):
        for u, i in zip(*data.splits[sp]):
            known.setdefault(int(u), set()).add(int(i))
    for k in ks:
        r, n, h = brute_force(scores, held, known, k)
        assert got[f"recall@{k}"] == pytest.approx(r, abs=1e-6)
        assert got[f"ndcg@{k}"] == pytest.approx(n, abs=1e-6)
        assert got[f"hit@{k}"] == pytest.approx(h, abs=1e-6)
    assert got["users"] == len(held)
