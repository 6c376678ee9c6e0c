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
* Other devices (CPU): PyTorch. The 2-D float32 forward is one oneDNN inner product with a ReLU
  post-op, ``torch.ops.mkldnn._linear_pointwise(x, Wᵀ, b, "relu", [], "")`` (``Wᵀ`` is a view;
  oneDNN reads the strided weight); other dtypes, the batched form and builds without oneDNN take
  ``addmm`` / ``baddbmm`` followed by an in-place ``relu_`` on the fresh output. The backward is
  ``dZ = aten.threshold_backward(dY, Y, 0)`` (one pass that reads the output, the kernel
  ``torch.relu``'s own backward uses) and two (b)mm's and a sum.
* The environment variable ``RECSYS_MTL_EXPERT_LINEAR_IMPL`` (``triton`` or ``torch``) overrides
  the choice (``triton`` on CPU needs ``TRITON_INTERPRET=1`` before Triton is first imported).

Measured CPU choices (2026-12-02, 2-core AMD EPYC, shared machine: other jobs ran alongside, so
each figure is the best of 15 interleaved rounds; float32, 1 thread / 2 threads)::

    forward, B=2048                          addmm+relu   oneDNN linear+relu   ratio
      2-D K=429 N=1536 (E=6, H1=256)   1 th   30.5 ms       26.2 ms            0.86
                                       2 th   16.3 ms       13.1 ms            0.81
      2-D K=432 N=1536                 1 th   42.6 ms       27.0 ms            0.63
                                       2 th   46.4 ms       32.1 ms            0.69
      2-D K=256 N=512                  1 th    6.2 ms        5.5 ms            0.89
    forward, B=2048                          baddbmm+relu  baddbmm+relu_  oneDNN per group + stack
      3-D G=2 K=256 N=128              1 th    4.2 ms        4.0 ms          4.1 ms
      3-D G=3 K=256 N=256              1 th   13.9 ms        9.8 ms          9.4 ms
      3-D G=3 K=256 N=512              1 th   18.3 ms       17.4 ms         17.1 ms
    ReLU mask from the output, B=2048 N=1536 (2 th): dY*(Y>0) 3.3 ms, where(Y>0, dY, 0) 7.1 ms,
      threshold_backward(dY, Y, 0) 1.1 ms

oneDNN's post-op wins for the 2-D form; per group (it has no batched weight) it ties with
``baddbmm`` and needs a stack copy, so the batched form keeps ``baddbmm`` + ``relu_``.
``threshold_backward`` is the fastest mask. The op end to end against
:func:`expert_linear_relu_reference` (``torch.relu(torch.addmm / baddbmm)`` under autograd), same
date and machine, float32, 1 thread, best of 30 interleaved rounds::

    B=2048                           forward: ref    op    ratio    forward + backward: ref    op    ratio
      2-D K=429 N=1536                    28.8   24.9   0.86                           99.5   89.5   0.90
      2-D K=432 N=1536                    30.0   24.9   0.83                           89.3   84.2   0.94
      2-D K=256 N=512                      5.8    5.4   0.92                           17.8   17.7   1.00
      3-D G=2 K=256 N=128                  3.2    3.2   1.00                            9.8   11.1   1.13
      3-D G=3 K=256 N=256                  9.4    9.6   1.01                           29.3   29.6   1.01
      3-D G=3 K=256 N=512                 18.6   18.7   1.00                           57.8   58.2   1.01

(ms; at 2 threads, with more noise, the N=1536 rows gave forward 0.66–0.71 and forward + backward
0.81–0.88; the N=512 row was unreadable there: best-of ratio 1.37, median ratio 0.63). The batched form is at parity: the same GEMMs, plus the custom op's Python dispatch
(about 0.15 ms per forward + backward, measured on tiny shapes), which is what the smallest case
shows.

The ops have fake (meta) kernels and an autograd formula, so they work under ``torch.compile``
(``fullgraph=True``, ``dynamic=False``: each stays one opaque node), ``torch.fx`` (one
``call_function`` node) and ``torch.library.opcheck``. The backward is a second op,
``recsys_mtl::expert_linear_relu_backward``.
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from recsys_mtl.ops._impl import ImplChoice
from recsys_mtl.ops.pytorch.fused_expert import expert_linear_relu_reference

__all__ = ["expert_linear_relu", "expert_linear_relu_reference", "IMPL_ENV", "USE_ONEDNN"]

IMPL_ENV = "RECSYS_MTL_EXPERT_LINEAR_IMPL"
USE_ONEDNN = True
"""Take oneDNN's Linear + ReLU post-op for 2-D float32 CPU forwards (when the build has oneDNN)."""

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


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raises on anything but ``(B x K, K x N, N | 1 x N | None)`` or ``(G x B x K, G x K x N, G x 1 x N | None)``."""
    if x.dim() == 2 and weight.dim() == 2:
        k, n = weight.shape
        if x.shape[1] != k:
            raise ValueError(f"expert_linear_relu: x B x K needs weight K x N with the same K, got x "
                             f"{tuple(x.shape)} and weight {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) not in ((n,), (1, n)):
            raise ValueError(f"expert_linear_relu: bias must be ({n},) or (1, {n}) for weight "
                             f"{tuple(weight.shape)}, got {tuple(bias.shape)}")
    elif x.dim() == 3 and weight.dim() == 3:
        g, k, n = weight.shape
        if x.shape[0] != g or x.shape[2] != k:
            raise ValueError(f"expert_linear_relu: x G x B x K needs weight G x K x N with the same G and K, "
                             f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (g, 1, n):
            raise ValueError(f"expert_linear_relu: bias must be ({g}, 1, {n}) for weight {tuple(weight.shape)}, "
                             f"got {tuple(bias.shape)}")
    else:
        raise ValueError(f"expert_linear_relu needs x B x K with weight K x N, or x G x B x K with weight "
                         f"G x K x N; got x, weight, bias {_shapes(x, weight, bias)}")
    ts = [t for t in (x, weight, bias) if t is not None]
    devices = {t.device for t in ts}
    if len(devices) > 1:
        raise ValueError(f"expert_linear_relu: x, weight and bias must be on one device, got "
                         f"{sorted(map(str, devices))}")
    if not all(t.dtype.is_floating_point for t in ts) or len({t.dtype for t in ts}) > 1:
        raise TypeError(f"expert_linear_relu: x, weight and bias must share one floating-point dtype, got "
                        f"{x.dtype}, {weight.dtype}, {None if bias is None else bias.dtype}")


def _empty(like: torch.Tensor) -> torch.Tensor:
    """A fresh ``(0,)`` tensor: the placeholder of a gradient not asked for (outputs may not alias)."""
    return like.new_empty((0,))


# ---- PyTorch path (CPU and any non-CUDA device) ----------------------------------------------


def _onednn(x: torch.Tensor) -> bool:
    """oneDNN's Linear + ReLU post-op applies: 2-D float32 on CPU, ``K > 0``, oneDNN built and enabled."""
    return (
        USE_ONEDNN and x.dim() == 2 and x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[1] > 0
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    )  # fmt: skip


def _forward_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if _onednn(x):
        b = None if bias is None else bias.reshape(-1)  # N
        # oneDNN inner product, weight N x K (a transposed view of K x N), ReLU as a post-op.
        y = torch.ops.mkldnn._linear_pointwise(x, weight.t(), b, "relu", [], "")  # B x N
        return y if y.is_contiguous() else y.contiguous()
    if x.dim() == 2:
        z = torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)  # B x N
    else:
        z = torch.bmm(x, weight) if bias is None else torch.baddbmm(bias, x, weight)  # G x B x N
    return z.relu_()  # fresh output: in place


def _backward_torch(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor,
    need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    if not (need_input or need_weight or need_bias):
        return _empty(grad), _empty(grad), _empty(grad)
    dz = torch.ops.aten.threshold_backward(grad, y, 0)  # dY ⊙ [Y > 0]: B x N or G x B x N
    if x.dim() == 2:
        dx = torch.mm(dz, weight.t()) if need_input else _empty(grad)  # B x K = (B x N)(N x K)
        dw = torch.mm(x.t(), dz) if need_weight else _empty(grad)  # K x N = (K x B)(B x N)
        db = dz.sum(0) if need_bias else _empty(grad)  # N
    else:
        dx = torch.bmm(dz, weight.transpose(1, 2)) if need_input else _empty(grad)  # G x B x K
        dw = torch.bmm(x.transpose(1, 2), dz) if need_weight else _empty(grad)  # G x K x N
        db = dz.sum(1, keepdim=True) if need_bias else _empty(grad)  # G x 1 x N
    return dx, dw, db


# ---- the ops -------------------------------------------------------------------------------


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
    n = weight.shape[-1]
    return (
        grad.new_empty(x.shape) if need_input else _empty(grad),
        grad.new_empty(weight.shape) if need_weight else _empty(grad),
        grad.new_empty((n,) if x.dim() == 2 else (x.shape[0], 1, n)) if need_bias else _empty(grad),
    )


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
