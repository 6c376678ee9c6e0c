"""Plain MLP blocks and towers."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class MLP(nn.Sequential):
    """Linear + ReLU stack; every layer, including the last, is followed by ReLU.

    Args:
        in_features (int): input width ``D``.
        layer_sizes (Sequence[int]): output widths of the layers.
        dropout (float): dropout after each activation (0 disables).

    Example::

        >>> MLP(8, [16, 4])(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(self, in_features: int, layer_sizes: Sequence[int], dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        for size in layer_sizes:
            layers += [nn.Linear(in_features, size), nn.ReLU()]
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

    Example::

        >>> Tower(8, [4])(torch.randn(3, 8)).shape
        torch.Size([3])
    """

    def __init__(self, in_features: int, layer_sizes: Sequence[int]) -> None:
        super().__init__()
        self.mlp = MLP(in_features, layer_sizes)
        self.out = nn.Linear(self.mlp.out_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(x)).squeeze(-1)  # B
