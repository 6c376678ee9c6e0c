"""Offline analyses of multi-task results: gAUC, MTL gain, STEM's subset analysis, expert
utilisation, and their plots.

These work on eval predictions gathered in memory (numpy), after training. gAUC is written here
rather than taken from ``torchrec.metrics.gauc``: TorchRec's GAUC expects fixed-size groups
(``n_group x n_sample`` tensors), while recommendation gAUC groups by user with variable group
sizes, weighted by group size (STEM-Net's definition; docs/design.md §2.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum statistic, ties averaged; NaN when only one class is present.

    Example::

        >>> auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
        0.75
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each tie block
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gauc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Group AUC: per-group AUC averaged with weights = group size, skipping groups whose
    labels are all positive or all negative.

    Example::

        >>> gauc(np.array([.1, .9, .2, .8, .5]), np.array([0, 1, 1, 0, 1]), np.array([1, 1, 2, 2, 3]))
        0.5
    """
    scores, labels, groups = np.asarray(scores), np.asarray(labels).astype(bool), np.asarray(groups)
    order = np.argsort(groups, kind="mergesort")
    g_sorted = groups[order]
    cuts = np.flatnonzero(np.diff(g_sorted)) + 1
    total, weight = 0.0, 0
    for idx in np.split(order, cuts):
        pos = int(labels[idx].sum())
        if pos == 0 or pos == len(idx):
            continue
        total += len(idx) * auc(scores[idx], labels[idx])
        weight += len(idx)
    return total / weight if weight else float("nan")


def mtl_gain(mtl: float, single: float, higher_is_better: bool = True) -> float:
    """PLE Eq. 11: the MTL model's improvement over the single-task model on one metric.

    Example::

        >>> round(mtl_gain(0.75, 0.74), 4), round(mtl_gain(0.20, 0.25, higher_is_better=False), 4)
        (0.01, 0.05)
    """
    return mtl - single if higher_is_better else single - mtl


# ---- STEM-Net's subset analysis --------------------------------------------------------------

@dataclass(frozen=True)
class SubsetSpec:
    """Bucket-difference ranges of STEM-Net's subset analysis (difference = bucket_a - bucket_b,
    buckets 0..num_buckets-1 of equal frequency). Defaults split the range [-9, 9] into
    B-overwhelming [-9, -3], comparable [-2, 2] and A-overwhelming [3, 9]."""

    num_buckets: int = 10
    comparable: int = 2  # |difference| <= comparable


def equal_frequency_buckets(p: np.ndarray, num_buckets: int = 10) -> np.ndarray:
    """Bucket index 0..num_buckets-1 by rank, equal sample counts per bucket (ties by order)."""
    ranks = np.argsort(np.argsort(p, kind="mergesort"), kind="mergesort")
    return (ranks * num_buckets // max(len(p), 1)).astype(np.int64)


def subset_analysis(
    single_a: np.ndarray,
    single_b: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    labels: np.ndarray,
    spec: SubsetSpec = SubsetSpec(),
) -> dict[str, dict[str, float]]:
    """STEM-Net §"negative transfer": AUC of each model on the subsets defined by the single-task
    models' relative feedback for tasks A and B.

    Args:
        single_a (np.ndarray): single-task predicted probabilities for task A (``N``).
        single_b (np.ndarray): single-task predicted probabilities for task B (``N``).
        predictions (Mapping[str, np.ndarray]): model name -> predictions for the evaluated task.
        labels (np.ndarray): labels of the evaluated task (``N``).
        spec (SubsetSpec): bucket count and the comparable range.

    Returns:
        ``{subset: {"size": n, model: auc, ...}}`` for subsets ``a_overwhelming``, ``comparable``,
        ``b_overwhelming``.
    """
    diff = equal_frequency_buckets(single_a, spec.num_buckets) - equal_frequency_buckets(single_b, spec.num_buckets)
    masks = {
        "a_overwhelming": diff > spec.comparable,
        "comparable": np.abs(diff) <= spec.comparable,
        "b_overwhelming": diff < -spec.comparable,
    }
    out: dict[str, dict[str, float]] = {}
    for name, m in masks.items():
        row: dict[str, float] = {"size": float(m.sum())}
        for model, p in predictions.items():
            row[model] = auc(p[m], labels[m]) if m.any() else float("nan")
        out[name] = row
    return out


# ---- expert utilisation (PLE Fig. 8) ---------------------------------------------------------

class GateRecorder:
    """Context manager capturing the per-task mixture weights of a model's gates with forward hooks.

    Recognises the ``Gates`` modules of MMoE/CGC/PLE (one gate per task; the last such module, i.e.
    the last level, is recorded) and STEM-Net's per-task gate MLPs. Works on a plain model, its
    train wrapper or a ``DistributedModelParallel`` (dense modules run locally on every rank).
    ``supported`` is False for models without per-task gates; then nothing is recorded.

    Example::

        >>> from recsys_mtl.config import ModelConfig
        >>> from recsys_mtl.models import build_model
        >>> from recsys_mtl.testing import tiny_batch, tiny_schema
        >>> s = tiny_schema()
        >>> m = build_model(s, ModelConfig(name="mmoe", embedding_dim=4, num_experts=3))
        >>> b = tiny_batch(s, 5)
        >>> with GateRecorder(m, s.task_names) as rec:
        ...     _ = m(b.dense, b.sparse)
        >>> rec.batches[0]["click"].shape
        (5, 3)
    """

    def __init__(self, model: nn.Module, task_names: Sequence[str]) -> None:
        from recsys_mtl.models.stem import STEMNet
        from recsys_mtl.modules.gates import Gates

        self.task_names = list(task_names)
        self.batches: list[dict[str, np.ndarray]] = []
        self._targets: list[tuple[nn.Module, object]] = []
        inner = model
        for attr in ("module", "model"):  # DMP -> train wrapper -> model
            while hasattr(inner, attr) and isinstance(getattr(inner, attr), nn.Module):
                inner = getattr(inner, attr)
        if isinstance(inner, STEMNet):
            self._targets = [(inner.gates[t], ("stem", t)) for t in self.task_names]
        else:
            gates = [m for m in inner.modules() if isinstance(m, Gates) and m.num_gates == len(self.task_names)]
            self._targets = [(gates[-1], ("gates", None))] if gates else []
        self.supported = bool(self._targets)
        self._hooks: list = []

    def _hook(self, key):
        kind, task = key

        def fn(_module, _inputs, out):
            if kind == "stem":
                if not self.batches or task in self.batches[-1]:
                    self.batches.append({})
                self.batches[-1][task] = torch.softmax(out.detach(), -1).cpu().numpy()  # B x E
            else:  # G x B x E
                self.batches.append({t: out[k].detach().cpu().numpy() for k, t in enumerate(self.task_names)})

        return fn

    def __enter__(self) -> "GateRecorder":
        self._hooks = [m.register_forward_hook(self._hook(key)) for m, key in self._targets]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def weights(self) -> dict[str, np.ndarray]:
        """``{task: N x E}`` over every recorded batch."""
        return {t: np.concatenate([b[t] for b in self.batches]) for t in self.task_names if self.batches}


@torch.no_grad()
def gate_weights(model: nn.Module, batches: Iterable, task_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Mixture weights of every per-task gate for every sample of ``batches`` (``{task: N x E}``)."""
    rec = GateRecorder(model, task_names)
    if not rec.supported:
        raise ValueError(f"{type(model).__name__} has no per-task gates to analyse")
    was_training = model.training
    model.eval()
    with rec:
        for batch in batches:
            model(batch)
    model.train(was_training)
    return rec.weights()


def expert_utilisation(weights: Mapping[str, np.ndarray]) -> dict[str, dict[str, list[float]]]:
    """Mean and standard deviation of each expert's gate weight, per task (PLE Fig. 8)."""
    return {t: {"mean": w.mean(0).tolist(), "std": w.std(0).tolist()} for t, w in weights.items()}


# ---- plots -----------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_expert_utilisation(util: Mapping[str, Mapping[str, list[float]]], path: str | Path, title: str = "") -> Path:
    """Bar chart of gate weight mean ± std per expert, one group of bars per task."""
    plt = _pyplot()
    tasks = list(util)
    n = len(next(iter(util.values()))["mean"])
    fig, ax = plt.subplots(figsize=(max(6, n * 0.6 * len(tasks)), 3.5))
    width = 0.8 / len(tasks)
    for k, t in enumerate(tasks):
        x = np.arange(n) + k * width
        ax.bar(x, util[t]["mean"], width, yerr=util[t]["std"], label=t, capsize=2)
    ax.set_xticks(np.arange(n) + 0.4 - width / 2)
    ax.set_xticklabels([f"e{i}" for i in range(n)])
    ax.set_ylabel("gate weight")
    ax.set_title(title or "expert utilisation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_subsets(result: Mapping[str, Mapping[str, float]], path: str | Path, title: str = "") -> Path:
    """Per-subset AUC of each model (STEM-Net Fig. 1 style)."""
    plt = _pyplot()
    subsets = list(result)
    models = [k for k in next(iter(result.values())) if k != "size"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(models), 1)
    for k, m in enumerate(models):
        ax.bar(np.arange(len(subsets)) + k * width, [result[s][m] for s in subsets], width, label=m)
    ax.set_xticks(np.arange(len(subsets)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{s}\n(n={int(result[s]['size'])})" for s in subsets])
    ax.set_ylabel("AUC")
    lo = min(v for s in subsets for m, v in result[s].items() if m != "size" and np.isfinite(v))
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_title(title or "subset analysis")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
