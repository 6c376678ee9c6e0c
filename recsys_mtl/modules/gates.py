"""Softmax gates, several evaluated as one batched op."""

from __future__ import annotations

import math

import torch
from torch import nn

from recsys_mtl.modules.experts import uniform_rows_
from recsys_mtl.ops import cpu_gemm
from recsys_mtl.ops.fused_expert import expert_linear


class Gates(nn.Module):
    """``num_gates`` gates, each ``Linear(D, num_choices)`` + softmax (MMoE / PLE gates).

    Args:
        in_features (int): input width ``D``.
        num_choices (int): experts each gate mixes ``E``.
        num_gates (int): gates ``G``.
        grouped_input (bool): each gate reads its own slice of a ``G x B x D`` input
            (instead of one shared ``B x D``); fixed at construction for ``torch.fx`` tracing.
        zero_rows (int): the last ``zero_rows`` input features are zero padding (weight rows
            start at zero and stay there; see :class:`~recsys_mtl.modules.experts.Experts`).
        fused (bool | None): compute the logits with
            :func:`~recsys_mtl.ops.fused_expert.expert_linear` (oneDNN on CPU) instead of ``addmm`` /
            ``baddbmm``; None: where :func:`recsys_mtl.ops.cpu_gemm.backend` is ``"onednn"``, read
            here once (as :class:`~recsys_mtl.modules.experts.Experts` does).

    Example::

        >>> Gates(8, num_choices=3, num_gates=2)(torch.randn(5, 8)).shape
        torch.Size([2, 5, 3])
        >>> w = Gates(8, 3, 2, grouped_input=True)(torch.randn(2, 5, 8))
        >>> bool(torch.allclose(w.sum(-1), torch.ones(2, 5)))
        True
    """

    def __init__(self, in_features: int, num_choices: int, num_gates: int = 1, grouped_input: bool = False,
                 zero_rows: int = 0, fused: bool | None = None) -> None:
        super().__init__()
        self.fused = cpu_gemm.backend() == "onednn" if fused is None else bool(fused)
        if not 0 <= zero_rows < in_features:
            raise ValueError(f"Gates: zero_rows must be in [0, {in_features}), got {zero_rows}")
        self.zero_rows = zero_rows
        self.grouped_input = grouped_input
        self.in_features, self.num_choices, self.num_gates = in_features, num_choices, num_gates
        # Stored in the layout its GEMM reads: D x (G*E) for a shared input, G x D x E grouped.
        if grouped_input:
            self.weight = nn.Parameter(torch.empty(num_gates, in_features, num_choices))
            self.bias = nn.Parameter(torch.empty(num_gates, 1, num_choices))
        else:
            self.weight = nn.Parameter(torch.empty(in_features, num_gates * num_choices))
            self.bias = nn.Parameter(torch.empty(1, num_gates * num_choices))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_in = self.in_features - self.zero_rows
        bound = 1.0 / math.sqrt(fan_in)
        uniform_rows_(self.weight, fan_in, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def padding_numel(self) -> int:
        """Entries of the zero padding rows (structural zeros, not model parameters)."""
        return self.zero_rows * self.weight.numel() // self.weight.shape[-2]

    def gate_parameters(self, gate: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of gate ``gate``'s ``D x E`` weight (without the zero padding rows) and ``E`` bias."""
        rows, e = self.in_features - self.zero_rows, self.num_choices
        if self.grouped_input:
            return self.weight[gate, :rows], self.bias[gate, 0]
        cols = slice(gate * e, (gate + 1) * e)
        return self.weight[:rows, cols], self.bias[0, cols]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``B x D`` (or ``G x B x D`` with ``grouped_input``) -> ``G x B x E`` scores."""
        if self.fused:
            z = expert_linear(x, self.weight, self.bias)  # B x (G*E), or G x B x E grouped
        elif self.grouped_input:
            z = torch.baddbmm(self.bias, x, self.weight)  # G x B x E
        else:
            z = torch.addmm(self.bias, x, self.weight)  # B x (G*E)
        if self.grouped_input:
            return z
        return z.view(x.shape[0], self.num_gates, self.num_choices).transpose(0, 1)  # G x B x E

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)  # G x B x E
