"""Triton kernels of the masked linear layer ``y_s = x_s (W ⊙ M_s)ᵀ + b`` with bit-packed masks.

CSRec (Bai et al., WWW'22), Eq. 7: every subnet ``s`` computes ``s(x; M_s ⊙ Θ_s)``: one shared
weight ``W`` (``N x K``), one binary mask ``M_s`` per subnet, stored 1 bit per weight (``S x N x C``
uint8, ``C = ceil(K/8)``; bit ``j`` of byte ``c`` is weight column ``8c + j``). The kernels never
materialise ``W ⊙ M_s``: each program loads a ``W`` tile and the mask bytes of the same tile,
zeroes the masked-out weights in registers and feeds the tile to ``tl.dot``.

Three kernels, each for both input forms (``x`` is ``B x K`` and read by every subnet, or
``S x B x K``, one per subnet; the shared form is the per-subnet form with a subnet stride of 0):

* :func:`masked_linear_fwd`: ``Y_s = X_s (W ⊙ M_s)ᵀ + b`` -> ``S x B x N``; grid
  ``(B / BLOCK_B, N / BLOCK_N, S)``, a ``K`` loop per program.
* :func:`masked_linear_bwd_input`: ``dX_s = dY_s (W ⊙ M_s)`` -> ``S x B x K``, or in the shared
  form ``dX = Σ_s dY_s (W ⊙ M_s)`` -> ``B x K`` (the subnet sum runs inside each program, so no
  ``S x B x K`` partials are written); grid ``(B / BLOCK_B, K / BLOCK_K, S or 1)``.
* :func:`masked_linear_bwd_params`: ``dW = Σ_s M_s ⊙ (dY_sᵀ X_s)`` -> ``N x K``, and
  ``db = Σ_s Σ_b dY_s`` -> ``N`` by the programs of the first ``K`` tile; grid
  ``(N / BLOCK_N, K / BLOCK_K, P)``, the subnet and batch loops inside each program, the mask
  applied to each subnet's partial product before it is added, so no ``S x N x K`` tensor exists
  (``P`` batch splits write ``P x N x K`` fp32 partials when ``N x K`` alone has too few tiles to
  fill the GPU).

Tiles are powers of two ≥ 16 (``tl.dot``'s minimum); every load is masked, so ``B``, ``N`` and
``K`` need not be multiples of the tiles (nor ``K`` of 8). fp32 operands use
``input_precision="ieee"`` (Triton's default for fp32 on NVIDIA GPUs is TF32); fp16 / bf16 operands
accumulate in fp32. On CPU the kernels run under ``TRITON_INTERPRET=1`` (set before this module is
imported: ``@triton.jit`` reads it when it decorates), which is how the tests check them.

The launchers call the kernels directly: they run inside the opaque ``recsys_mtl::masked_linear``
op (:mod:`recsys_mtl.ops.masked_matmul`), so ``torch.compile`` never traces them and
``torch.library.wrap_triton`` would only add its eager dispatch cost.

Cost model (documented, not measured): per program and ``K`` step the forward reads a
``BLOCK_N x BLOCK_K`` weight tile (4 bytes per weight in fp32) and the matching mask bytes
(``BLOCK_N x BLOCK_K / 8`` distinct bytes from DRAM; every weight column loads its byte, so 8
lanes hit the same byte in L1). See :mod:`recsys_mtl.bench.masked_matmul` for the per-layer bytes /
FLOPs model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["masked_linear_fwd", "masked_linear_bwd_input", "masked_linear_bwd_params", "block_sizes", "TILE_CAP"]

TILE_CAP = 64
"""Largest tile edge when a launcher gets no ``cap`` (fp32 on a data-centre GPU, 4 warps)."""


@triton.jit
def _mask_tile(m_ptr, rows, cols, stride_r, stride_c, valid):
    """int1 tile of a bit-packed mask at the broadcast ``rows x cols`` indices (row and column index
    tiles): bit ``cols % 8`` of byte ``cols // 8`` of each row."""
    byte = tl.load(m_ptr + rows * stride_r + (cols // 8) * stride_c, mask=valid, other=0)
    return ((byte.to(tl.int32) >> (cols % 8)) & 1) != 0


@triton.jit
def _masked_linear_fwd_kernel(
    x_ptr, w_ptr, b_ptr, m_ptr, y_ptr,
    B, N, K,
    stride_xs, stride_xb, stride_xk,
    stride_wn, stride_wk,
    stride_ms, stride_mn, stride_mc,
    stride_ys, stride_yb, stride_yn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One ``BLOCK_B x BLOCK_N`` tile of ``Y_s = X_s (W ⊙ M_s)ᵀ + b``; ``s = program_id(2)``."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    s = tl.program_id(2)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)  # BLOCK_B
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # BLOCK_N
    offs_k = tl.arange(0, BLOCK_K)  # BLOCK_K
    x_base = x_ptr + s * stride_xs
    m_base = m_ptr + s * stride_ms
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        x_valid = (offs_b[:, None] < B) & (k[None, :] < K)  # BLOCK_B x BLOCK_K
        x = tl.load(x_base + offs_b[:, None] * stride_xb + k[None, :] * stride_xk, mask=x_valid, other=0.0)
        w_valid = (k[:, None] < K) & (offs_n[None, :] < N)  # BLOCK_K x BLOCK_N: the Wᵀ tile
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + k[:, None] * stride_wk, mask=w_valid, other=0.0)
        keep = _mask_tile(m_base, offs_n[None, :], k[:, None], stride_mn, stride_mc, w_valid)  # BLOCK_K x BLOCK_N
        w = tl.where(keep, w, tl.zeros_like(w))
        acc += tl.dot(x, w, input_precision=PRECISION)  # BLOCK_B x BLOCK_N
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0)  # BLOCK_N
        acc += bias[None, :].to(tl.float32)
    y_valid = (offs_b[:, None] < B) & (offs_n[None, :] < N)
    y_ptrs = y_ptr + s * stride_ys + offs_b[:, None] * stride_yb + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_valid)


@triton.jit
def _masked_linear_bwd_input_kernel(
    dy_ptr, w_ptr, m_ptr, dx_ptr,
    S, B, N, K,
    stride_dys, stride_dyb, stride_dyn,
    stride_wn, stride_wk,
    stride_ms, stride_mn, stride_mc,
    stride_dxs, stride_dxb, stride_dxk,
    SHARED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One ``BLOCK_B x BLOCK_K`` tile of ``dX_s = dY_s (W ⊙ M_s)``, or with ``SHARED`` of
    ``dX = Σ_s dY_s (W ⊙ M_s)`` (the subnet sum in the program)."""
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)  # BLOCK_B
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # BLOCK_K
    offs_n = tl.arange(0, BLOCK_N)  # BLOCK_N
    if SHARED:
        s_lo = 0
        s_hi = S
    else:
        s_lo = pid_s
        s_hi = pid_s + 1
    acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    for s in range(s_lo, s_hi):
        for n0 in range(0, N, BLOCK_N):
            n = n0 + offs_n
            dy_valid = (offs_b[:, None] < B) & (n[None, :] < N)  # BLOCK_B x BLOCK_N
            dy_ptrs = dy_ptr + s * stride_dys + offs_b[:, None] * stride_dyb + n[None, :] * stride_dyn
            dy = tl.load(dy_ptrs, mask=dy_valid, other=0.0)
            w_valid = (n[:, None] < N) & (offs_k[None, :] < K)  # BLOCK_N x BLOCK_K
            w = tl.load(w_ptr + n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=w_valid, other=0.0)
            keep = _mask_tile(m_ptr + s * stride_ms, n[:, None], offs_k[None, :], stride_mn, stride_mc, w_valid)
            w = tl.where(keep, w, tl.zeros_like(w))
            acc += tl.dot(dy, w, input_precision=PRECISION)  # BLOCK_B x BLOCK_K
    dx_valid = (offs_b[:, None] < B) & (offs_k[None, :] < K)
    dx_ptrs = dx_ptr + pid_s * stride_dxs + offs_b[:, None] * stride_dxb + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=dx_valid)


@triton.jit
def _masked_linear_bwd_params_kernel(
    dy_ptr, x_ptr, m_ptr, dw_ptr, db_ptr,
    S, B, N, K, B_PER_SPLIT,
    stride_dys, stride_dyb, stride_dyn,
    stride_xs, stride_xb, stride_xk,
    stride_ms, stride_mn, stride_mc,
    stride_dwp, stride_dwn, stride_dwk,
    stride_dbp,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One ``BLOCK_N x BLOCK_K`` tile of ``dW = Σ_s M_s ⊙ (dY_sᵀ X_s)`` over the batch rows
    ``[p B_PER_SPLIT, (p + 1) B_PER_SPLIT)`` of split ``p = program_id(2)`` (written to slice ``p``
    of the output); the programs of the first ``K`` tile also write their ``BLOCK_N`` slice of
    ``db = Σ_s Σ_b dY_s``. The mask is applied to each subnet's partial product before it is added:
    ``M_s ⊙ Σ_b`` is linear in the rows, so the splits sum to ``dW``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_p = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # BLOCK_N
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # BLOCK_K
    offs_b = tl.arange(0, BLOCK_B)  # BLOCK_B
    b_lo = pid_p * B_PER_SPLIT
    tile_valid = (offs_n[:, None] < N) & (offs_k[None, :] < K)  # BLOCK_N x BLOCK_K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(0, S):
        part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for b0 in range(b_lo, b_lo + B_PER_SPLIT, BLOCK_B):
            b = b0 + offs_b
            dyt_valid = (offs_n[:, None] < N) & (b[None, :] < B)  # BLOCK_N x BLOCK_B: the dY_sᵀ tile
            dyt_ptrs = dy_ptr + s * stride_dys + b[None, :] * stride_dyb + offs_n[:, None] * stride_dyn
            dyt = tl.load(dyt_ptrs, mask=dyt_valid, other=0.0)
            x_valid = (b[:, None] < B) & (offs_k[None, :] < K)  # BLOCK_B x BLOCK_K
            x_ptrs = x_ptr + s * stride_xs + b[:, None] * stride_xb + offs_k[None, :] * stride_xk
            x = tl.load(x_ptrs, mask=x_valid, other=0.0)
            part += tl.dot(dyt, x, input_precision=PRECISION)  # BLOCK_N x BLOCK_K
            if HAS_BIAS:
                if pid_k == 0:
                    db += tl.sum(dyt.to(tl.float32), axis=1)  # BLOCK_N
        keep = _mask_tile(m_ptr + s * stride_ms, offs_n[:, None], offs_k[None, :], stride_mn, stride_mc, tile_valid)
        acc += tl.where(keep, part, tl.zeros_like(part))
    dw_ptrs = dw_ptr + pid_p * stride_dwp + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=tile_valid)
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(db_ptr + pid_p * stride_dbp + offs_n, db.to(db_ptr.dtype.element_ty), mask=offs_n < N)


def _tile(extent: int, cap: int) -> int:
    """Power of two in ``[16, cap]``, no larger than ``extent`` needs."""
    return max(16, min(cap, triton.next_power_of_2(max(1, extent))))


def block_sizes(b: int, n: int, k: int, cap: int | None = None) -> tuple[int, int, int]:
    """``(BLOCK_B, BLOCK_N, BLOCK_K)`` for a ``B x N x K`` layer: powers of two in ``[16, cap]``.

    ``cap`` defaults to :data:`TILE_CAP`; the tests use 16 to exercise multi-tile loops and ragged
    edges at the tiny sizes the interpreter can afford.
    """
    cap = cap or TILE_CAP
    return _tile(b, cap), _tile(n, cap), _tile(k, cap)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _xs(x: torch.Tensor) -> tuple[int, int, int]:
    """``(stride_s, stride_b, stride_k)`` of ``B x K`` (stride_s 0: every subnet reads it) or ``S x B x K``."""
    return (0, *x.stride()) if x.dim() == 2 else tuple(x.stride())


def masked_linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor, cap: int | None = None
) -> torch.Tensor:
    """``Y_s = X_s (W ⊙ M_s)ᵀ + b`` with the bits read in the kernel.

    Args:
        x (Tensor): ``B x K`` (shared by the subnets) or ``S x B x K``.
        weight (Tensor): ``N x K``.
        bias (Tensor | None): ``N``.
        packed (Tensor): ``S x N x ceil(K/8)`` uint8.
        cap (int | None): largest tile (see :func:`block_sizes`).

    Returns:
        Tensor: ``S x B x N`` in ``x``'s dtype.
    """
    s, n, k = packed.shape[0], weight.shape[0], weight.shape[1]
    b = x.shape[-2]
    y = x.new_empty((s, b, n))  # S x B x N
    bb, bn, bk = block_sizes(b, n, k, cap)
    grid = (triton.cdiv(b, bb), triton.cdiv(n, bn), s)
    _masked_linear_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, packed, y,
        b, n, k,
        *_xs(x),
        *weight.stride(),
        *packed.stride(),
        *y.stride(),
        HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype),
        BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk,
    )  # fmt: skip
    return y


def masked_linear_bwd_input(
    grad: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, shared: bool, cap: int | None = None
) -> torch.Tensor:
    """``dX_s = dY_s (W ⊙ M_s)`` (``S x B x K``), or with ``shared`` ``Σ_s dY_s (W ⊙ M_s)`` (``B x K``).

    Args:
        grad (Tensor): ``S x B x N``, ``dY``.
        weight (Tensor): ``N x K``.
        packed (Tensor): ``S x N x ceil(K/8)`` uint8.
        shared (bool): the forward's ``x`` was ``B x K`` (one input read by every subnet).
        cap (int | None): largest tile (see :func:`block_sizes`).
    """
    s, b, n = grad.shape
    k = weight.shape[1]
    dx = grad.new_empty((b, k) if shared else (s, b, k))  # B x K or S x B x K
    bb, bn, bk = block_sizes(b, n, k, cap)
    grid = (triton.cdiv(b, bb), triton.cdiv(k, bk), 1 if shared else s)
    _masked_linear_bwd_input_kernel[grid](
        grad, weight, packed, dx,
        s, b, n, k,
        *grad.stride(),
        *weight.stride(),
        *packed.stride(),
        *_xs(dx),
        SHARED=shared, PRECISION=_precision(grad.dtype),
        BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk,
    )  # fmt: skip
    return dx


def _splits(b_tiles: int, tiles: int, device: torch.device) -> int:
    """Batch splits of the ``dW`` kernel: enough programs for two waves over the GPU's SMs
    (``tiles`` ``N x K`` tiles alone can be a few dozen), at most one per ``BLOCK_B`` rows."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(b_tiles, (2 * sms) // max(1, tiles)))


def masked_linear_bwd_params(
    grad: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, in_features: int, with_bias: bool,
    cap: int | None = None, splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``dW = Σ_s M_s ⊙ (dY_sᵀ X_s)`` and ``db = Σ_s Σ_b dY_s``, accumulated over subnets in the kernel.

    With ``P > 1`` batch splits each split writes an fp32 ``N x K`` partial (``P x N x K``, summed
    after the kernel; ``P`` is small and independent of ``S``), so there are enough programs when
    ``N x K`` has few tiles and the batch is large.

    Args:
        grad (Tensor): ``S x B x N``, ``dY``.
        x (Tensor): ``B x K`` (shared) or ``S x B x K``, the forward's input.
        packed (Tensor): ``S x N x ceil(K/8)`` uint8.
        in_features (int): ``K``.
        with_bias (bool): also compute ``db`` (else it is an empty tensor).
        cap (int | None): largest tile (see :func:`block_sizes`).
        splits (int | None): batch splits ``P`` (default: :func:`_splits`' heuristic).

    Returns:
        tuple[Tensor, Tensor]: ``dW`` (``N x K``) and ``db`` (``N``, or ``0`` without bias).
    """
    s, b, n = grad.shape
    k = in_features
    bb, bn, bk = block_sizes(b, n, k, cap)
    b_tiles, n_tiles, k_tiles = triton.cdiv(b, bb), triton.cdiv(n, bn), triton.cdiv(k, bk)
    p = max(1, min(b_tiles, splits if splits is not None else _splits(b_tiles, n_tiles * k_tiles, grad.device)))
    b_per_split = triton.cdiv(b_tiles, p) * bb
    p = triton.cdiv(b, b_per_split) if b > 0 else 1  # no empty splits
    part_dtype = grad.dtype if p == 1 else torch.float32
    dw = grad.new_empty((p, n, k), dtype=part_dtype)  # P x N x K
    db = grad.new_empty((p, n if with_bias else 0), dtype=part_dtype)  # P x N
    _masked_linear_bwd_params_kernel[(n_tiles, k_tiles, p)](
        grad, x, packed, dw, db if with_bias else dw,
        s, b, n, k, b_per_split,
        *grad.stride(),
        *_xs(x),
        *packed.stride(),
        *dw.stride(),
        db.stride(0),
        HAS_BIAS=with_bias, PRECISION=_precision(grad.dtype),
        BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk,
    )  # fmt: skip
    if p == 1:
        return dw[0], db[0]
    return dw.sum(0).to(grad.dtype), db.sum(0).to(grad.dtype)  # N x K, N
