"""Per-row gradient pooling across tasks (PMTRec, Alg. 1 lines 8–12), as one op:
``recsys_mtl::row_grad_pool``.

In a multi-task recommender every task's loss sends a gradient to the embedding rows a batch looks
up. PMTRec combines those gradients per row instead of per batch: for each unique row ``r`` and
task ``t`` (``T`` tasks, ``U`` unique rows, ``N`` lookup positions, ``D`` embedding dim)::

    1. S_t(r) = Σ_{p : rows[p] = r} grads[t, p]               T x U x D  (segment sum per row)
    2. n_t(r) = ‖S_t(r)‖₂                                      U x T      (row norm)
    3. m_t(r) = n_t(r) · focus[t]                              U x T      (task focusing: α^epoch)
    4. w(r)   = softmax_t(m(r) / τ)   over the unmasked tasks  U x T      (magnitude balancing)
    5. out[p] = Σ_t w_t(rows[p]) grads[t, p]                   N x D

Steps 1–5 are the paper's Alg. 1 lines 8–12 with its Eq. 4–5.

Summing ``out`` over a row's positions gives the row's combined gradient ``Σ_t w_t(r) S_t(r)``, so
handing ``out`` to the embedding backward in place of the per-position gradient applies the pooled
gradient with one ordinary (fused) update. The softmax subtracts the row's largest logit before
dividing by ``τ`` (the log-sum-exp trick), so a large ``α^epoch`` with a tiny ``τ`` (1e-6) gives a
one-hot weight, never ``inf`` or ``NaN``.

Implementations, chosen per call:

* CUDA tensors: the Triton kernel of :mod:`recsys_mtl.ops.triton.row_grad_pool`. The positions
  are sorted by row once (``torch.sort``; CSR offsets by ``searchsorted``, no host sync), and one
  program per row sums its segment for all tasks, takes the norms and the softmax and writes
  ``out`` for the row's positions (a second read of the segment) and ``weights[r]``: no
  ``T x U x D`` tensor in global memory.
* Other devices (CPU): PyTorch, vectorised over rows and positions, one task at a time: an
  ``index_add_`` of the task's ``N x D`` gradients into one reused ``U x D`` buffer and its row
  norms, the masked softmax on ``U x T``, then ``out`` accumulated task by task (``addcmul_``) with
  the gathered ``N x T`` weights. Masked tasks are skipped. Scratch: one ``U x D`` buffer.
* The environment variable ``RECSYS_MTL_ROW_GRAD_POOL_IMPL`` (``triton`` or ``torch``) overrides
  the choice (``triton`` on CPU needs ``TRITON_INTERPRET=1`` before Triton is first imported).

The op is **not differentiable**: its inputs are gradients already, and it has no autograd formula
(a backward through it raises). It has a fake (meta) kernel, so it works under ``torch.compile``
(``fullgraph=True``; one opaque node) and ``torch.library.opcheck``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.library import custom_op

from recsys_mtl.ops._impl import ImplChoice
from recsys_mtl.ops.pytorch.row_grad_pool import (
    check_row_grad_pool_args,
    check_row_grad_pool_values,
    row_grad_pool_reference,
)

__all__ = ["row_grad_pool", "row_grad_pool_reference", "IMPL_ENV"]

IMPL_ENV = "RECSYS_MTL_ROW_GRAD_POOL_IMPL"



def row_grad_pool(
    grads: torch.Tensor,
    rows: torch.Tensor,
    num_rows: int,
    focus: torch.Tensor,
    tau: float,
    task_mask: torch.Tensor | None = None,
    norms: torch.Tensor | None = None,
    *,
    check: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combines per-task gradients per unique row by a softmax over the tasks' focused row norms.

    PMTRec, Alg. 1 lines 8–12 and Eq. 4–5: per row ``r``,
    ``n_t(r) = ‖Σ_{p : rows[p] = r} grads[t, p]‖₂``, ``w(r) = softmax_t(n_t(r) focus[t] / τ)`` over
    the unmasked tasks, and per position ``out[p] = Σ_t w_t(rows[p]) grads[t, p]``. Not
    differentiable (the inputs are gradients).

    A row with no position has all-zero norms, so its weights are uniform over the unmasked tasks
    (unless ``norms`` says otherwise). A masked task gets weight exactly 0 and is left out of the
    softmax's denominator. Accumulates in float32 (float64 for float64 inputs). ``tau`` below the
    smallest normal number of that dtype is raised to it (the weights are one-hot there anyway).

    Args:
        grads (Tensor): ``T x N x D``, task ``t``'s gradient at lookup position ``p`` (one id
            occurrence in the batch).
        rows (Tensor): ``N`` int64, each position's unique-row index in ``[0, num_rows)``; repeats
            are expected (the same id in many samples).
        num_rows (int): ``U``, the number of unique rows.
        focus (Tensor): ``T``, the factor on each task's row norm (task focusing: ``α^epoch`` on
            the main task, 1 on the others).
        tau (float): softmax temperature, > 0.
        task_mask (Tensor | None): ``T`` bool; False excludes a task. At least one must be True
            (checked: one host sync of ``T`` values on a GPU).
        norms (Tensor | None): ``U x T`` row norms (e.g. reduced over the global batch across
            ranks); when given, the segment sums and norms are skipped and these are used.
        check (bool): also check that every ``rows`` value lies in ``[0, num_rows)`` (a host
            sync). Without it an out-of-range row is an error on CPU and leaves its ``out`` entries
            undefined on the GPU.

    Returns:
        tuple[Tensor, Tensor]: ``out`` (``N x D``), the gradient to hand back per position, and
        ``weights`` (``U x T``), both in ``grads``' dtype.

    Raises:
        ValueError: wrong shapes, dtypes or devices, ``tau <= 0``, every task masked, or (with
            ``check``) a row index out of range.

    Example::

        >>> grads = torch.tensor([[[1., 0.], [1., 0.], [0., 0.]],   # task 0
        ...                       [[0., 0.], [0., 0.], [0., 3.]]])  # task 1
        >>> rows = torch.tensor([0, 0, 1])  # positions 0 and 1 look up row 0, position 2 row 1
        >>> out, w = row_grad_pool(grads, rows, 2, focus=torch.ones(2), tau=1.0)
        >>> w  # row 0: softmax(2, 0); row 1: softmax(0, 3)
        tensor([[0.8808, 0.1192],
                [0.0474, 0.9526]])
        >>> out
        tensor([[0.8808, 0.0000],
                [0.8808, 0.0000],
                [0.0000, 2.8577]])
        >>> row_grad_pool(grads, rows, 2, torch.ones(2), 1.0, task_mask=torch.tensor([True, False]))[1]
        tensor([[1., 0.],
                [1., 0.]])
    """
    return torch.ops.recsys_mtl.row_grad_pool(grads, rows, num_rows, focus, tau, task_mask, norms, check)


_IMPL = ImplChoice(IMPL_ENV)
_force_impl = _IMPL.force  # with _force_impl("triton"): ... (tests, benchmarks)
_use_triton = _IMPL.use_triton


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _min_tau(tau: float, acc: torch.dtype) -> float:
    """``tau``, raised to the smallest normal number of ``acc`` (a smaller one would round to 0)."""
    return max(tau, torch.finfo(acc).tiny)


# ---- PyTorch path (CPU and any non-CUDA device) ----------------------------------------------


def _masked_softmax(logits: torch.Tensor, tau: float, task_mask: torch.Tensor | None) -> torch.Tensor:
    """``U x T`` softmax over the tasks of ``logits / tau``, masked tasks exactly 0, max subtracted
    before the division (so neither a large logit nor a tiny ``tau`` overflows)."""
    if task_mask is not None:
        logits = logits.masked_fill(~task_mask, float("-inf"))  # U x T
    e = logits.sub_(logits.amax(dim=1, keepdim=True)).div_(tau).exp_()  # U x T, in (0, 1], 0 when masked
    return e.div_(e.sum(dim=1, keepdim=True))  # U x T


def _row_grad_pool_torch(
    grads: torch.Tensor,
    rows: torch.Tensor,
    num_rows: int,
    focus: torch.Tensor,
    tau: float,
    task_mask: torch.Tensor | None,
    norms: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    t, n, d = grads.shape
    acc = _acc_dtype(grads.dtype)
    tasks = list(range(t)) if task_mask is None else [i for i, k in enumerate(task_mask.tolist()) if k]
    if norms is None:
        row_norms = grads.new_zeros((t, num_rows), dtype=acc)  # T x U (masked tasks stay 0)
        seg = grads.new_empty((num_rows, d), dtype=acc)  # U x D, S_t for one task at a time
        for i in tasks:
            seg.zero_().index_add_(0, rows, grads[i].to(acc))  # U x D
            torch.linalg.vector_norm(seg, dim=1, out=row_norms[i])  # U
        logits = row_norms.t().contiguous().mul_(focus.to(acc))  # U x T
    else:
        logits = (norms.to(acc) * focus.to(acc)).contiguous()  # U x T (the fake kernel's strides)
    weights = _masked_softmax(logits, _min_tau(tau, acc), task_mask)  # U x T
    per_pos = weights.t().contiguous().index_select(1, rows)  # T x N: w_t(rows[p])
    out: torch.Tensor | None = None  # N x D
    for i in tasks:
        g, wp = grads[i].to(acc), per_pos[i].unsqueeze(1)  # N x D, N x 1
        out = g * wp if out is None else out.addcmul_(g, wp)  # N x D
    assert out is not None  # at least one task is unmasked (checked)
    return out.to(grads.dtype).contiguous(), weights.to(grads.dtype)


# ---- the op --------------------------------------------------------------------------------


def _csr(rows: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions sorted by row and CSR offsets (on ``rows``' device, no host sync): row ``r``'s
    positions are ``perm[offsets[r]:offsets[r + 1]]``."""
    sorted_rows, perm = torch.sort(rows, stable=True)  # N, N
    bounds = torch.arange(num_rows + 1, dtype=rows.dtype, device=rows.device)  # U + 1
    return perm, torch.searchsorted(sorted_rows, bounds)  # N, U + 1


@custom_op("recsys_mtl::row_grad_pool", mutates_args=())
def _row_grad_pool_op(
    grads: torch.Tensor,
    rows: torch.Tensor,
    num_rows: int,
    focus: torch.Tensor,
    tau: float,
    task_mask: Optional[torch.Tensor],
    norms: Optional[torch.Tensor],
    check: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out N x D, weights U x T)`` of per-row gradient pooling (see :func:`row_grad_pool`)."""
    check_row_grad_pool_args(grads, rows, num_rows, focus, tau, task_mask, norms)
    check_row_grad_pool_values(rows, num_rows, task_mask, check_rows=check)
    if _use_triton(grads):
        from recsys_mtl.ops.triton.row_grad_pool import row_grad_pool_fwd

        perm, offsets = _csr(rows, num_rows)
        return row_grad_pool_fwd(grads, perm, offsets, focus, _min_tau(tau, _acc_dtype(grads.dtype)), task_mask,
                                 norms)
    return _row_grad_pool_torch(grads, rows, num_rows, focus, tau, task_mask, norms)


@_row_grad_pool_op.register_fake
def _(
    grads: torch.Tensor,
    rows: torch.Tensor,
    num_rows: int,
    focus: torch.Tensor,
    tau: float,
    task_mask: Optional[torch.Tensor],
    norms: Optional[torch.Tensor],
    check: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_row_grad_pool_args(grads, rows, num_rows, focus, tau, task_mask, norms)
    t, n, d = grads.shape
    return grads.new_empty((n, d)), grads.new_empty((num_rows, t))  # N x D, U x T
