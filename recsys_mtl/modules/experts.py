"""E experts evaluated as one batched op.

Mixture-of-experts models run many small MLPs of identical shape. Running them as a python
loop of ``nn.Linear`` costs E separate GEMMs per layer plus as many kernel launches; here all
experts' weights of a layer live in one ``E x D_in x D_out`` tensor and one (b)mm runs them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class Experts(nn.Module):
    """``num_groups x num_experts`` MLP experts with identical layer sizes, ReLU after each layer.

    Experts are arranged in groups; with ``grouped_input`` group ``g`` reads ``x[g]`` (``G x B x D``),
    otherwise every expert reads the same ``B x D`` input and the first layer is one wide GEMM.
    The input layout is fixed at construction so the module stays ``torch.fx``-traceable (TorchRec's
    train pipelines trace the model).

    Args:
        in_features (int): input width ``D``.
        layer_sizes (Sequence[int]): widths of each expert's layers; output width ``H`` is the last.
        num_experts (int): experts per group ``n``.
        num_groups (int): groups ``G``; total experts ``E = G * n``.
        grouped_input (bool): input is ``G x B x D`` (one slice per group) instead of ``B x D``.

    Example::

        >>> Experts(8, [16, 4], num_experts=3, num_groups=2)(torch.randn(5, 8)).shape
        torch.Size([6, 5, 4])
        >>> Experts(8, [16, 4], 3, 2, grouped_input=True)(torch.randn(2, 5, 8)).shape
        torch.Size([6, 5, 4])
    """

    def __init__(
        self,
        in_features: int,
        layer_sizes: Sequence[int],
        num_experts: int,
        num_groups: int = 1,
        grouped_input: bool = False,
    ) -> None:
        super().__init__()
        if num_experts <= 0 or num_groups <= 0 or not layer_sizes:
            raise ValueError("Experts needs num_experts >= 1, num_groups >= 1 and >= 1 layer")
        self.num_experts = num_experts
        self.num_groups = num_groups
        self.grouped_input = grouped_input
        self.in_features = in_features
        self.out_features = layer_sizes[-1]
        e = num_experts * num_groups
        sizes = [in_features, *layer_sizes]
        self.num_layers = len(layer_sizes)
        self._sizes = sizes
        n, g = num_experts, num_groups
        # First layer stored in the layout its GEMM reads, so no per-step permute copy and
        # gradients match the parameter's strides (DDP buckets): D x (E*H1) for a shared input,
        # G x D x (n*H1) for grouped input. Later layers: E x H_in x H_out for bmm.
        if grouped_input:
            self.weight_0 = nn.Parameter(torch.empty(g, sizes[0], n * sizes[1]))
            self.bias_0 = nn.Parameter(torch.empty(g, 1, n * sizes[1]))
        else:
            self.weight_0 = nn.Parameter(torch.empty(sizes[0], e * sizes[1]))
            self.bias_0 = nn.Parameter(torch.empty(1, e * sizes[1]))
        # Registered directly (not in a ParameterList) so DistributedModelParallel's meta-device
        # initialisation, which calls reset_parameters() on the module owning them, reaches them.
        for i in range(1, self.num_layers):
            self.register_parameter(f"weight_{i}", nn.Parameter(torch.empty(e, sizes[i], sizes[i + 1])))
            self.register_parameter(f"bias_{i}", nn.Parameter(torch.empty(e, 1, sizes[i + 1])))
        self.reset_parameters()

    @property
    def total_experts(self) -> int:
        return self.num_experts * self.num_groups

    def reset_parameters(self) -> None:
        # nn.Linear's default init, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        for i in range(self.num_layers):
            bound = 1.0 / math.sqrt(self._sizes[i])
            nn.init.uniform_(getattr(self, f"weight_{i}"), -bound, bound)
            nn.init.uniform_(getattr(self, f"bias_{i}"), -bound, bound)

    def expert_index(self, layer: int, expert: int) -> tuple[tuple, tuple]:
        """Indices of one expert's ``D_in x D_out`` weight and ``D_out`` bias inside the
        parameters ``weight_{layer}`` / ``bias_{layer}`` (apply them to ``.grad`` too)."""
        d_out = self._sizes[layer + 1]
        if layer > 0:
            return (expert,), (expert, 0)
        if self.grouped_input:
            grp, j = divmod(expert, self.num_experts)
            cols = slice(j * d_out, (j + 1) * d_out)
            return (grp, slice(None), cols), (grp, 0, cols)
        cols = slice(expert * d_out, (expert + 1) * d_out)
        return (slice(None), cols), (0, cols)

    def expert_parameters(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one expert's ``D_in x D_out`` weight and ``D_out`` bias."""
        wi, bi = self.expert_index(layer, expert)
        return getattr(self, f"weight_{layer}")[wi], getattr(self, f"bias_{layer}")[bi]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x (torch.Tensor): ``B x D``, or ``G x B x D`` with ``grouped_input``.

        Returns:
            torch.Tensor: ``E x B x H`` expert outputs, group-major (group 0's experts first).
        """
        e, n, g = self.total_experts, self.num_experts, self.num_groups
        d_out = self._sizes[1]
        if not self.grouped_input:
            bsz = x.shape[0]
            h = torch.addmm(self.bias_0, x, self.weight_0)  # B x (E*H1)
            h = h.view(bsz, e, d_out).transpose(0, 1)  # E x B x H1
        else:
            bsz = x.shape[1]
            h = torch.baddbmm(self.bias_0, x, self.weight_0)  # G x B x (n*H1)
            h = h.view(g, bsz, n, d_out).transpose(1, 2).reshape(e, bsz, d_out)  # E x B x H1
        h = torch.relu(h)
        for i in range(1, self.num_layers):
            w, b = getattr(self, f"weight_{i}"), getattr(self, f"bias_{i}")
            h = torch.relu(torch.baddbmm(b, h, w))  # E x B x H_next
        return h
