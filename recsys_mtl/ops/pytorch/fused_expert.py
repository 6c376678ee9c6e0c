"""Reference expert layer: ``Y = relu(X W + b)`` for one wide GEMM or G batched ones, with plain
autograd (``torch.relu``'s backward: ``dZ = dY ⊙ [Y > 0]``, so a pre-activation of exactly 0
passes no gradient)."""

from __future__ import annotations

import torch


def expert_linear_relu_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``relu(x @ weight + bias)`` by ``torch.addmm`` / ``torch.baddbmm`` and ``torch.relu``.

    Args:
        x (Tensor): ``B x K`` (one wide GEMM) or ``G x B x K`` (G batched GEMMs).
        weight (Tensor): ``K x N`` or ``G x K x N``.
        bias (Tensor | None): ``N`` or ``1 x N`` (2-D ``x``), ``G x 1 x N`` (3-D ``x``).

    Returns:
        Tensor: ``B x N`` or ``G x B x N``.
    """
    if x.dim() == 2:
        z = torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)  # B x N
    else:
        z = torch.bmm(x, weight) if bias is None else torch.baddbmm(bias, x, weight)  # G x B x N
    return torch.relu(z)
