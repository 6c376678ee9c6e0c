"""Plain MLP blocks and towers."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from recsys_mtl.modules.activations import ReLU
from recsys_mtl.ops import cpu_gemm
from recsys_mtl.ops.fused_expert import expert_linear

MIN_FUSED_OUT = 16
"""A :class:`Linear` narrower than this stays on ``F.linear``: for a 64 -> 3 or 64 -> 1 layer (a gate's
or a tower's last) oneDNN's call costs more than MKL's GEMM (2026-12-02, B = 4096: 0.18 vs 0.04 ms)."""


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, initialisation and state dict) whose float32 CPU GEMMs go to
    oneDNN where :func:`recsys_mtl.ops.cpu_gemm.backend` is ``"onednn"``: the forward is
    :func:`~recsys_mtl.ops.fused_expert.expert_linear` of the ``K x N`` view of the weight.

    STEM-Net's gate MLPs are most of W2's GEMM FLOPs (B = 4096, 1664 -> 128): measured 2026-12-02 on the
    2-core AMD EPYC, forward 27 vs 10 ms, input gradient 24 vs 13 ms, weight gradient 26 vs 15 ms.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        fused (bool | None): take the op; None: where the backend is oneDNN and ``out_features >=``
            :data:`MIN_FUSED_OUT` (read here, once, so ``torch.fx`` traces one path).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fused: bool | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if fused is None:
            fused = out_features >= MIN_FUSED_OUT and cpu_gemm.backend() == "onednn"
        self.fused = bool(fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super().forward(x)
        y = expert_linear(x.reshape(-1, self.in_features), self.weight.t(), self.bias)  # rows x N
        return y.view(x.shape[:-1] + (self.out_features,))  # ... x N


class PaddedLinear(Linear):
    """:class:`Linear` whose last ``zero_rows`` input features are zero padding
    (:class:`~recsys_mtl.modules.embeddings.SparseDenseInput`).

    Their weight columns start at zero and stay there (zero inputs: zero gradients, zero updates),
    so the layer computes the function of an ``in_features - zero_rows`` wide ``nn.Linear``; the
    other weights and the bias are initialised exactly as that layer's would be (same shapes, same
    random draws).

    Example::

        >>> torch.manual_seed(0); plain = nn.Linear(3, 2)  # doctest: +ELLIPSIS
        <...>
        >>> torch.manual_seed(0); padded = PaddedLinear(4, 2, zero_rows=1)  # doctest: +ELLIPSIS
        <...>
        >>> bool(torch.equal(padded.weight[:, :3], plain.weight)), padded.weight[:, 3].abs().sum().item()
        (True, 0.0)
    """

    def __init__(self, in_features: int, out_features: int, zero_rows: int = 0, bias: bool = True,
                 fused: bool | None = None) -> None:
        if not 0 <= zero_rows < in_features:
            raise ValueError(f"PaddedLinear: zero_rows must be in [0, {in_features}), got {zero_rows}")
        self.zero_rows = zero_rows  # read by reset_parameters, which nn.Linear's __init__ calls
        super().__init__(in_features, out_features, bias=bias, fused=fused)

    def reset_parameters(self) -> None:
        if not self.zero_rows:
            return super().reset_parameters()
        fan_in = self.in_features - self.zero_rows
        real = torch.empty(self.out_features, fan_in, dtype=self.weight.dtype, device=self.weight.device)
        nn.init.kaiming_uniform_(real, a=math.sqrt(5))  # nn.Linear's init of an out x fan_in weight
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, :fan_in].copy_(real)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def padding_numel(self) -> int:
        """Entries of the zero padding columns (structural zeros, not model parameters)."""
        return self.zero_rows * self.out_features

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, zero_rows={self.zero_rows}"


def linear(in_features: int, out_features: int, zero_rows: int = 0) -> nn.Linear:
    """:class:`Linear`, or :class:`PaddedLinear` when the input has zero padding columns."""
    return PaddedLinear(in_features, out_features, zero_rows) if zero_rows else Linear(in_features, out_features)


class MLP(nn.Sequential):
    """Linear + ReLU stack; every layer, including the last, is followed by ReLU
    (:class:`~recsys_mtl.modules.activations.ReLU`: its compiled backward reads the saved output).

    Args:
        in_features (int): input width ``D``.
        layer_sizes (Sequence[int]): output widths of the layers.
        dropout (float): dropout after each activation (0 disables).
        zero_rows (int): zero padding columns at the end of the input (see :class:`PaddedLinear`).

    Example::

        >>> MLP(8, [16, 4])(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(self, in_features: int, layer_sizes: Sequence[int], dropout: float = 0.0, zero_rows: int = 0) -> None:
        layers: list[nn.Module] = []
        for i, size in enumerate(layer_sizes):
            layers += [linear(in_features, size, zero_rows if i == 0 else 0), ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = size
        super().__init__(*layers)
        self.out_features = in_features


class Tower(nn.Module):
    """Task tower: MLP followed by a Linear to one logit.

    Args:
        in_features (int): input width ``D``.
        layer_sizes (Sequence[int]): hidden widths before the output layer.
        zero_rows (int): zero padding columns at the end of the input (see :class:`PaddedLinear`).

    Example::

        >>> Tower(8, [4])(torch.randn(3, 8)).shape
        torch.Size([3])
    """

    def __init__(self, in_features: int, layer_sizes: Sequence[int], zero_rows: int = 0) -> None:
        super().__init__()
        self.mlp = MLP(in_features, layer_sizes, zero_rows=zero_rows)
        self.out = linear(self.mlp.out_features, 1, 0 if layer_sizes else zero_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(x)).squeeze(-1)  # B
