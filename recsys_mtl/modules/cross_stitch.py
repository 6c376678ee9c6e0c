"""Cross-stitch units and per-task layer columns (cross-stitch / sluice networks)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from recsys_mtl.modules.experts import Experts


class CrossStitchUnit(nn.Module):
    """Learnable linear mixing of ``C`` channels: ``out_i = Σ_j α_ij h_j`` (Misra et al., CVPR'16).

    Channels are tasks (cross-stitch) or task subspaces (sluice). ``α`` starts near identity:
    ``self_weight`` on the diagonal, the rest ``(1 - self_weight) / (C - 1)`` (rows sum to 1).

    Args:
        num_channels (int): channels ``C``.
        self_weight (float): initial diagonal of ``α`` (1.0 = separate columns).

    Example::

        >>> unit = CrossStitchUnit(2, self_weight=1.0)
        >>> h = torch.randn(2, 5, 3)
        >>> bool(torch.equal(unit(h), h))
        True
    """

    def __init__(self, num_channels: int, self_weight: float = 0.9) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.self_weight = self_weight
        self.alpha = nn.Parameter(torch.empty(num_channels, num_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        c = self.num_channels
        off = (1.0 - self.self_weight) / (c - 1) if c > 1 else 0.0
        with torch.no_grad():
            self.alpha.fill_(off)
            self.alpha.fill_diagonal_(self.self_weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h``: ``C x B x H`` -> ``C x B x H``."""
        return torch.einsum("ij,jbh->ibh", self.alpha, h)  # C x B x H


class TaskColumns(nn.Module):
    """``T`` parallel MLP columns evaluated layer by layer (Linear + ReLU per layer).

    Layer 0 reads one shared ``B x D`` input (one wide GEMM for all columns); layer ``l > 0``
    reads ``T x B x H_{l-1}``, column ``t`` its own slice. Call :meth:`layer` per layer so
    stitching units can sit between layers.

    Args:
        in_features (int): input width ``D``.
        layer_sizes (Sequence[int]): widths of each column's layers.
        num_tasks (int): columns ``T``.
        zero_rows (int): zero padding columns at the end of the input (layer 0's; see
            :class:`~recsys_mtl.modules.experts.Experts`).

    Example::

        >>> cols = TaskColumns(6, [8, 4], num_tasks=2)
        >>> h = cols.layer(0, torch.randn(5, 6))  # T x B x H_0
        >>> cols.layer(1, h).shape
        torch.Size([2, 5, 4])
    """

    def __init__(self, in_features: int, layer_sizes: Sequence[int], num_tasks: int, zero_rows: int = 0) -> None:
        super().__init__()
        if not layer_sizes:
            raise ValueError("TaskColumns needs at least one layer")
        sizes = [in_features, *layer_sizes]
        self.layers = nn.ModuleList(
            [Experts(sizes[0], [sizes[1]], num_experts=num_tasks, zero_rows=zero_rows)]
            + [
                Experts(sizes[i], [sizes[i + 1]], 1, num_groups=num_tasks, grouped_input=True)
                for i in range(1, len(layer_sizes))
            ]
        )
        self.num_layers = len(layer_sizes)
        self.out_features = sizes[-1]

    def layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer ``i``: ``B x D`` (``i = 0``) or ``T x B x H_{i-1}`` -> ``T x B x H_i``."""
        return self.layers[i](h)

    def column_parameters(self, layer: int, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of column ``task``'s weight ``H_in x H_out`` and bias ``H_out`` at ``layer``."""
        return self.layers[layer].expert_parameters(0, task)


class LayerWeights(nn.Module):
    """Per-task scalar weights ``β_{t,l}`` over ``L`` layer outputs (sluice networks' skip mixing).

    Args:
        num_tasks (int): tasks ``T``.
        num_layers (int): layers ``L``.
        init (float): initial value of every ``β``.

    Example::

        >>> LayerWeights(2, 3).beta.shape
        torch.Size([2, 3])
    """

    def __init__(self, num_tasks: int, num_layers: int, init: float = 1.0) -> None:
        super().__init__()
        self.init = init
        self.beta = nn.Parameter(torch.empty(num_tasks, num_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.beta, self.init)

    def forward(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """``L`` tensors ``T x B x H_l`` -> ``T x B x ΣH_l``: each layer scaled by its ``β_{t,l}``, concatenated."""
        return torch.cat(
            [self.beta[:, i].view(-1, 1, 1) * h for i, h in enumerate(outputs)], dim=2  # T x 1 x 1 * T x B x H_l
        )  # T x B x ΣH_l
