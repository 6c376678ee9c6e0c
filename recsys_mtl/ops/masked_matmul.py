"""Masked linear layers of S subnets sharing one weight: ``y_s = x_s (W ⊙ M_s)ᵀ + b``, as one op.

CSRec (Bai et al., WWW'22), Eq. 7: subnet ``s`` computes ``s(x; M_s ⊙ Θ_s)`` with a binary mask
``M_s`` over the shared weights (``S = 2T``: one mask per task and one contrastive mask per task).
:func:`masked_linear` evaluates every subnet of one layer in a single ``torch.library`` op,
``recsys_mtl::masked_linear``, whose masks are bit-packed (``S x N x ceil(K/8)`` uint8, see
:func:`pack_masks`): 1 bit per weight and subnet instead of a dense mask or a dense masked weight
copy per subnet.

Forward and backward (``dY`` is ``S x B x N``)::

    Y_s  = X_s (W ⊙ M_s)ᵀ + b                  S x B x N
    dX_s = dY_s (W ⊙ M_s)                      S x B x K   (shared input: dX = Σ_s dY_s (W ⊙ M_s), B x K)
    dW   = Σ_s M_s ⊙ (dY_sᵀ X_s)               N x K
    db   = Σ_s Σ_b dY_s                        N

Nothing dense per subnet is saved for the backward: it keeps ``x``, ``W`` and the packed masks
(references to the inputs) and rebuilds ``W ⊙ M_s`` from the bits, per tile in the Triton kernels
and per chunk of subnets on CPU.

Implementations, chosen per call:

* CUDA tensors: the Triton kernels of :mod:`recsys_mtl.ops.triton.masked_matmul` (mask bits read
  and applied to the weight tile in registers; ``dW`` and ``db`` accumulated over subnets in the
  kernel).
* Other devices (CPU): PyTorch. The masks are unpacked to the weight's dtype once per call, in
  chunks of subnets of at most :data:`CHUNK_BYTES` (by a 256 x 8 bit lookup table: one gather),
  and every chunk is one batched GEMM (``baddbmm``); the shared-input ``dX`` accumulates the
  subnets' products in place (``addmm_``), and ``dW`` multiplies a chunk's ``dY_sᵀ X_s`` by its
  masks before summing it in.
* The environment variable ``RECSYS_MTL_MASKED_LINEAR_IMPL`` (``triton`` or ``torch``) overrides
  the choice (``triton`` on CPU needs ``TRITON_INTERPRET=1`` before Triton is first imported).

The op has a fake (meta) kernel and an autograd formula, so it works under ``torch.compile``
(``fullgraph=True``; the op stays one opaque node), ``torch.fx`` (one ``call_function`` node) and
``torch.library.opcheck``. The backward is a second op, ``recsys_mtl::masked_linear_backward``.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch.library import custom_op

from recsys_mtl.ops._impl import ImplChoice
from recsys_mtl.ops.pytorch.masked_matmul import masked_linear_reference, pack_masks, unpack_masks

__all__ = ["masked_linear", "pack_masks", "unpack_masks", "masked_linear_reference", "CHUNK_BYTES", "IMPL_ENV"]

IMPL_ENV = "RECSYS_MTL_MASKED_LINEAR_IMPL"
CHUNK_BYTES = 64 << 20
"""Largest unpacked mask chunk (``S' x N x K`` in the weight dtype) the PyTorch path builds at once."""

_LUTS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def masked_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed_masks: torch.Tensor
) -> torch.Tensor:
    """Every subnet's masked linear layer, ``y_s = x_s (W ⊙ M_s)ᵀ + b``, in one op (differentiable).

    Args:
        x (Tensor): ``B x K`` (one input read by every subnet, e.g. the first layer) or
            ``S x B x K`` (one input per subnet).
        weight (Tensor): ``N x K`` (the ``nn.Linear`` layout), shared by the subnets.
        bias (Tensor | None): ``N``, shared and unmasked.
        packed_masks (Tensor): ``S x N x ceil(K/8)`` uint8 from :func:`pack_masks`.

    Returns:
        Tensor: ``S x B x N``, contiguous, in ``x``'s dtype.

    Example::

        >>> w, b = torch.ones(2, 3), torch.zeros(2)
        >>> masks = pack_masks(torch.tensor([[[1, 1, 1], [0, 0, 1]], [[1, 0, 0], [0, 0, 0]]], dtype=torch.bool))
        >>> masked_linear(torch.ones(1, 3), w, b, masks)
        tensor([[[3., 1.]],
        <BLANKLINE>
                [[1., 0.]]])
    """
    return torch.ops.recsys_mtl.masked_linear(x, weight, bias, packed_masks)


_IMPL = ImplChoice(IMPL_ENV)
_force_impl = _IMPL.force  # with _force_impl("triton"): ... (tests, benchmarks)
_use_triton = _IMPL.use_triton


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor) -> None:
    if weight.dim() != 2 or packed.dim() != 3 or x.dim() not in (2, 3):
        raise ValueError(
            f"masked_linear needs x B x K or S x B x K, weight N x K and packed_masks S x N x C, got "
            f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(packed.shape)}"
        )
    s, n, c = packed.shape
    k = weight.shape[1]
    if packed.dtype != torch.uint8 or packed.shape[1] != weight.shape[0] or c != (k + 7) // 8:
        raise ValueError(f"packed_masks must be uint8 S x {weight.shape[0]} x {(k + 7) // 8}, got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    if x.shape[-1] != k or (x.dim() == 3 and x.shape[0] != s):
        raise ValueError(f"x must be B x {k} or {s} x B x {k}, got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    devices = {t.device for t in (x, weight, bias, packed) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"x, weight, bias and packed_masks must be on one device, got {sorted(map(str, devices))}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}, "
                         f"{None if bias is None else bias.dtype}")


# ---- PyTorch path (CPU and any non-CUDA device) ----------------------------------------------


def _bit_lut(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``256 x 8`` table: row ``v`` holds the 8 bits of byte ``v`` (little-endian) as ``dtype``."""
    key = (dtype, device)
    if key not in _LUTS:
        v = torch.arange(256, device=device).unsqueeze(1)  # 256 x 1
        _LUTS[key] = ((v >> torch.arange(8, device=device)) & 1).to(dtype)  # 256 x 8
    return _LUTS[key]


def _unpack_as(packed: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """``S' x N x C`` uint8 -> ``S' x N x K`` 0/1 masks in ``dtype`` (one gather from :func:`_bit_lut`)."""
    bits = F.embedding(packed.to(torch.int32), _bit_lut(dtype, packed.device))  # S' x N x C x 8
    return bits.flatten(-2)[..., :in_features]  # S' x N x K


def _empty(like: torch.Tensor) -> torch.Tensor:
    """A fresh ``(0,)`` tensor: the placeholder of a gradient not asked for (outputs may not alias)."""
    return like.new_empty((0,))


def _chunks(s: int, n: int, k: int, dtype: torch.dtype) -> Iterator[tuple[int, int]]:
    """``[s0, s1)`` subnet ranges whose unpacked ``S' x N x K`` masks fit :data:`CHUNK_BYTES`."""
    step = max(1, CHUNK_BYTES // max(1, n * k * torch.empty((), dtype=dtype).element_size()))
    for s0 in range(0, s, step):
        yield s0, min(s, s0 + step)


def _forward_torch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor
) -> torch.Tensor:
    s, n, k = packed.shape[0], weight.shape[0], weight.shape[1]
    b = x.shape[-2]
    y = x.new_empty((s, b, n))  # S x B x N
    for s0, s1 in _chunks(s, n, k, weight.dtype):
        w = weight * _unpack_as(packed[s0:s1], k, weight.dtype)  # S' x N x K
        xs = x.expand(s1 - s0, b, k) if x.dim() == 2 else x[s0:s1]  # S' x B x K
        if bias is None:
            torch.bmm(xs, w.transpose(1, 2), out=y[s0:s1])  # S' x B x N
        else:
            torch.baddbmm(bias, xs, w.transpose(1, 2), out=y[s0:s1])  # S' x B x N
    return y


def _backward_torch(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor,
    need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    s, b, n = grad.shape
    k = weight.shape[1]
    shared = x.dim() == 2
    dx: torch.Tensor | None = None  # B x K or S x B x K, allocated by the first product written to it
    dw: torch.Tensor | None = None  # N x K
    if need_input or need_weight:
        for s0, s1 in _chunks(s, n, k, weight.dtype):
            m = _unpack_as(packed[s0:s1], k, weight.dtype)  # S' x N x K
            g = grad[s0:s1]  # S' x B x N
            if need_input:
                w = weight * m  # S' x N x K
                if shared:
                    for i in range(s1 - s0):
                        # B x K (+)= (B x N) (N x K)
                        dx = torch.mm(g[i], w[i]) if dx is None else dx.addmm_(g[i], w[i])
                else:
                    dx = grad.new_empty((s, b, k)) if dx is None else dx  # S x B x K
                    torch.bmm(g, w, out=dx[s0:s1])  # S' x B x K
            if need_weight:
                xs = x.expand(s1 - s0, b, k) if shared else x[s0:s1]  # S' x B x K
                part = torch.bmm(g.transpose(1, 2), xs).mul_(m)  # S' x N x K: M_s ⊙ (dY_sᵀ X_s)
                dw = part.sum(0) if dw is None else dw.add_(part.sum(0))  # N x K
    if not need_input:
        dx = _empty(grad)
    elif dx is None:  # no subnets
        dx = grad.new_zeros((b, k) if shared else (s, b, k))
    if not need_weight:
        dw = _empty(grad)
    elif dw is None:
        dw = grad.new_zeros((n, k))
    db = grad.sum((0, 1)) if need_bias else _empty(grad)  # N
    return dx, dw, db


# ---- the ops -------------------------------------------------------------------------------


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor) -> torch.Tensor:
    _check(x, weight, bias, packed)
    if _use_triton(x):
        from recsys_mtl.ops.triton.masked_matmul import masked_linear_fwd

        return masked_linear_fwd(x, weight, bias, packed)
    return _forward_torch(x, weight, bias, packed)


@custom_op("recsys_mtl::masked_linear", mutates_args=())
def _masked_linear_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed_masks: torch.Tensor
) -> torch.Tensor:
    """``S x B x N``: ``x_s (W ⊙ M_s)ᵀ + b`` for every subnet (see :func:`masked_linear`)."""
    return _forward(x, weight, bias, packed_masks)


@_masked_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed_masks: torch.Tensor) -> torch.Tensor:
    _check(x, weight, bias, packed_masks)
    return x.new_empty((packed_masks.shape[0], x.shape[-2], weight.shape[0]))  # S x B x N


@custom_op("recsys_mtl::masked_linear_backward", mutates_args=())
def _masked_linear_backward_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, packed_masks: torch.Tensor,
    need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dX, dW, db)`` of :func:`masked_linear`; an output not asked for is an empty ``(0,)`` tensor.

    Args:
        grad (Tensor): ``S x B x N``, ``dY``.
        x (Tensor): the forward's ``B x K`` or ``S x B x K`` input.
        weight (Tensor): ``N x K``.
        packed_masks (Tensor): ``S x N x ceil(K/8)`` uint8.
        need_input, need_weight, need_bias (bool): which gradients to compute.

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``dX`` (``x``'s shape), ``dW`` (``N x K``), ``db`` (``N``).
    """
    if _use_triton(grad):
        from recsys_mtl.ops.triton.masked_matmul import masked_linear_bwd_input, masked_linear_bwd_params

        dx = masked_linear_bwd_input(grad, weight, packed_masks, x.dim() == 2) if need_input else _empty(grad)
        if need_weight:
            dw, db = masked_linear_bwd_params(grad, x, packed_masks, weight.shape[1], need_bias)
        else:
            dw, db = _empty(grad), (grad.sum((0, 1)) if need_bias else _empty(grad))  # N
        return dx, dw, db
    return _backward_torch(grad, x, weight, packed_masks, need_input, need_weight, need_bias)


@_masked_linear_backward_op.register_fake
def _(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, packed_masks: torch.Tensor,
    need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return (
        grad.new_empty(x.shape) if need_input else _empty(grad),
        grad.new_empty(weight.shape) if need_weight else _empty(grad),
        grad.new_empty((weight.shape[0],)) if need_bias else _empty(grad),
    )


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias, packed_masks = inputs
    ctx.save_for_backward(x, weight, packed_masks)  # inputs only: no masked weight copy is kept
    ctx.has_bias = bias is not None


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
    x, weight, packed_masks = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = bool(need_b and ctx.has_bias)
    dx, dw, db = torch.ops.recsys_mtl.masked_linear_backward(grad, x, weight, packed_masks, need_x, need_w, need_b)
    return (dx if need_x else None, dw if need_w else None, db if need_b else None, None)


_masked_linear_op.register_autograd(_backward, setup_context=_setup_context)

