"""Triton kernels of the fused expert layer ``Y_g = relu(X_g W_g + b_g)``, forward and backward.

Every launcher takes the two layouts of :func:`recsys_mtl.ops.fused_expert.expert_linear_relu`:
``x`` ``B x K`` with ``weight`` ``K x N`` (the experts' shared-input first layer, one wide GEMM,
``N = E H``) or ``x`` ``G x B x K`` with ``weight`` ``G x K x N`` (grouped input and the later
layers). The 2-D form is the 3-D one with ``G = 1`` (views, no copies); every load goes through
the tensors' strides, so non-contiguous inputs (the ``E x B x H`` transpose view the experts'
first layer hands on) are read in place.

Three kernels, each batched over ``g = program_id(2)``:

* :func:`expert_linear_relu_fwd`: ``Y_g = max(X_g W_g + b_g, 0)``, ``G x B x N``; grid
  ``(B / BLOCK_B, N / BLOCK_N, G)``, a ``K`` loop per program, bias and ReLU in the epilogue on the
  fp32 accumulator (the pre-activation never reaches global memory).
* :func:`expert_linear_relu_bwd_input`: ``dX_g = dZ_g W_gᵀ``, ``G x B x K``, with
  ``dZ = dY ⊙ [Y > 0]`` formed in registers from the ``dY`` and ``Y`` tiles as they are loaded
  (no mask and no ``dZ`` in global memory); grid ``(B / BLOCK_B, K / BLOCK_K, G)``, an ``N`` loop.
* :func:`expert_linear_relu_bwd_params`: ``dW_g = X_gᵀ dZ_g`` (``G x K x N``) and
  ``db_g = Σ_b dZ_g`` (``G x N``, by the programs of the first ``K`` tile), ``dZ`` again formed
  from ``dY`` and ``Y`` in the loads; grid ``(K / BLOCK_K, N / BLOCK_N, G P)``, a batch loop per
  program. ``P`` batch splits (fp32 ``P x G x K x N`` partials, summed after the kernel) give the
  GPU enough programs when ``G K N`` has few tiles and ``B`` is large.

The tie at zero is ``torch.relu``'s: ``[Y > 0]`` is 0 where the pre-activation is exactly 0.

Tiles are powers of two ≥ 16 (``tl.dot``'s minimum, :func:`recsys_mtl.ops.triton.masked_matmul.block_sizes`);
every load is masked, so ``B``, ``N`` and ``K`` need not be multiples of the tiles. fp32 operands use
``input_precision="ieee"`` (not TF32); fp16 / bf16 operands accumulate in fp32, fp64 in fp64. On
CPU the kernels run under ``TRITON_INTERPRET=1`` (set before Triton is first imported), which is how
the tests check them. The launchers call the kernels directly: they run inside the opaque
``recsys_mtl::expert_linear_relu`` ops, which ``torch.compile`` does not trace into.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from recsys_mtl.ops.triton.masked_matmul import _precision, _splits, block_sizes

__all__ = ["expert_linear_relu_fwd", "expert_linear_relu_bwd_input", "expert_linear_relu_bwd_params", "TILE_CAP"]

TILE_CAP = 64
"""Largest tile edge when a launcher gets no ``cap`` (fp32 on a data-centre GPU, 4 warps)."""


@triton.jit
def _expert_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    B, N, K,
    stride_xg, stride_xb, stride_xk,
    stride_wg, stride_wk, stride_wn,
    stride_bg, stride_bn,
    stride_yg, stride_yb, stride_yn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One ``BLOCK_B x BLOCK_N`` tile of ``Y_g = max(X_g W_g + b_g, 0)``; ``g = program_id(2)``."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)  # BLOCK_B
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # BLOCK_N
    offs_k = tl.arange(0, BLOCK_K)  # BLOCK_K
    x_base = x_ptr + g * stride_xg
    w_base = w_ptr + g * stride_wg
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        x_valid = (offs_b[:, None] < B) & (k[None, :] < K)  # BLOCK_B x BLOCK_K
        x = tl.load(x_base + offs_b[:, None] * stride_xb + k[None, :] * stride_xk, mask=x_valid, other=0.0)
        w_valid = (k[:, None] < K) & (offs_n[None, :] < N)  # BLOCK_K x BLOCK_N
        w = tl.load(w_base + k[:, None] * stride_wk + offs_n[None, :] * stride_wn, mask=w_valid, other=0.0)
        acc += tl.dot(x, w, input_precision=PRECISION, out_dtype=ACC)  # BLOCK_B x BLOCK_N
    if HAS_BIAS:
        bias = tl.load(b_ptr + g * stride_bg + offs_n * stride_bn, mask=offs_n < N, other=0.0)  # BLOCK_N
        acc += bias[None, :].to(ACC)
    acc = tl.where((acc > 0) | (acc != acc), acc, tl.zeros_like(acc))  # ReLU epilogue (NaN kept, as torch.relu)
    y_valid = (offs_b[:, None] < B) & (offs_n[None, :] < N)
    y_ptrs = y_ptr + g * stride_yg + offs_b[:, None] * stride_yb + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_valid)


@triton.jit
def _expert_bwd_input_kernel(
    dy_ptr, y_ptr, w_ptr, dx_ptr,
    B, N, K,
    stride_dyg, stride_dyb, stride_dyn,
    stride_yg, stride_yb, stride_yn,
    stride_wg, stride_wk, stride_wn,
    stride_dxg, stride_dxb, stride_dxk,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One ``BLOCK_B x BLOCK_K`` tile of ``dX_g = (dY_g ⊙ [Y_g > 0]) W_gᵀ``."""
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.program_id(2)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)  # BLOCK_B
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # BLOCK_K
    offs_n = tl.arange(0, BLOCK_N)  # BLOCK_N
    acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs_n
        z_valid = (offs_b[:, None] < B) & (n[None, :] < N)  # BLOCK_B x BLOCK_N
        dy = tl.load(dy_ptr + g * stride_dyg + offs_b[:, None] * stride_dyb + n[None, :] * stride_dyn,
                     mask=z_valid, other=0.0)  # fmt: skip
        y = tl.load(y_ptr + g * stride_yg + offs_b[:, None] * stride_yb + n[None, :] * stride_yn,
                    mask=z_valid, other=0.0)  # fmt: skip
        dz = tl.where(y > 0, dy, tl.zeros_like(dy))  # BLOCK_B x BLOCK_N: dY ⊙ [Y > 0]
        wt_valid = (n[:, None] < N) & (offs_k[None, :] < K)  # BLOCK_N x BLOCK_K: the W_gᵀ tile
        wt = tl.load(w_ptr + g * stride_wg + offs_k[None, :] * stride_wk + n[:, None] * stride_wn,
                     mask=wt_valid, other=0.0)  # fmt: skip
        acc += tl.dot(dz, wt, input_precision=PRECISION, out_dtype=ACC)  # BLOCK_B x BLOCK_K
    dx_valid = (offs_b[:, None] < B) & (offs_k[None, :] < K)
    dx_ptrs = dx_ptr + g * stride_dxg + offs_b[:, None] * stride_dxb + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=dx_valid)


@triton.jit
def _expert_bwd_params_kernel(
    dy_ptr, y_ptr, x_ptr, dw_ptr, db_ptr,
    B, N, K, P, B_PER_SPLIT,
    stride_dyg, stride_dyb, stride_dyn,
    stride_yg, stride_yb, stride_yn,
    stride_xg, stride_xb, stride_xk,
    stride_dwp, stride_dwg, stride_dwk, stride_dwn,
    stride_dbp, stride_dbg,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One ``BLOCK_K x BLOCK_N`` tile of ``dW_g = X_gᵀ (dY_g ⊙ [Y_g > 0])`` over the batch rows
    ``[p B_PER_SPLIT, (p + 1) B_PER_SPLIT)`` (``program_id(2) = g P + p``), written to partial
    ``p``; the programs of the first ``K`` tile also write their ``BLOCK_N`` slice of
    ``db_g = Σ_b dZ_g`` for the split."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_gp = tl.program_id(2)
    g = pid_gp // P
    p = pid_gp % P
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # BLOCK_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # BLOCK_N
    offs_b = tl.arange(0, BLOCK_B)  # BLOCK_B
    b_lo = p * B_PER_SPLIT
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=ACC)
    db = tl.zeros((BLOCK_N,), dtype=ACC)
    for b0 in range(b_lo, b_lo + B_PER_SPLIT, BLOCK_B):
        b = b0 + offs_b
        xt_valid = (offs_k[:, None] < K) & (b[None, :] < B)  # BLOCK_K x BLOCK_B: the X_gᵀ tile
        xt = tl.load(x_ptr + g * stride_xg + b[None, :] * stride_xb + offs_k[:, None] * stride_xk,
                     mask=xt_valid, other=0.0)  # fmt: skip
        z_valid = (b[:, None] < B) & (offs_n[None, :] < N)  # BLOCK_B x BLOCK_N
        dy = tl.load(dy_ptr + g * stride_dyg + b[:, None] * stride_dyb + offs_n[None, :] * stride_dyn,
                     mask=z_valid, other=0.0)  # fmt: skip
        y = tl.load(y_ptr + g * stride_yg + b[:, None] * stride_yb + offs_n[None, :] * stride_yn,
                    mask=z_valid, other=0.0)  # fmt: skip
        dz = tl.where(y > 0, dy, tl.zeros_like(dy))  # BLOCK_B x BLOCK_N: dY ⊙ [Y > 0]
        acc += tl.dot(xt, dz, input_precision=PRECISION, out_dtype=ACC)  # BLOCK_K x BLOCK_N
        if HAS_BIAS:
            if pid_k == 0:
                db += tl.sum(dz.to(ACC), axis=0)  # BLOCK_N
    dw_valid = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    dw_ptrs = dw_ptr + p * stride_dwp + g * stride_dwg + offs_k[:, None] * stride_dwk + offs_n[None, :] * stride_dwn
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=dw_valid)
    if HAS_BIAS:
        if pid_k == 0:
            db_ptrs = db_ptr + p * stride_dbp + g * stride_dbg + offs_n
            tl.store(db_ptrs, db.to(db_ptr.dtype.element_ty), mask=offs_n < N)


def _acc(dtype: torch.dtype) -> tl.dtype:
    """The accumulator: fp64 for fp64 operands, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """``B x K`` -> ``1 x B x K`` (a view); 3-D tensors as they are."""
    return t.unsqueeze(0) if t.dim() == 2 else t


def _bias_2d(bias: torch.Tensor, groups: int) -> torch.Tensor:
    """Bias ``N`` / ``1 x N`` (one group) or ``G x 1 x N`` as a ``G x N`` view."""
    if bias.dim() == 3:
        return bias[:, 0, :]  # G x N
    return bias.reshape(groups, bias.shape[-1])  # 1 x N


def expert_linear_relu_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cap: int | None = None
) -> torch.Tensor:
    """``Y = max(X W + b, 0)`` in one kernel (bias and ReLU in the GEMM's epilogue).

    Args:
        x (Tensor): ``B x K`` or ``G x B x K``.
        weight (Tensor): ``K x N`` or ``G x K x N``.
        bias (Tensor | None): ``N`` / ``1 x N`` (2-D ``x``) or ``G x 1 x N``.
        cap (int | None): largest tile (default :data:`TILE_CAP`).

    Returns:
        Tensor: ``B x N`` or ``G x B x N``, contiguous, in ``x``'s dtype.
    """
    x3, w3 = _as_3d(x), _as_3d(weight)  # G x B x K, G x K x N
    g, b, k = x3.shape
    n = w3.shape[2]
    y3 = x.new_empty((g, b, n))  # G x B x N
    b2 = _bias_2d(bias, g) if bias is not None else None  # G x N
    bb, bn, bk = block_sizes(b, n, k, cap or TILE_CAP)
    grid = (triton.cdiv(b, bb), triton.cdiv(n, bn), g)
    if all(grid):
        _expert_fwd_kernel[grid](
            x3, w3, b2 if b2 is not None else w3, y3,
            b, n, k,
            *x3.stride(),
            *w3.stride(),
            *(b2.stride() if b2 is not None else (0, 0)),
            *y3.stride(),
            HAS_BIAS=b2 is not None, PRECISION=_precision(x.dtype), ACC=_acc(x.dtype),
            BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk,
        )  # fmt: skip
    return y3 if x.dim() == 3 else y3[0]


def expert_linear_relu_bwd_input(
    grad: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, cap: int | None = None
) -> torch.Tensor:
    """``dX = (dY ⊙ [Y > 0]) Wᵀ`` with the ReLU mask formed from ``Y`` in the kernel's loads.

    Args:
        grad (Tensor): ``dY``, ``B x N`` or ``G x B x N`` (any strides, e.g. expanded).
        y (Tensor): the forward's output, ``grad``'s shape.
        weight (Tensor): ``K x N`` or ``G x K x N``.
        cap (int | None): largest tile (default :data:`TILE_CAP`).

    Returns:
        Tensor: ``B x K`` or ``G x B x K``.
    """
    dy3, y3, w3 = _as_3d(grad), _as_3d(y), _as_3d(weight)  # G x B x N, G x B x N, G x K x N
    g, b, n = dy3.shape
    k = w3.shape[1]
    dx3 = grad.new_empty((g, b, k))  # G x B x K
    bb, bn, bk = block_sizes(b, n, k, cap or TILE_CAP)
    grid = (triton.cdiv(b, bb), triton.cdiv(k, bk), g)
    if all(grid):
        _expert_bwd_input_kernel[grid](
            dy3, y3, w3, dx3,
            b, n, k,
            *dy3.stride(),
            *y3.stride(),
            *w3.stride(),
            *dx3.stride(),
            PRECISION=_precision(grad.dtype), ACC=_acc(grad.dtype),
            BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk,
        )  # fmt: skip
    return dx3 if grad.dim() == 3 else dx3[0]


def expert_linear_relu_bwd_params(
    grad: torch.Tensor, y: torch.Tensor, x: torch.Tensor, with_bias: bool,
    cap: int | None = None, splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``dW = Xᵀ (dY ⊙ [Y > 0])`` and ``db = Σ_b (dY ⊙ [Y > 0])``, the mask formed in the loads.

    Args:
        grad (Tensor): ``dY``, ``B x N`` or ``G x B x N``.
        y (Tensor): the forward's output, ``grad``'s shape.
        x (Tensor): the forward's input, ``B x K`` or ``G x B x K``.
        with_bias (bool): also compute ``db`` (else it is an empty tensor).
        cap (int | None): largest tile (default :data:`TILE_CAP`).
        splits (int | None): batch splits ``P`` (default: enough programs for two waves of SMs).

    Returns:
        tuple[Tensor, Tensor]: ``dW`` (``K x N`` or ``G x K x N``) and ``db`` (``N`` or
        ``G x 1 x N``; ``(0,)`` without bias).
    """
    dy3, y3, x3 = _as_3d(grad), _as_3d(y), _as_3d(x)  # G x B x N, G x B x N, G x B x K
    g, b, n = dy3.shape
    k = x3.shape[2]
    bb, bn, bk = block_sizes(b, n, k, cap or TILE_CAP)
    b_tiles, k_tiles, n_tiles = triton.cdiv(b, bb), triton.cdiv(k, bk), triton.cdiv(n, bn)
    want = splits if splits is not None else _splits(b_tiles, g * k_tiles * n_tiles, grad.device)
    p = max(1, min(max(1, b_tiles), want))
    b_per_split = triton.cdiv(max(1, b_tiles), p) * bb
    p = triton.cdiv(b, b_per_split) if b > 0 else 1  # no empty splits
    part_dtype = grad.dtype if p == 1 else (torch.float64 if grad.dtype == torch.float64 else torch.float32)
    dw = grad.new_empty((p, g, k, n), dtype=part_dtype)  # P x G x K x N
    db = grad.new_empty((p, g, n if with_bias else 0), dtype=part_dtype)  # P x G x N
    grid = (k_tiles, n_tiles, g * p)
    if all(grid):
        _expert_bwd_params_kernel[grid](
            dy3, y3, x3, dw, db if with_bias else dw,
            b, n, k, p, b_per_split,
            *dy3.stride(),
            *y3.stride(),
            *x3.stride(),
            *dw.stride(),
            db.stride(0), db.stride(1),
            HAS_BIAS=with_bias, PRECISION=_precision(grad.dtype), ACC=_acc(grad.dtype),
            BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk,
        )  # fmt: skip
    elif with_bias and k == 0:  # no K tile to write db: Σ_b dZ directly
        db = torch.ops.aten.threshold_backward(dy3, y3, 0).sum(1).to(part_dtype).unsqueeze(0)  # 1 x G x N
    dw_g = dw[0] if p == 1 else dw.sum(0).to(grad.dtype)  # G x K x N
    db_g = db[0] if p == 1 else db.sum(0).to(grad.dtype)  # G x N
    dw_out = dw_g if grad.dim() == 3 else dw_g[0]  # (G x) K x N
    if not with_bias:
        return dw_out, grad.new_empty((0,))
    return dw_out, (db_g.unsqueeze(1) if grad.dim() == 3 else db_g[0])  # G x 1 x N or N
