"""E experts' Linear + bias + ReLU as one op: ``Y = relu(X W + b)``, ``recsys_mtl::expert_linear_relu``.

:class:`recsys_mtl.modules.experts.Experts` keeps every layer of its ``E`` experts in the layout
one GEMM reads, and :func:`expert_linear_relu` takes those layouts as they are (no permute copy):

* shared input, first layer: ``x`` ``B x K``, ``weight`` ``K x (E H1)``, ``bias`` ``1 x (E H1)``
  (or ``N``): one wide GEMM, ``B x N``;
* grouped input (``weight`` ``G x K x (n H1)``, ``bias`` ``G x 1 x (n H1)``) and the later layers
  (``h`` ``E x B x H_in``, ``weight`` ``E x H_in x H_out``, ``bias`` ``E x 1 x H_out``): ``G``
  batched GEMMs, ``G x B x N``.

Forward and backward (``dY`` has ``Y``'s shape; per group ``g`` in the batched form)::

    Z  = X W + b                      B x N       (G x B x N)
    Y  = max(Z, 0)                    B x N       (G x B x N)
    dZ = dY ⊙ [Y > 0]                 B x N       the ReLU mask, read from the output
    dX = dZ Wᵀ                        B x K       (G x B x K)
    dW = Xᵀ dZ                        K x N       (G x K x N)
    db = Σ_b dZ                       N / 1 x N   (G x 1 x N)

``[Y > 0] = [Z > 0]``, so a pre-activation of exactly 0 passes no gradient, as with ``torch.relu``.
The backward keeps ``x``, ``weight`` and the output ``Y`` (which the next layer holds anyway): no
boolean mask and no pre-activation ``Z`` is saved.

Implementations, chosen per call:

* CUDA tensors: the Triton kernels of :mod:`recsys_mtl.ops.triton.fused_expert` (bias + ReLU in
  the GEMM epilogue; ``dZ`` formed from the ``dY`` and ``Y`` tiles in the loads of the ``dX`` and
  ``dW`` kernels, ``db`` reduced by the ``dW`` kernel).
* Other devices (CPU): PyTorch. Where float32 CPU GEMMs go to oneDNN
  (:func:`recsys_mtl.ops.cpu_gemm.backend`; on CPUs where MKL takes a slower path, measured once
  per process), every GEMM of the op is a oneDNN inner product: the forward
  ``linear(X, Wᵀ, b)`` with ReLU as a post-op (``Wᵀ`` a view), ``dX = linear(dZ, W)``, and
  ``dW = Xᵀ dZ`` with the smaller of ``X`` / ``dZ`` copied transposed (oneDNN reads its input
  row-major only). The batched form runs one call per group and stacks the results (oneDNN has no
  batched weight). Otherwise (other dtypes, ATen's GEMMs chosen, builds without oneDNN):
  ``addmm`` / ``baddbmm`` followed by an in-place ``relu_`` on the fresh output, and two (b)mm's in
  the backward. Either way ``dZ = aten.threshold_backward(dY, Y, 0)`` (one pass that reads the
  output, the kernel ``torch.relu``'s own backward uses) and ``db`` is a sum.
* The environment variable ``RECSYS_MTL_EXPERT_LINEAR_IMPL`` (``triton`` or ``torch``) overrides
  the choice (``triton`` on CPU needs ``TRITON_INTERPRET=1`` before Triton is first imported).

Measured (2026-12-02, 2-core AMD EPYC, family 26, float32, 2 threads): oneDNN's GEMMs run at
1.5-2.7x MKL's rate on W1's expert shapes (table in :mod:`recsys_mtl.ops.cpu_gemm`), and the W1
step with :class:`~recsys_mtl.modules.experts.Experts` on this op is in ``benchmarks/README.md``.
On an earlier 2-core AMD EPYC of the same day, where MKL was closer, only the 2-D forward's
post-op gained (0.63-0.86x addmm + relu); per group, oneDNN tied ``baddbmm`` there and paid the
stack copy. ``threshold_backward`` is the fastest mask read from the output (B=2048 N=1536:
``dY*(Y>0)`` 3.3 ms, ``where(Y>0, dY, 0)`` 7.1 ms, ``threshold_backward`` 1.1 ms). The custom op's
Python dispatch costs about 0.15 ms per forward + backward (tiny shapes).

The ops have fake (meta) kernels and an autograd formula, so they work under ``torch.compile``
(``fullgraph=True``, ``dynamic=False``: each stays one opaque node), ``torch.fx`` (one
``call_function`` node) and ``torch.library.opcheck``. The backward is a second op,
``recsys_mtl::expert_linear_relu_backward``.
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from recsys_mtl.ops import cpu_gemm
from recsys_mtl.ops._impl import ImplChoice
from recsys_mtl.ops.pytorch.fused_expert import expert_linear_relu_reference

__all__ = ["expert_linear_relu", "expert_linear", "expert_linear_relu_reference", "IMPL_ENV"]

IMPL_ENV = "RECSYS_MTL_EXPERT_LINEAR_IMPL"

_IMPL = ImplChoice(IMPL_ENV)
_force_impl = _IMPL.force  # with _force_impl("triton"): ... (tests, benchmarks)
_use_triton = _IMPL.use_triton


def expert_linear_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``relu(x @ weight + bias)`` for one wide GEMM or ``G`` batched ones, in one op (differentiable).

    Args:
        x (Tensor): ``B x K`` (every expert reads it: one wide GEMM) or ``G x B x K`` (one input
            per group or expert). Any strides.
        weight (Tensor): ``K x N`` with 2-D ``x`` (e.g. ``D x (E H1)``), ``G x K x N`` with 3-D
            ``x`` (e.g. ``E x H_in x H_out``).
        bias (Tensor | None): ``N`` or ``1 x N`` with 2-D ``x``, ``G x 1 x N`` with 3-D ``x``;
            its gradient has its shape.

    Returns:
        Tensor: ``B x N`` or ``G x B x N``, contiguous, in ``x``'s dtype.

    Raises:
        ValueError: shapes that do not fit one of the two layouts, or tensors on several devices.
        TypeError: non-floating-point tensors, or dtypes that differ.

    Example::

        >>> x = torch.tensor([[1.0, -2.0]])
        >>> w = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
        >>> expert_linear_relu(x, w, torch.tensor([[0.5, 0.0, 1.0]]))
        tensor([[0., 1., 0.]])
    """
    return torch.ops.recsys_mtl.expert_linear_relu(x, weight, bias)


def _shapes(*ts: torch.Tensor | None) -> str:
    return ", ".join("None" if t is None else str(tuple(t.shape)) for t in ts)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, op: str = "expert_linear_relu") -> None:
    """Raises on anything but ``(B x K, K x N, N | 1 x N | None)`` or ``(G x B x K, G x K x N, G x 1 x N | None)``."""
    if x.dim() == 2 and weight.dim() == 2:
        k, n = weight.shape
        if x.shape[1] != k:
            raise ValueError(f"{op}: x B x K needs weight K x N with the same K, got x "
                             f"{tuple(x.shape)} and weight {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) not in ((n,), (1, n)):
            raise ValueError(f"{op}: bias must be ({n},) or (1, {n}) for weight "
                             f"{tuple(weight.shape)}, got {tuple(bias.shape)}")
    elif x.dim() == 3 and weight.dim() == 3:
        g, k, n = weight.shape
        if x.shape[0] != g or x.shape[2] != k:
            raise ValueError(f"{op}: x G x B x K needs weight G x K x N with the same G and K, "
                             f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (g, 1, n):
            raise ValueError(f"{op}: bias must be ({g}, 1, {n}) for weight {tuple(weight.shape)}, "
                             f"got {tuple(bias.shape)}")
    else:
        raise ValueError(f"{op} needs x B x K with weight K x N, or x G x B x K with weight "
                         f"G x K x N; got x, weight, bias {_shapes(x, weight, bias)}")
    ts = [t for t in (x, weight, bias) if t is not None]
    devices = {t.device for t in ts}
    if len(devices) > 1:
        raise ValueError(f"{op}: x, weight and bias must be on one device, got "
                         f"{sorted(map(str, devices))}")
    if not all(t.dtype.is_floating_point for t in ts) or len({t.dtype for t in ts}) > 1:
        raise TypeError(f"{op}: x, weight and bias must share one floating-point dtype, got "
                        f"{x.dtype}, {weight.dtype}, {None if bias is None else bias.dtype}")


def _empty(like: torch.Tensor) -> torch.Tensor:
    """A fresh ``(0,)`` tensor: the placeholder of a gradient not asked for (outputs may not alias)."""
    return like.new_empty((0,))


# ---- PyTorch path (CPU and any non-CUDA device) ----------------------------------------------


def _weight_grad(x: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """``dW = Xᵀ dZ`` (``K x N``) by oneDNN, whose inner product reads its input row-major only: one
    of ``Xᵀ`` (``K x B``) and ``dZᵀ`` (``N x B``) is copied transposed. The smaller is: ``Xᵀ dZ``
    with ``K <= N``, else ``(dZᵀ X)ᵀ`` (and the ``N x K`` result, a weight's size, transposed back)."""
    if x.shape[1] <= dz.shape[1]:
        return cpu_gemm.linear(x.t(), dz.t())  # (K x B)(B x N)
    return cpu_gemm.linear(dz.t(), x.t()).t().contiguous()  # ((N x B)(B x K))ᵀ


def _forward_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = True) -> torch.Tensor:
    """``x @ weight + bias``, then ReLU when ``relu``: ``B x N`` or ``G x B x N``, a fresh tensor."""
    if cpu_gemm.use_onednn(x) and x.shape[-1] > 0:
        # oneDNN inner products, weight N x K (a transposed view of K x N), ReLU as a post-op.
        if x.dim() == 2:
            return cpu_gemm.linear(x, weight.t(), bias, relu=relu)  # B x N
        return torch.stack([
            cpu_gemm.linear(x[g], weight[g].t(), None if bias is None else bias[g], relu=relu)
            for g in range(x.shape[0])
        ])  # G x B x N
    if x.dim() == 2:
        z = torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)  # B x N
    else:
        z = torch.bmm(x, weight) if bias is None else torch.baddbmm(bias, x, weight)  # G x B x N
    return z.relu_() if relu else z  # fresh output: in place


def _linear_backward(
    dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dX, dW, db)`` of ``Z = X W + b`` from ``dZ``; a gradient not asked for is an empty tensor."""
    onednn = cpu_gemm.use_onednn(dz) and x.shape[-1] > 0
    # oneDNN: dX = dZ Wᵀ is linear(dZ, W) (W K x N is the N' x K' weight); dW: _weight_grad.
    if x.dim() == 2:
        if onednn:
            dx = cpu_gemm.linear(dz, weight) if need_input else _empty(dz)  # B x K
            dw = _weight_grad(x, dz) if need_weight else _empty(dz)  # K x N
        else:
            dx = torch.mm(dz, weight.t()) if need_input else _empty(dz)  # B x K = (B x N)(N x K)
            dw = torch.mm(x.t(), dz) if need_weight else _empty(dz)  # K x N = (K x B)(B x N)
        db = dz.sum(0) if need_bias else _empty(dz)  # N
    else:
        groups = range(x.shape[0])
        if onednn:
            dx = torch.stack([cpu_gemm.linear(dz[g], weight[g]) for g in groups]) if need_input else _empty(dz)
            dw = torch.stack([_weight_grad(x[g], dz[g]) for g in groups]) if need_weight else _empty(dz)
        else:
            dx = torch.bmm(dz, weight.transpose(1, 2)) if need_input else _empty(dz)  # G x B x K
            dw = torch.bmm(x.transpose(1, 2), dz) if need_weight else _empty(dz)  # G x K x N
        db = dz.sum(1, keepdim=True) if need_bias else _empty(dz)  # G x 1 x N
    return dx, dw, db


def _backward_torch(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor,
    need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    if not (need_input or need_weight or need_bias):
        return _empty(grad), _empty(grad), _empty(grad)
    dz = torch.ops.aten.threshold_backward(grad, y, 0)  # dY ⊙ [Y > 0]: B x N or G x B x N
    return _linear_backward(dz, x, weight, need_input, need_weight, need_bias)


# ---- the ops -------------------------------------------------------------------------------


def _fake_grads(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The backward ops' outputs as empty tensors of their shapes (their fake kernels)."""
    n = weight.shape[-1]
    return (
        grad.new_empty(x.shape) if need_input else _empty(grad),
        grad.new_empty(weight.shape) if need_weight else _empty(grad),
        grad.new_empty((n,) if x.dim() == 2 else (x.shape[0], 1, n)) if need_bias else _empty(grad),
    )


@custom_op("recsys_mtl::expert_linear_relu", mutates_args=())
def _expert_linear_relu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``B x N`` or ``G x B x N``: ``relu(x @ weight + bias)`` (see :func:`expert_linear_relu`)."""
    _check(x, weight, bias)
    if _use_triton(x):
        from recsys_mtl.ops.triton.fused_expert import expert_linear_relu_fwd

        return expert_linear_relu_fwd(x, weight, bias)
    return _forward_torch(x, weight, bias)


@_expert_linear_relu_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    _check(x, weight, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[-1]))  # B x N or G x B x N


def _check_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> None:
    _check(x, weight, None)
    want = (*x.shape[:-1], weight.shape[-1])
    if tuple(grad.shape) != want or tuple(y.shape) != want:
        raise ValueError(f"expert_linear_relu_backward: grad and y must be {want} for x {tuple(x.shape)} and "
                         f"weight {tuple(weight.shape)}, got {tuple(grad.shape)} and {tuple(y.shape)}")
    if grad.dtype != x.dtype or y.dtype != x.dtype:
        raise TypeError(f"expert_linear_relu_backward: grad and y must be {x.dtype}, got {grad.dtype}, {y.dtype}")


@custom_op("recsys_mtl::expert_linear_relu_backward", mutates_args=())
def _expert_linear_relu_backward_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor,
    need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dX, dW, db)`` of :func:`expert_linear_relu`; a gradient not asked for is an empty ``(0,)`` tensor.

    Args:
        grad (Tensor): ``dY``, ``B x N`` or ``G x B x N``.
        x (Tensor): the forward's input, ``B x K`` or ``G x B x K``.
        weight (Tensor): ``K x N`` or ``G x K x N``.
        y (Tensor): the forward's output ``relu(x @ weight + bias)`` (its ``> 0`` is the ReLU mask).
        need_input, need_weight, need_bias (bool): which gradients to compute.

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``dX`` (``x``'s shape), ``dW`` (``weight``'s shape) and
        ``db`` (``N`` for 2-D ``x``, ``G x 1 x N`` for 3-D).
    """
    _check_backward(grad, x, weight, y)
    if _use_triton(grad):
        from recsys_mtl.ops.triton.fused_expert import expert_linear_relu_bwd_input, expert_linear_relu_bwd_params

        dx = expert_linear_relu_bwd_input(grad, y, weight) if need_input else _empty(grad)
        if need_weight:
            dw, db = expert_linear_relu_bwd_params(grad, y, x, need_bias)
        elif need_bias:
            dz = torch.ops.aten.threshold_backward(grad, y, 0)  # dY ⊙ [Y > 0]
            dw, db = _empty(grad), (dz.sum(0) if x.dim() == 2 else dz.sum(1, keepdim=True))  # N or G x 1 x N
        else:
            dw, db = _empty(grad), _empty(grad)
        return dx, dw, db
    return _backward_torch(grad, x, weight, y, need_input, need_weight, need_bias)


@_expert_linear_relu_backward_op.register_fake
def _(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor,
    need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    _check_backward(grad, x, weight, y)
    return _fake_grads(grad, x, weight, need_input, need_weight, need_bias)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight, output)  # the output is the ReLU mask: no bool mask, no Z
    ctx.bias_shape = None if bias is None else tuple(bias.shape)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
    x, weight, y = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = bool(need_b and ctx.bias_shape is not None)
    dx, dw, db = torch.ops.recsys_mtl.expert_linear_relu_backward(grad, x, weight, y, need_x, need_w, need_b)
    return (dx if need_x else None, dw if need_w else None, db.reshape(ctx.bias_shape) if need_b else None)


_expert_linear_relu_op.register_autograd(_backward, setup_context=_setup_context)


# ---- the same layouts without the ReLU: expert_linear (the gates' logits) -------------------


def expert_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight + bias`` in :func:`expert_linear_relu`'s layouts, without the ReLU (differentiable).

    :class:`~recsys_mtl.modules.gates.Gates` computes its logits with it where float32 CPU GEMMs run
    on oneDNN: a gate's ``N`` is the few experts it mixes, the shape MKL is slowest at (measured
    2026-12-02, 2-core AMD EPYC, B=2048 K=432 N=8: forward 0.50 vs 0.11 ms, weight gradient 0.55
    vs 0.12 ms). Same implementations as :func:`expert_linear_relu` on CPU; on other devices
    ``addmm`` / ``baddbmm`` (no Triton kernel: cuBLAS serves these shapes). Arguments, shapes and
    errors as there; returns ``B x N`` or ``G x B x N``.

    Example::

        >>> expert_linear(torch.tensor([[1.0, -2.0]]), torch.tensor([[1.0], [1.0]]), torch.tensor([0.5]))
        tensor([[-0.5000]])
    """
    return torch.ops.recsys_mtl.expert_linear(x, weight, bias)


@custom_op("recsys_mtl::expert_linear", mutates_args=())
def _expert_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``B x N`` or ``G x B x N``: ``x @ weight + bias`` (see :func:`expert_linear`)."""
    _check(x, weight, bias, "expert_linear")
    return _forward_torch(x, weight, bias, relu=False)


@_expert_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    _check(x, weight, bias, "expert_linear")
    return x.new_empty((*x.shape[:-1], weight.shape[-1]))  # B x N or G x B x N


def _check_linear_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    _check(x, weight, None, "expert_linear_backward")
    want = (*x.shape[:-1], weight.shape[-1])
    if tuple(grad.shape) != want:
        raise ValueError(f"expert_linear_backward: grad must be {want} for x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}, got {tuple(grad.shape)}")
    if grad.dtype != x.dtype:
        raise TypeError(f"expert_linear_backward: grad must be {x.dtype}, got {grad.dtype}")


@custom_op("recsys_mtl::expert_linear_backward", mutates_args=())
def _expert_linear_backward_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dX, dW, db)`` of :func:`expert_linear` (shapes as :func:`expert_linear_relu`'s backward)."""
    _check_linear_backward(grad, x, weight)
    if not (need_input or need_weight or need_bias):
        return _empty(grad), _empty(grad), _empty(grad)
    return _linear_backward(grad, x, weight, need_input, need_weight, need_bias)


@_expert_linear_backward_op.register_fake
def _(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    _check_linear_backward(grad, x, weight)
    return _fake_grads(grad, x, weight, need_input, need_weight, need_bias)


def _setup_linear_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_shape = None if bias is None else tuple(bias.shape)


def _linear_backward_formula(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = bool(need_b and ctx.bias_shape is not None)
    dx, dw, db = torch.ops.recsys_mtl.expert_linear_backward(grad, x, weight, need_x, need_w, need_b)
    return (dx if need_x else None, dw if need_w else None, db.reshape(ctx.bias_shape) if need_b else None)


_expert_linear_op.register_autograd(_linear_backward_formula, setup_context=_setup_linear_context)
