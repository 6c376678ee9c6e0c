"""Reference per-row gradient pooling across tasks (PMTRec, Alg. 1 lines 8–12, Eq. 4–5), and the
input checks that the op shares with it.

Per unique embedding row ``r`` of a batch and task ``t``: the segment sum of the task's gradients at
the row's lookup positions ``S_t(r)``, its norm ``n_t(r) = ‖S_t(r)‖₂`` scaled by the task's focus
factor, a softmax over tasks with temperature ``τ``, and the per-position gradient
``out[p] = Σ_t w_t(rows[p]) grads[t, p]``. See :func:`recsys_mtl.ops.row_grad_pool.row_grad_pool`.
"""

from __future__ import annotations

import math

import torch

__all__ = ["row_grad_pool_reference", "check_row_grad_pool_args", "check_row_grad_pool_values"]


def check_row_grad_pool_args(
    grads: torch.Tensor,
    rows: torch.Tensor,
    num_rows: int,
    focus: torch.Tensor,
    tau: float,
    task_mask: torch.Tensor | None,
    norms: torch.Tensor | None,
) -> None:
    """Shape, dtype and device checks (no tensor values read, so it also runs on fake tensors).

    Raises:
        ValueError: naming the argument that is wrong.
    """
    if grads.dim() != 3 or not grads.is_floating_point():
        raise ValueError(f"grads must be a floating T x N x D tensor, got {grads.dtype} {tuple(grads.shape)}")
    t, n, _ = grads.shape
    if t < 1:
        raise ValueError(f"grads must hold at least one task (T >= 1), got T = {t}")
    if rows.dim() != 1 or rows.dtype != torch.int64 or rows.shape[0] != n:
        raise ValueError(f"rows must be a 1-D int64 tensor of length N = {n}, got {rows.dtype} {tuple(rows.shape)}")
    if num_rows < 0 or (num_rows == 0 and n > 0):
        raise ValueError(f"num_rows must be >= 0 and > 0 when there are positions (N = {n}), got {num_rows}")
    if focus.dim() != 1 or focus.shape[0] != t or not focus.is_floating_point():
        raise ValueError(f"focus must be a floating tensor of shape ({t},), got {focus.dtype} {tuple(focus.shape)}")
    if not tau > 0:  # also rejects NaN
        raise ValueError(f"tau must be > 0, got {tau}")
    if task_mask is not None and (task_mask.dtype != torch.bool or tuple(task_mask.shape) != (t,)):
        raise ValueError(f"task_mask must be a bool tensor of shape ({t},), got {task_mask.dtype} "
                         f"{tuple(task_mask.shape)}")
    if norms is not None and (tuple(norms.shape) != (num_rows, t) or not norms.is_floating_point()):
        raise ValueError(f"norms must be a floating {num_rows} x {t} (U x T) tensor, got {norms.dtype} "
                         f"{tuple(norms.shape)}")
    devices = {x.device for x in (grads, rows, focus, task_mask, norms) if x is not None}
    if len(devices) > 1:
        raise ValueError(f"grads, rows, focus, task_mask and norms must be on one device, got "
                         f"{sorted(map(str, devices))}")


def check_row_grad_pool_values(
    rows: torch.Tensor, num_rows: int, task_mask: torch.Tensor | None, check_rows: bool
) -> None:
    """Checks that read tensor values (one host sync each on a GPU): at least one task unmasked and,
    with ``check_rows``, every row index in ``[0, num_rows)``.

    Raises:
        ValueError: all tasks masked, or a row index out of range.
    """
    if task_mask is not None and not bool(task_mask.any()):
        raise ValueError("task_mask masks every task: at least one task must be unmasked")
    if check_rows and rows.numel() > 0:
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= num_rows:
            raise ValueError(f"rows must lie in [0, num_rows) = [0, {num_rows}), got values in [{lo}, {hi}]")


def row_grad_pool_reference(
    grads: torch.Tensor,
    rows: torch.Tensor,
    num_rows: int,
    focus: torch.Tensor,
    tau: float,
    task_mask: torch.Tensor | None = None,
    norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row gradient pooling, step by step (one task at a time; always checks the row range).

    Computes in ``grads``' dtype promoted to at least float32 (pass float64 inputs for a ground
    truth).

    Args:
        grads (Tensor): ``T x N x D``, task ``t``'s gradient at lookup position ``p``.
        rows (Tensor): ``N`` int64, the unique-row index of each position, in ``[0, num_rows)``.
        num_rows (int): ``U``, the number of unique rows.
        focus (Tensor): ``T``, the factor on each task's row norm.
        tau (float): softmax temperature, > 0.
        task_mask (Tensor | None): ``T`` bool; False excludes a task (weight 0).
        norms (Tensor | None): ``U x T`` row norms to use instead of computing them.

    Returns:
        tuple[Tensor, Tensor]: ``out`` (``N x D``) and ``weights`` (``U x T``), in ``grads``' dtype.
    """
    check_row_grad_pool_args(grads, rows, num_rows, focus, tau, task_mask, norms)
    check_row_grad_pool_values(rows, num_rows, task_mask, check_rows=True)
    t, n, d = grads.shape
    acc = torch.promote_types(grads.dtype, torch.float32)
    g = grads.to(acc)  # T x N x D
    keep = torch.ones(t, dtype=torch.bool, device=grads.device) if task_mask is None else task_mask  # T

    # Steps 1–2: per-task segment sums over each row's positions and their L2 norms.
    if norms is None:
        row_norms = torch.zeros(num_rows, t, dtype=acc, device=grads.device)  # U x T
        for i in range(t):
            seg = torch.zeros(num_rows, d, dtype=acc, device=grads.device).index_add_(0, rows, g[i])  # U x D
            row_norms[:, i] = seg.norm(dim=1)  # U
    else:
        row_norms = norms.to(acc)  # U x T

    # Step 3: task focusing.
    logits = row_norms * focus.to(acc)  # U x T

    # Step 4: softmax over the unmasked tasks with temperature tau, max subtracted first.
    logits = logits.masked_fill(~keep, -math.inf)  # U x T
    shifted = (logits - logits.amax(dim=1, keepdim=True)) / max(tau, torch.finfo(acc).tiny)  # U x T, <= 0
    e = shifted.exp()  # U x T, 0 at masked tasks
    weights = e / e.sum(dim=1, keepdim=True)  # U x T

    # Step 5: each position's gradient, the row's weights applied to its per-task gradients.
    out = torch.einsum("nt,tnd->nd", weights[rows], g)  # N x D
    return out.to(grads.dtype), weights.to(grads.dtype)
