"""ReLU whose backward reads the saved output, never a saved boolean mask.

``relu'(x) = [x > 0] = [relu(x) > 0]``, so the gradient can be formed from the output the forward
already keeps for the next layer's weight gradient: ``grad * [out > 0]``
(``aten::threshold_backward(grad, out, 0)``, the formula eager ``torch.relu`` uses too).

Eagerly ``torch.relu``'s backward is that formula. Under ``torch.compile``, AOTAutograd's
partitioner decides what the backward keeps, and it may keep ``out <= 0`` as a ``bool`` tensor
instead of ``out`` when nothing else in the backward needs ``out``; inductor's CPU kernel writing
such a mask is several times slower than the ReLU itself (issue 11: 17.7 vs 2.2 ms on a
2048 x 1024 activation; here, on W1's 4 x 2048 x 256 second-level expert activation, 12.6 ms for
the fused copy + ReLU + mask kernel against 2.4 ms for the copy + ReLU (and a softmax) without the
mask). Under compilation :func:`relu` is an
``autograd.Function`` whose backward is ``threshold_backward(grad, out, 0)`` on the saved output.

What made the masks appear in the W1 head was not the ReLU's formula but a cut of the graph:
inside DDP, dynamo split the head into one graph per gradient bucket, and a ReLU whose output
left its graph had only the mask to pass to its backward. With the head one graph
(:mod:`recsys_mtl.train.compiled` turns the split off) and each ReLU's output the tensor the next
GEMM reads (not a copy of it: ``Experts`` applies the first layer's ReLU after its transposing
view), the backward keeps the outputs and inductor writes no mask (checked for PLE in
tests/train/test_compiled_head.py). The traced graph of this Function
equals that of ``torch.relu``; a variant whose backward is an opaque custom op, which would rule a
mask out even for a ReLU whose output nothing else reads, cost 4 % on the compiled W1 step
(165.2 vs 158.1 ms, 2026-12-02, 2-core AMD EPYC, shared machine) and is not used.

:func:`relu` is what the dense modules call (:class:`~recsys_mtl.modules.experts.Experts`,
:class:`~recsys_mtl.modules.mlp.MLP`, towers, gates' MLPs); :class:`ReLU` is its ``nn.Module`` form.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _OutputSavedReLU(torch.autograd.Function):
    """``relu(x)`` with ``d relu / dx`` taken from the saved output (ties at 0 give 0, as ``torch.relu``)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.relu(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out, 0)  # grad where out > 0, else 0


def relu(x: torch.Tensor) -> torch.Tensor:
    """``max(x, 0)``; under ``torch.compile`` its backward uses the saved output, not a mask.

    Eagerly this is ``torch.relu`` itself (whose autograd formula already reads the output), so
    eager steps pay no Python ``autograd.Function`` overhead. While ``torch.fx`` traces (TorchRec's
    pipelines trace the model to find the sharded modules' inputs) it records one ``torch.relu``
    call, the same function.

    Example::

        >>> x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
        >>> relu(x).sum().backward()
        >>> x.grad.tolist()
        [0.0, 0.0, 1.0]
    """
    if torch.compiler.is_compiling():
        return _OutputSavedReLU.apply(x)
    return torch.relu(x)


class ReLU(nn.Module):
    """:func:`relu` as a module (a drop-in for ``nn.ReLU()``, without parameters or state).

    Example::

        >>> ReLU()(torch.tensor([-2.0, 3.0])).tolist()
        [0.0, 3.0]
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu(x)
