"""Mask algorithms of Sparse Sharing and CSRec, as pure functions on tensors.

Everything here works on plain boolean masks (``N x K`` per layer for one task, ``T x N x K`` for
all tasks of a layer) and returns new tensors or plain Python numbers, so the training procedures
can call them on whatever model holds the masks and log the results as JSON. Random choices take
a ``torch.Generator``: the same generator state gives the same masks (on every rank).

- **Iterative magnitude pruning** (CSRec Algorithm 1, steps 11–13): :func:`magnitude_prune`,
  :func:`sparsity`, :func:`rounds_to_sparsity`.
- **Contrastive masks** ``M'_t = M_t XOR R`` (CSRec Sec. 2.2.2 and the three strategies of
  Sec. 3.3.5): :func:`random_reverse`, :func:`shared_random_reverse`,
  :func:`conflicted_random_reverse`, with the candidate sets :func:`shared_weights` and
  :func:`conflicting_weights`.
- **Analyses**: sharing ratio (Sec. 3.3.2, Fig. 5a), conflict ratio (Sec. 3.3.3, Fig. 5b), the
  occupation of each input field's first-layer weights (Sec. 3.3.4, Fig. 6), parameter counts,
  and :func:`plot_masks_analysis` drawing them.

Citations are to CSRec (Bai et al., WWW'22).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import torch

__all__ = [
    "magnitude_prune", "sparsity", "rounds_to_sparsity", "random_reverse", "shared_random_reverse",
    "conflicted_random_reverse", "shared_weights", "conflicting_weights", "sharing_ratio", "conflict_ratio",
    "field_occupation", "subnet_param_counts", "plot_masks_analysis",
]

SHARED = "shared"  # field_occupation's key for the weights every task keeps
UNION = "union"  # subnet_param_counts' key for the weights any task keeps


# ---- iterative magnitude pruning -----------------------------------------------------------------

def magnitude_prune(weight: torch.Tensor, mask: torch.Tensor, rate: float) -> torch.Tensor:
    """One pruning round on one layer: removes the ``rate`` fraction of the surviving weights with
    the lowest magnitude (CSRec Algorithm 1, step 11: "prune α percent of the remaining parameters
    with the lowest magnitudes").

    The count removed is ``floor(rate * surviving + 0.5)`` (rounded half up) of this layer's
    surviving weights. Weights are ranked by ``|w|``; equal magnitudes are broken by position
    (row-major flat index, lower first), so the result is deterministic.

    Args:
        weight (torch.Tensor): ``N x K`` weights (any float dtype; only ``|w|`` is read).
        mask (torch.Tensor): ``N x K`` bool, the weights that survive so far.
        rate (float): pruning rate ``α`` in ``(0, 1)``.

    Returns:
        torch.Tensor: ``N x K`` bool, ``mask`` with the pruned weights cleared (a new tensor).

    Example::

        >>> w = torch.tensor([[0.5, -0.1, 0.3], [-0.2, 0.1, 0.9]])
        >>> magnitude_prune(w, torch.ones(2, 3, dtype=torch.bool), 0.5).int()  # 3 of 6 go
        tensor([[1, 0, 1],
                [0, 0, 1]], dtype=torch.int32)
        >>> magnitude_prune(w, w.abs() > 0.15, 0.25).int()  # 1 of 4 survivors; 0.2 is the smallest
        tensor([[1, 0, 1],
                [0, 0, 1]], dtype=torch.int32)
        >>> magnitude_prune(torch.tensor([[0.3, -0.1, 0.1]]), torch.ones(1, 3, dtype=torch.bool), 0.3).int()  # tie
        tensor([[1, 0, 1]], dtype=torch.int32)
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"pruning rate must be in (0, 1), got {rate}")
    if weight.shape != mask.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and mask {tuple(mask.shape)} differ in shape")
    flat = mask.reshape(-1).bool()
    alive = flat.nonzero().squeeze(1)  # A: flat indices of surviving weights, ascending
    count = math.floor(rate * alive.numel() + 0.5)
    out = flat.clone()
    if count:
        mags = weight.detach().reshape(-1)[alive].abs()  # A
        order = torch.sort(mags, stable=True).indices  # A: smallest first, ties in index order
        out[alive[order[:count]]] = False
    return out.view(mask.shape)


def sparsity(masks: Sequence[torch.Tensor]) -> float:
    """Fraction of pruned weights over all layers: zeros / total, i.e. ``‖M_t‖₀ / |Θ_s|`` of CSRec
    Algorithm 1, step 12, with ``‖M_t‖₀`` counting the zeros (as the paper defines it).

    Args:
        masks (Sequence[torch.Tensor]): one task's bool masks, one per layer (any shapes).

    Example::

        >>> sparsity([torch.tensor([[True, False], [False, False]]), torch.ones(1, 4, dtype=torch.bool)])
        0.375
    """
    total = sum(m.numel() for m in masks)
    if total == 0:
        raise ValueError("sparsity of no weights")
    zeros = sum(int(m.numel() - m.bool().sum()) for m in masks)
    return zeros / total


def rounds_to_sparsity(rate: float, min_sparsity: float) -> int:
    """Pruning rounds until the sparsity exceeds ``min_sparsity`` (CSRec Algorithm 1, step 12:
    pruning continues while ``‖M_t‖₀ / |Θ_s| ≤ ε``).

    Counted with exact fractions: after ``r`` rounds the density is ``(1 - rate)^r``, so this is
    the smallest ``r`` with ``1 - (1 - rate)^r > min_sparsity``. :func:`magnitude_prune` rounds
    the count per layer, so the sparsity actually reached can differ slightly (by at most half a
    weight per layer and round); a procedure should test :func:`sparsity` after each round and use
    this only to plan.

    Args:
        rate (float): pruning rate ``α`` in ``(0, 1)``.
        min_sparsity (float): the floor ``ε`` in ``[0, 1)``.

    Example::

        >>> rounds_to_sparsity(0.1, 0.4)  # the paper's α = 0.1, ε = 0.4: 1 - 0.9**5 ≈ 0.41
        5
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"pruning rate must be in (0, 1), got {rate}")
    if not 0.0 <= min_sparsity < 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1), got {min_sparsity}")
    r, density = 0, 1.0
    while 1.0 - density <= min_sparsity:
        density *= 1.0 - rate
        r += 1
    return r


# ---- contrastive masks ---------------------------------------------------------------------------

def _reverse(mask: torch.Tensor, candidates: torch.Tensor | None, ratio: float,
             generator: torch.Generator | None) -> torch.Tensor:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"reverse ratio must be in [0, 1], got {ratio}")
    if candidates is not None and candidates.shape != mask.shape:
        raise ValueError(f"candidates {tuple(candidates.shape)} and mask {tuple(mask.shape)} differ in shape")
    # One uniform draw per weight whatever the candidates, so a generator state always consumes
    # the same amount of randomness; u < 1 always, so ratio 1 reverses every candidate.
    u = torch.rand(mask.shape, generator=generator, device=mask.device)  # N x K
    flip = u < ratio
    if candidates is not None:
        flip &= candidates.bool()
    return mask.bool() ^ flip


def random_reverse(mask_t: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random reverse (CSRec Sec. 3.3.5): ``M'_t = M_t XOR R``, every weight in ``R`` independently
    with probability ``ratio`` (1 -> 0 and 0 -> 1, Sec. 2.2.2).

    Args:
        mask_t (torch.Tensor): ``N x K`` bool, task ``t``'s mask of one layer.
        ratio (float): reverse probability in ``[0, 1]``.
        generator (torch.Generator | None): randomness (on ``mask_t``'s device).

    Returns:
        torch.Tensor: ``N x K`` bool contrastive mask.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> m = torch.tensor([[True, False, True, False]])
        >>> random_reverse(m, 1.0, g).tolist(), random_reverse(m, 0.0, g).tolist()
        ([[False, True, False, True]], [[True, False, True, False]])
    """
    return _reverse(mask_t, None, ratio, generator)


def shared_random_reverse(mask_t: torch.Tensor, shared: torch.Tensor, ratio: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Shared random reverse (CSRec Sec. 3.3.5): as :func:`random_reverse`, but only the shared
    weights (in the masks of at least two tasks, :func:`shared_weights`) may be reversed.

    Args:
        mask_t (torch.Tensor): ``N x K`` bool, task ``t``'s mask.
        shared (torch.Tensor): ``N x K`` bool, the candidates.
        ratio (float): reverse probability of each candidate in ``[0, 1]``.
        generator (torch.Generator | None): randomness.

    Example::

        >>> m = torch.tensor([[True, True, False]])
        >>> shared_random_reverse(m, torch.tensor([[True, False, False]]), 1.0).tolist()
        [[False, True, False]]
    """
    return _reverse(mask_t, shared, ratio, generator)


def conflicted_random_reverse(mask_t: torch.Tensor, conflict: torch.Tensor, ratio: float,
                              generator: torch.Generator | None = None) -> torch.Tensor:
    """Conflicted random reverse (CSRec Sec. 3.3.5): only weights whose per-task gradients
    disagreed in sign in the latest iteration (:func:`conflicting_weights`) may be reversed.

    Args:
        mask_t (torch.Tensor): ``N x K`` bool, task ``t``'s mask.
        conflict (torch.Tensor): ``N x K`` bool, the candidates.
        ratio (float): reverse probability of each candidate in ``[0, 1]``.
        generator (torch.Generator | None): randomness.

    Example::

        >>> m = torch.tensor([[True, True, False]])
        >>> conflicted_random_reverse(m, torch.tensor([[False, True, True]]), 1.0).tolist()
        [[True, False, True]]
    """
    return _reverse(mask_t, conflict, ratio, generator)


def shared_weights(task_masks: torch.Tensor) -> torch.Tensor:
    """Weights in the masks of at least two tasks.

    Args:
        task_masks (torch.Tensor): ``T x N x K`` bool.

    Returns:
        torch.Tensor: ``N x K`` bool.

    Example::

        >>> shared_weights(torch.tensor([[[1, 1, 0]], [[1, 0, 0]], [[0, 1, 1]]]).bool()).tolist()
        [[True, True, False]]
    """
    return task_masks.bool().sum(0) >= 2  # N x K


def conflicting_weights(task_grads: torch.Tensor, task_masks: torch.Tensor) -> torch.Tensor:
    """Conflict weights (CSRec Sec. 3.3.3): weights in at least two task masks whose per-task
    gradients, among the tasks whose masks keep them, include a positive and a negative value
    (zero gradients take no side).

    Args:
        task_grads (torch.Tensor): ``T x N x K`` gradient of each task's loss w.r.t. the layer's
            weight (entries outside a task's mask are ignored).
        task_masks (torch.Tensor): ``T x N x K`` bool.

    Returns:
        torch.Tensor: ``N x K`` bool.

    Example::

        >>> g = torch.tensor([[[0.5, 0.5, -1.0, 2.0]], [[-0.1, 0.2, 0.0, -3.0]]])
        >>> m = torch.tensor([[[1, 1, 1, 1]], [[1, 1, 1, 0]]]).bool()
        >>> conflicting_weights(g, m).tolist()  # opposite signs / same sign / one zero / like's mask drops it
        [[True, False, False, False]]
    """
    if task_grads.shape != task_masks.shape:
        raise ValueError(f"grads {tuple(task_grads.shape)} and masks {tuple(task_masks.shape)} differ in shape")
    m = task_masks.bool()
    pos = ((task_grads > 0) & m).any(0)  # N x K
    neg = ((task_grads < 0) & m).any(0)  # N x K
    return pos & neg


# ---- analyses ------------------------------------------------------------------------------------

def sharing_ratio(task_masks_per_layer: Sequence[torch.Tensor]) -> float:
    """Sharing ratio SR (CSRec Sec. 3.3.2): weights in at least two task masks divided by all
    weights of the base MLP.

    Args:
        task_masks_per_layer (Sequence[torch.Tensor]): ``T x N x K`` bool per layer.

    Example::

        >>> sharing_ratio([torch.tensor([[[1, 1, 0, 0]], [[1, 0, 1, 0]]]).bool()])
        0.25
    """
    total = sum(m[0].numel() for m in task_masks_per_layer)
    return sum(int(shared_weights(m).sum()) for m in task_masks_per_layer) / total


def conflict_ratio(conflict_per_layer: Sequence[torch.Tensor], task_masks_per_layer: Sequence[torch.Tensor]) -> float:
    """Conflict ratio CR (CSRec Sec. 3.3.3): conflict weights divided by shared weights (0.0 when
    nothing is shared).

    Args:
        conflict_per_layer (Sequence[torch.Tensor]): ``N x K`` bool per layer
            (:func:`conflicting_weights`).
        task_masks_per_layer (Sequence[torch.Tensor]): ``T x N x K`` bool per layer.

    Example::

        >>> masks = [torch.tensor([[[1, 1, 1, 0]], [[1, 1, 0, 0]]]).bool()]
        >>> conflict_ratio([torch.tensor([[True, False, False, False]])], masks)
        0.5
    """
    shared = sum(int(shared_weights(m).sum()) for m in task_masks_per_layer)
    conflicts = sum(int((c.bool() & shared_weights(m)).sum()) for c, m in zip(conflict_per_layer, task_masks_per_layer))
    return conflicts / shared if shared else 0.0


def _task_names(num_tasks: int, tasks: Sequence[str] | None, reserved: str) -> list[str]:
    names = [str(i) for i in range(num_tasks)] if tasks is None else list(tasks)
    if len(names) != num_tasks:
        raise ValueError(f"{len(names)} task names for {num_tasks} masks")
    if reserved in names:
        raise ValueError(f"a task may not be named {reserved!r} here (the key of the all-task entry)")
    return names


def field_occupation(
    first_layer_task_masks: torch.Tensor,
    field_columns: Mapping[str, slice],
    tasks: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Occupation of each input field's first-layer weights (CSRec Sec. 3.3.4, Fig. 6).

    For every task, the fraction of a field's first-layer weights (all rows, the field's input
    columns) in the task's mask; under ``"shared"``, the fraction in every task's mask.

    Args:
        first_layer_task_masks (torch.Tensor): ``T x N x K`` bool, the first masked layer.
        field_columns (Mapping[str, slice]): input columns of each field (a model's
            ``input_field_columns()``).
        tasks (Sequence[str] | None): task names (default ``"0"``, ``"1"``, ...).

    Returns:
        dict[str, dict[str, float]]: ``{task or "shared": {field: fraction}}``.

    Example::

        >>> m = torch.tensor([[[1, 1, 0, 1]], [[1, 0, 0, 1]]]).bool()  # T=2, N=1, K=4
        >>> occ = field_occupation(m, {"user": slice(0, 2), "dense": slice(2, 4)}, ["click", "like"])
        >>> occ["click"], occ["like"], occ["shared"]
        ({'user': 1.0, 'dense': 0.5}, {'user': 0.5, 'dense': 0.5}, {'user': 0.5, 'dense': 0.5})
    """
    m = first_layer_task_masks.bool()
    names = _task_names(m.shape[0], tasks, SHARED)
    every = m.all(0)  # N x K
    out: dict[str, dict[str, float]] = {}
    for k, t in enumerate(names):
        out[t] = {f: _fraction(m[k][:, cols]) for f, cols in field_columns.items()}
    out[SHARED] = {f: _fraction(every[:, cols]) for f, cols in field_columns.items()}
    return out


def _fraction(mask: torch.Tensor) -> float:
    """True entries / all entries, as an exact Python division."""
    if mask.numel() == 0:
        raise ValueError("a field with no columns")
    return int(mask.sum()) / mask.numel()


def subnet_param_counts(
    task_masks_per_layer: Sequence[torch.Tensor], tasks: Sequence[str] | None = None
) -> dict[str, int]:
    """Parameters of each task's subnetwork of a masked MLP, and of their union (``"union"``):
    the weights kept plus every bias (``N`` per layer; biases are never masked).

    Args:
        task_masks_per_layer (Sequence[torch.Tensor]): ``T x N x K`` bool per layer.
        tasks (Sequence[str] | None): task names (default ``"0"``, ``"1"``, ...).

    Example::

        >>> m = [torch.tensor([[[1, 1, 0]], [[0, 1, 0]]]).bool()]  # one 3 -> 1 layer, 1 bias
        >>> subnet_param_counts(m, ["click", "like"])
        {'click': 3, 'like': 2, 'union': 3}
    """
    masks = [m.bool() for m in task_masks_per_layer]
    names = _task_names(masks[0].shape[0], tasks, UNION)
    biases = sum(m.shape[1] for m in masks)
    out = {t: biases + sum(int(m[k].sum()) for m in masks) for k, t in enumerate(names)}
    out[UNION] = biases + sum(int(m.any(0).sum()) for m in masks)
    return out


# ---- plot ----------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_masks_analysis(
    path: str | Path,
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    occupation: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    title: str = "",
) -> Path:
    """PNG of the mask analyses: sharing ratio and conflict ratio over training steps (CSRec
    Fig. 5a–b), and, per model, each field's first-layer occupation by task (Fig. 6).

    Args:
        path (str | Path): PNG to write.
        curves (Mapping[str, Mapping[str, Sequence[float]]]): per model label,
            ``{"step": [...], "sharing_ratio": [...], "conflict_ratio": [...]}`` (a missing
            ``conflict_ratio`` leaves that model out of panel b).
        occupation (Mapping | None): per model label, a :func:`field_occupation` result.
        title (str): figure title.

    Returns:
        Path: ``path``.

    Example::

        >>> import tempfile, os
        >>> curves = {"csrec": {"step": [0, 10], "sharing_ratio": [1.0, 0.6], "conflict_ratio": [0.3, 0.1]}}
        >>> occ = {"csrec": {"click": {"user": 0.7}, "like": {"user": 0.6}, "shared": {"user": 0.4}}}
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = plot_masks_analysis(os.path.join(d, "masks.png"), curves, occ)
        ...     p.read_bytes()[:4]
        b'\\x89PNG'
    """
    plt = _pyplot()
    occupation = dict(occupation or {})
    ncols = 2 + len(occupation)
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.5), squeeze=False)
    ax_sr, ax_cr = axes[0, 0], axes[0, 1]
    for label, c in curves.items():
        steps = list(c["step"])
        ax_sr.plot(steps, list(c["sharing_ratio"]), marker=".", label=label)
        if "conflict_ratio" in c:
            ax_cr.plot(steps, list(c["conflict_ratio"]), marker=".", label=label)
    for ax, name in ((ax_sr, "(a) sharing ratio"), (ax_cr, "(b) conflict ratio")):
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.set_ylim(bottom=0.0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    for j, (label, occ) in enumerate(occupation.items()):
        ax = axes[0, 2 + j]
        groups = list(occ)  # tasks, then "shared"
        fields = list(next(iter(occ.values()))) if occ else []
        width = 0.8 / max(len(groups), 1)
        for k, g in enumerate(groups):
            ax.bar([i + k * width for i in range(len(fields))], [occ[g][f] for f in fields], width, label=g)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(fields))])
        ax.set_xticklabels(fields, rotation=45, ha="right")
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("fraction of first-layer weights")
        ax.set_title(f"field occupation: {label}")
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
