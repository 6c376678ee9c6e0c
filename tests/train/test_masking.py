"""Mask algorithms of Sparse Sharing / CSRec: pruning, contrastive masks, analyses and the plot."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import recsys_mtl.modules.masking
from recsys_mtl.config import ModelConfig
from recsys_mtl.models import build_model
from recsys_mtl.modules.masking import (
    conflict_ratio,
    conflicted_random_reverse,
    conflicting_weights,
    field_occupation,
    magnitude_prune,
    plot_masks_analysis,
    random_reverse,
    rounds_to_sparsity,
    shared_random_reverse,
    shared_weights,
    sharing_ratio,
    sparsity,
    subnet_param_counts,
)
from recsys_mtl.testing import tiny_schema


def test_doctests() -> None:
    result = doctest.testmod(recsys_mtl.modules.masking, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---- pruning -------------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 0.9])
def test_magnitude_prune_removes_the_right_count_of_the_smallest(rate: float) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(17, 23, generator=g)
    mask = torch.rand(17, 23, generator=g) < 0.7
    out = magnitude_prune(w, mask, rate)
    assert out.dtype == torch.bool and out.shape == mask.shape
    assert not bool((out & ~mask).any())  # never revives a pruned weight
    removed = mask & ~out
    assert int(removed.sum()) == math.floor(rate * int(mask.sum()) + 0.5)
    assert float(w[removed].abs().max()) <= float(w[out].abs().min())
    assert torch.equal(magnitude_prune(w, mask, rate), out)  # deterministic
    assert torch.equal(mask, mask.clone())  # input untouched (a new tensor comes back)


def test_magnitude_prune_breaks_ties_by_position() -> None:
    w = torch.tensor([[1.0, -1.0, 1.0], [1.0, 2.0, -1.0]])
    out = magnitude_prune(w, torch.ones(2, 3, dtype=torch.bool), 0.5)  # 3 of five |w| = 1 go: the first three
    assert out.tolist() == [[False, False, False], [True, True, True]]
    with pytest.raises(ValueError, match="rate"):
        magnitude_prune(w, torch.ones(2, 3, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="shape"):
        magnitude_prune(w, torch.ones(3, 2, dtype=torch.bool), 0.5)


def test_sparsity_and_rounds_to_sparsity() -> None:
    assert sparsity([torch.zeros(2, 2, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)]) == 0.4
    assert sparsity([torch.ones(3, 3, dtype=torch.bool)]) == 0.0
    assert rounds_to_sparsity(0.1, 0.4) == 5  # 1 - 0.9**4 = 0.344 <= 0.4 < 0.410
    assert rounds_to_sparsity(0.5, 0.5) == 2  # the paper continues while sparsity <= ε
    assert rounds_to_sparsity(0.5, 0.0) == 1
    # iterative pruning of a large layer reaches the planned sparsity in the planned rounds
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 150, generator=g)
    mask = torch.ones_like(w, dtype=torch.bool)
    rounds = rounds_to_sparsity(0.2, 0.6)
    for r in range(rounds):
        assert sparsity([mask]) <= 0.6
        mask = magnitude_prune(w, mask, 0.2)
    assert sparsity([mask]) > 0.6
    assert abs(sparsity([mask]) - (1 - 0.8**rounds)) < 1e-3
    with pytest.raises(ValueError):
        rounds_to_sparsity(0.1, 1.0)


# ---- contrastive masks ---------------------------------------------------------------------------

def _masks(seed: int = 0, t: int = 3, shape=(12, 20)) -> torch.Tensor:
    return torch.rand(t, *shape, generator=torch.Generator().manual_seed(seed)) < 0.5


@pytest.mark.parametrize("strategy", ["random", "shared", "conflicted"])
def test_contrastive_strategies_reverse_only_their_candidates(strategy: str) -> None:
    masks = _masks()
    m = masks[0]
    grads = torch.randn(masks.shape, generator=torch.Generator().manual_seed(1))
    candidates = {
        "random": torch.ones_like(m),
        "shared": shared_weights(masks),
        "conflicted": conflicting_weights(grads, masks),
    }[strategy]
    assert 0 < int(candidates.sum()) < candidates.numel() or strategy == "random"

    def reverse(ratio: float, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + seed)  # a stream unrelated to the masks' draws
        if strategy == "random":
            return random_reverse(m, ratio, g)
        if strategy == "shared":
            return shared_random_reverse(m, candidates, ratio, g)
        return conflicted_random_reverse(m, candidates, ratio, g)

    assert torch.equal(reverse(1.0, 0), m ^ candidates)  # ratio 1: exactly every candidate
    assert torch.equal(reverse(0.0, 0), m)  # ratio 0: none
    half = reverse(0.5, 0)
    flipped = half ^ m
    assert not bool((flipped & ~candidates).any())  # only candidates
    assert 0.3 < float(flipped.sum()) / float(candidates.sum()) < 0.7
    assert torch.equal(reverse(0.5, 0), half) and not torch.equal(reverse(0.5, 1), half)  # generator-determined
    with pytest.raises(ValueError, match="ratio"):
        reverse(1.5, 0)


def test_shared_weights() -> None:
    masks = torch.tensor([[[1, 1, 0, 0, 1]], [[1, 0, 1, 0, 1]], [[0, 0, 1, 0, 1]]]).bool()
    assert shared_weights(masks).tolist() == [[True, False, True, False, True]]


def test_conflict_detection_on_a_gradient_pair() -> None:
    grads = torch.tensor([
        [[0.3, -0.2, 0.5, 0.0, 1.0, -1.0]],
        [[-0.1, -0.4, 0.2, -0.3, -2.0, 1.0]],
    ])
    masks = torch.tensor([[[1, 1, 1, 1, 1, 0]], [[1, 1, 1, 1, 0, 1]]]).bool()
    # opposite / same sign / same sign / one zero gradient / task 1 drops it / task 0 drops it
    assert conflicting_weights(grads, masks).tolist() == [[True, False, False, False, False, False]]
    # with three tasks, one dissenting task among the keepers is a conflict
    g3 = torch.tensor([[[1.0, 1.0]], [[2.0, 1.0]], [[-0.5, -1.0]]])
    m3 = torch.tensor([[[1, 1]], [[1, 1]], [[1, 0]]]).bool()
    assert conflicting_weights(g3, m3).tolist() == [[True, False]]


def test_conflicts_from_real_task_gradients() -> None:
    """Per-task gradients of a small masked model: conflict weights are where the two tasks'
    weight gradients have opposite signs, within both masks."""
    torch.manual_seed(0)
    from recsys_mtl.testing import tiny_batch

    schema = tiny_schema()
    model = build_model(schema, ModelConfig(name="sparse_sharing", embedding_dim=4, bottom_layer_sizes=(8,),
                                            tower_layer_sizes=(4,)))
    block = model.bottom
    block.set_masks(0, torch.rand(block.get_masks(0).shape) < 0.7)
    b = tiny_batch(schema, 32)
    grads = []
    for k, t in enumerate(model.tasks):
        model.zero_grad(set_to_none=True)
        logits = model(b.dense, b.sparse)[t]
        torch.nn.functional.binary_cross_entropy_with_logits(logits, b.labels[:, k]).backward()
        grads.append(block.weights()[0].grad.clone())
    g, masks = torch.stack(grads), block.get_masks(0)
    conflict = conflicting_weights(g, masks)
    expected = masks.all(0) & (g[0] * g[1] < 0)
    assert torch.equal(conflict, expected) and int(conflict.sum()) > 0
    cr = conflict_ratio([conflict], [masks])
    assert cr == int(expected.sum()) / int(masks.all(0).sum())


# ---- analyses ------------------------------------------------------------------------------------

def test_sharing_and_conflict_ratios() -> None:
    l0 = torch.tensor([[[1, 1, 0, 0], [1, 1, 1, 1]], [[1, 0, 1, 0], [1, 1, 0, 0]]]).bool()  # T=2, 2 x 4
    l1 = torch.tensor([[[1, 0]], [[0, 1]]]).bool()  # 1 x 2, nothing shared
    # shared: layer 0 has 1 + 2 = 3 of 8, layer 1 none of 2
    assert sharing_ratio([l0, l1]) == pytest.approx(3 / 10)
    c0 = torch.tensor([[True, False, True, False], [True, False, False, False]])  # (0,2) is not shared: ignored
    c1 = torch.tensor([[True, True]])  # not shared: ignored
    assert conflict_ratio([c0, c1], [l0, l1]) == pytest.approx(2 / 3)
    assert conflict_ratio([c1], [l1]) == 0.0  # nothing shared
    assert sharing_ratio([torch.ones(3, 4, 5, dtype=torch.bool)]) == 1.0


def test_field_occupation_on_a_hand_made_first_layer() -> None:
    # T=2 tasks, N=2 rows, K=5 columns: field a = cols 0-1, field b = cols 2-4
    m = torch.tensor([
        [[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]],
        [[0, 1, 1, 1, 0], [1, 0, 0, 0, 1]],
    ]).bool()
    occ = field_occupation(m, {"a": slice(0, 2), "b": slice(2, 5)}, ["click", "like"])
    assert occ == {
        "click": {"a": 3 / 4, "b": 4 / 6},
        "like": {"a": 2 / 4, "b": 3 / 6},
        "shared": {"a": 2 / 4, "b": 2 / 6},
    }
    assert all(isinstance(v, float) for d in occ.values() for v in d.values())  # JSON-friendly
    assert list(field_occupation(m, {"a": slice(0, 2)})) == ["0", "1", "shared"]
    with pytest.raises(ValueError, match="shared"):
        field_occupation(m, {"a": slice(0, 2)}, ["shared", "like"])


def test_field_occupation_with_a_models_columns() -> None:
    schema = tiny_schema()
    model = build_model(schema, ModelConfig(name="csrec", embedding_dim=4, bottom_layer_sizes=(8,),
                                            tower_layer_sizes=(4,)))
    block = model.masked_layers()[0]
    masks = block.get_masks(0)
    cols = model.input_field_columns()
    masks[0][:, cols["user_id"]] = False  # click drops user_id's first-layer weights
    block.set_masks(0, masks)
    occ = field_occupation(block.get_masks(0)[: model.num_tasks], cols, model.tasks)
    assert occ["click"]["user_id"] == 0.0 and occ["like"]["user_id"] == 1.0 and occ["shared"]["user_id"] == 0.0
    assert occ["click"]["dense"] == 1.0 and set(occ["like"]) == set(cols)


def test_subnet_param_counts_against_the_module() -> None:
    l0 = torch.tensor([[[1, 1, 0], [0, 0, 0]], [[0, 1, 1], [1, 0, 0]]]).bool()  # 2 x 3, 2 biases
    l1 = torch.tensor([[[1, 0]], [[1, 1]]]).bool()  # 1 x 2, 1 bias
    # weights kept (layer 0 + layer 1) + 3 biases; the union keeps 4 + 2 weights
    assert subnet_param_counts([l0, l1], ["click", "like"]) == {"click": 2 + 1 + 3, "like": 3 + 2 + 3, "union": 6 + 3}
    from recsys_mtl.modules.masked_mlp import MaskedMLP

    block = MaskedMLP(3, [2, 1], num_subnets=2)
    block.set_masks(0, l0)
    block.set_masks(1, l1)
    counts = subnet_param_counts([block.get_masks(0), block.get_masks(1)], ["click", "like"])
    assert [counts["click"], counts["like"]] == block.subnet_param_counts()


# ---- plot ----------------------------------------------------------------------------------------

def test_plot_masks_analysis_writes_a_png(tmp_path) -> None:
    curves = {
        "sparse_sharing": {"step": [0, 100, 200], "sharing_ratio": [1.0, 0.5, 0.4], "conflict_ratio": [0.3, 0.3, 0.2]},
        "csrec": {"step": [0, 100, 200], "sharing_ratio": [1.0, 0.6, 0.55], "conflict_ratio": [0.3, 0.1, 0.05]},
    }
    m = _masks(t=2, shape=(6, 10))
    occ = {name: field_occupation(m, {"user": slice(0, 4), "item": slice(4, 8), "dense": slice(8, 10)},
                                  ["click", "like"]) for name in curves}
    png = plot_masks_analysis(tmp_path / "masks.png", curves, occ, title="masks")
    assert png == tmp_path / "masks.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    only_curves = plot_masks_analysis(tmp_path / "sr.png", {"csrec": {"step": [0, 1], "sharing_ratio": [1.0, 0.9]}})
    assert only_curves.read_bytes()[:4] == b"\x89PNG"
