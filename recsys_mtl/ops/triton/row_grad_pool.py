"""Triton kernel of per-row gradient pooling across tasks (PMTRec, Alg. 1 lines 8–12, Eq. 4–5).

The dispatcher (:mod:`recsys_mtl.ops.row_grad_pool`) sorts the ``N`` lookup positions by row once
and passes CSR offsets: row ``r``'s positions are ``perm[offsets[r]:offsets[r + 1]]``. One program
per unique row then, for all ``T`` tasks at once (``T`` padded to a power of two, the padding and
the masked tasks never loaded):

1. walks the row's segment in chunks of ``BLOCK_P`` positions, loading a
   ``BLOCK_T x BLOCK_P x BLOCK_D`` tile of ``grads`` per chunk and summing it into the row's
   ``S`` (``BLOCK_T x BLOCK_D`` in registers; skipped when ``norms`` are given);
2. takes the norms ``‖S_t‖₂``, multiplies them by ``focus`` and forms the softmax over the
   unmasked tasks with temperature ``τ``, the largest logit subtracted before the division;
3. writes ``weights[r]`` and walks the segment a second time, writing
   ``out[p] = Σ_t w_t grads[t, p]`` for each of its positions.

Every position belongs to exactly one row, so the programs write disjoint parts of ``out``: no
atomics, and no ``T x U x D`` tensor in global memory. Any segment length works (a row looked up
thousands of times loops over its chunks) and ``D`` need not be a power of two (``BLOCK_D`` is
the next one, the tail masked). Sums and the softmax run in float32 (float64 for float64 inputs).
No ``tl.dot``: the per-position combination is a weighted sum over a handful of tasks.

Traffic per row: ``grads`` read twice for the unmasked tasks (once with ``norms``), ``out``
written once, ``T`` weights written; plus the dispatcher's sort of ``N`` int64 keys.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` (set before this module is imported), which is
how the tests check it. The launcher calls the kernel directly: it runs inside the opaque
``recsys_mtl::row_grad_pool`` op, so ``torch.compile`` never traces it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["row_grad_pool_fwd", "block_sizes", "CHUNK_ELEMENTS", "CHUNK_CAP"]

CHUNK_ELEMENTS = 4096
"""Elements of one ``BLOCK_T x BLOCK_P x BLOCK_D`` tile of ``grads`` (fp32: 32 per thread, 4 warps)."""
CHUNK_CAP = 64
"""Most positions per chunk (``BLOCK_P``); the tests lower it to exercise the chunk loop."""


@triton.jit
def _row_grad_pool_kernel(
    g_ptr, perm_ptr, off_ptr, focus_ptr, mask_ptr, norms_ptr, out_ptr, w_ptr,
    T, D, tau,
    stride_gt, stride_gn, stride_gd,
    stride_on, stride_od,
    stride_nu, stride_nt,
    stride_wu, stride_wt,
    HAS_MASK: tl.constexpr, HAS_NORMS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Row ``r = program_id(0)``: its norms, softmax weights ``weights[r]`` and ``out`` at its positions."""
    r = tl.program_id(0)
    start = tl.load(off_ptr + r)
    end = tl.load(off_ptr + r + 1)
    offs_t = tl.arange(0, BLOCK_T)  # BLOCK_T
    offs_p = tl.arange(0, BLOCK_P)  # BLOCK_P
    offs_d = tl.arange(0, BLOCK_D)  # BLOCK_D
    t_valid = offs_t < T
    keep = t_valid  # BLOCK_T: the tasks in the softmax
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + offs_t, mask=t_valid, other=0) != 0)
    td_valid = keep[:, None, None] & (offs_d < D)[None, None, :]  # BLOCK_T x 1 x BLOCK_D
    g_base = g_ptr + offs_t[:, None, None] * stride_gt + offs_d[None, None, :] * stride_gd  # BLOCK_T x 1 x BLOCK_D

    # Steps 1–2: S_t(r) over the segment, then its norm.
    if HAS_NORMS:
        n = tl.load(norms_ptr + r * stride_nu + offs_t * stride_nt, mask=keep, other=0.0).to(ACC)  # BLOCK_T
    else:
        s = tl.zeros((BLOCK_T, BLOCK_D), dtype=ACC)
        for p0 in range(start, end, BLOCK_P):
            p = p0 + offs_p  # BLOCK_P
            p_valid = p < end
            pos = tl.load(perm_ptr + p, mask=p_valid, other=0)  # BLOCK_P positions of row r
            valid = td_valid & p_valid[None, :, None]  # BLOCK_T x BLOCK_P x BLOCK_D
            g = tl.load(g_base + pos[None, :, None] * stride_gn, mask=valid, other=0.0)
            s += tl.sum(g.to(ACC), axis=1)  # BLOCK_T x BLOCK_D
        n = tl.sqrt(tl.sum(s * s, axis=1))  # BLOCK_T

    # Steps 3–4: focusing, then the softmax over the kept tasks, max subtracted first.
    f = tl.load(focus_ptr + offs_t, mask=keep, other=0.0).to(ACC)  # BLOCK_T
    m = n * f  # BLOCK_T, 0 where not kept
    m_max = tl.max(tl.where(keep, m, float("-inf")), axis=0)
    z = tl.where(keep, (m - m_max) / tau, float("-inf"))  # BLOCK_T, <= 0
    e = tl.exp(z)  # BLOCK_T, 0 where not kept
    w = e / tl.sum(e, axis=0)  # BLOCK_T
    tl.store(w_ptr + r * stride_wu + offs_t * stride_wt, w.to(w_ptr.dtype.element_ty), mask=t_valid)

    # Step 5: out[p] = Σ_t w_t grads[t, p] at the row's positions (second read of the segment).
    for p0 in range(start, end, BLOCK_P):
        p = p0 + offs_p  # BLOCK_P
        p_valid = p < end
        pos = tl.load(perm_ptr + p, mask=p_valid, other=0)  # BLOCK_P
        valid = td_valid & p_valid[None, :, None]  # BLOCK_T x BLOCK_P x BLOCK_D
        g = tl.load(g_base + pos[None, :, None] * stride_gn, mask=valid, other=0.0)
        o = tl.sum(g.to(ACC) * w[:, None, None], axis=0)  # BLOCK_P x BLOCK_D
        o_valid = p_valid[:, None] & (offs_d < D)[None, :]  # BLOCK_P x BLOCK_D
        o_ptrs = out_ptr + pos[:, None] * stride_on + offs_d[None, :] * stride_od
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=o_valid)


def block_sizes(t: int, d: int) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_P, BLOCK_D)``: powers of two, ``BLOCK_T >= T`` and ``BLOCK_D >= D`` (at
    least 2 and 16), ``BLOCK_P`` filling :data:`CHUNK_ELEMENTS` within ``[2, CHUNK_CAP]``."""
    bt = max(2, triton.next_power_of_2(t))
    bd = max(16, triton.next_power_of_2(d))
    bp = max(2, min(CHUNK_CAP, CHUNK_ELEMENTS // (bt * bd)))
    return bt, triton.next_power_of_2(bp), bd


def row_grad_pool_fwd(
    grads: torch.Tensor,
    perm: torch.Tensor,
    offsets: torch.Tensor,
    focus: torch.Tensor,
    tau: float,
    task_mask: torch.Tensor | None,
    norms: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row gradient pooling in one pass over the row segments.

    Args:
        grads (Tensor): ``T x N x D`` (any strides).
        perm (Tensor): ``N`` int64, the positions sorted by row.
        offsets (Tensor): ``U + 1`` int64 CSR offsets into ``perm``.
        focus (Tensor): ``T``.
        tau (float): temperature, > 0 (and representable in float32).
        task_mask (Tensor | None): ``T`` bool.
        norms (Tensor | None): ``U x T`` row norms; when given the segment sums are skipped.

    Returns:
        tuple[Tensor, Tensor]: ``out`` (``N x D``) and ``weights`` (``U x T``), in ``grads``' dtype.
    """
    t, n, d = grads.shape
    u = offsets.numel() - 1
    out = grads.new_empty((n, d))  # N x D
    weights = grads.new_empty((u, t))  # U x T
    if u == 0:
        return out, weights
    bt, bp, bd = block_sizes(t, d)
    mask = task_mask.to(torch.int8) if task_mask is not None else None  # T
    acc = tl.float64 if grads.dtype == torch.float64 else tl.float32
    # Empty tensors may have a null data pointer; the kernel never dereferences these when empty.
    stand_in = lambda x, other: x if x.numel() > 0 else other  # noqa: E731
    _row_grad_pool_kernel[(u,)](
        stand_in(grads, weights), stand_in(perm, offsets), offsets, focus,
        mask if mask is not None else focus, norms if norms is not None else focus,
        stand_in(out, weights), weights,
        t, d, tau,
        *grads.stride(),
        *out.stride(),
        *(norms.stride() if norms is not None else (0, 0)),
        *weights.stride(),
        HAS_MASK=mask is not None, HAS_NORMS=norms is not None, ACC=acc,
        BLOCK_T=bt, BLOCK_P=bp, BLOCK_D=bd,
    )  # fmt: skip
    return out, weights
