"""Asymmetric and customized sharing: the hard-sharing structures proposed as baselines in the
PLE paper (Tang et al., RecSys'20, §3 and Fig. 1b–c).

- **Asymmetric sharing** (Fig. 1b): every task has its own bottom MLP on the shared embeddings;
  a task's bottom output is also fed to another task's tower, so representation flows one way.
  Here tasks are taken in order and task ``k ≥ 1``'s tower reads
  ``fuse(h_k, h_{k-1})`` (``concat``, ``sum`` or ``mean``, the fusions the paper names) while
  task 0's tower reads ``h_0`` alone: task ``k-1``'s loss never reaches task ``k``'s bottom,
  but task ``k``'s loss trains task ``k-1``'s bottom. Put the task that should *receive*
  knowledge after the one that provides it.
- **Customized sharing** (Fig. 1c): a shared bottom MLP plus one bottom MLP per task; task
  ``k``'s tower reads ``concat(h_shared, h_k)``.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.modules.embeddings import SparseDenseInput
from recsys_mtl.modules.mlp import MLP, Tower

Fusion = Literal["concat", "sum", "mean"]


class AsymmetricSharing(nn.Module):
    """Per-task bottoms; task ``k``'s tower also reads task ``k-1``'s bottom output.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): shared tables.
        dense_in_features (int): number of dense features ``F``.
        tasks (Sequence[str]): task names; knowledge flows from each task to the next.
        bottom_layer_sizes (Sequence[int]): each task's bottom MLP widths (output ``H``).
        tower_layer_sizes (Sequence[int]): tower hidden widths.
        fusion (str): ``"concat"`` (tower input ``2H``), ``"sum"`` or ``"mean"`` (``H``).

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> s = tiny_schema()
        >>> m = AsymmetricSharing(build_ebc(s, 4), len(s.dense), s.task_names, [8], [4])
        >>> b = tiny_batch(s, batch_size=3)
        >>> m(b.dense, b.sparse)["like"].shape
        torch.Size([3])
        >>> m.towers["click"].mlp[0].in_features, m.towers["like"].mlp[0].in_features
        (8, 16)
    """

    def __init__(
        self,
        embedding_bag_collection: nn.Module,
        dense_in_features: int,
        tasks: Sequence[str],
        bottom_layer_sizes: Sequence[int],
        tower_layer_sizes: Sequence[int],
        fusion: Fusion = "concat",
    ) -> None:
        super().__init__()
        if fusion not in ("concat", "sum", "mean"):
            raise ValueError(f"fusion must be concat/sum/mean, got {fusion!r}")
        if not bottom_layer_sizes:
            raise ValueError("AsymmetricSharing needs bottom_layer_sizes")
        self.tasks = list(tasks)
        self.fusion = fusion
        self.input = SparseDenseInput(embedding_bag_collection, dense_in_features)
        d = self.input.out_features
        self.bottoms = nn.ModuleDict({t: MLP(d, bottom_layer_sizes, zero_rows=self.input.padding) for t in self.tasks})
        h = bottom_layer_sizes[-1]
        fused = 2 * h if fusion == "concat" else h
        self.towers = nn.ModuleDict(
            {t: Tower(h if k == 0 else fused, tower_layer_sizes) for k, t in enumerate(self.tasks)}
        )

    def _fuse(self, own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        if self.fusion == "concat":
            return torch.cat([own, other], dim=1)  # B x 2H
        if self.fusion == "sum":
            return own + other  # B x H
        return 0.5 * (own + other)  # B x H

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        x = self.input(dense, sparse)  # B x D
        h = [self.bottoms[t](x) for t in self.tasks]  # T of B x H
        out = {self.tasks[0]: self.towers[self.tasks[0]](h[0])}
        for k in range(1, len(self.tasks)):
            out[self.tasks[k]] = self.towers[self.tasks[k]](self._fuse(h[k], h[k - 1]))
        return out


class CustomizedSharing(nn.Module):
    """Shared bottom + per-task bottoms; task ``k``'s tower reads ``concat(h_shared, h_k)``.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): shared tables.
        dense_in_features (int): number of dense features ``F``.
        tasks (Sequence[str]): task names.
        bottom_layer_sizes (Sequence[int]): widths of the shared and of each task's bottom MLP.
        tower_layer_sizes (Sequence[int]): tower hidden widths.

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> s = tiny_schema()
        >>> m = CustomizedSharing(build_ebc(s, 4), len(s.dense), s.task_names, [8], [4])
        >>> b = tiny_batch(s, batch_size=3)
        >>> m(b.dense, b.sparse)["click"].shape
        torch.Size([3])
    """

    def __init__(
        self,
        embedding_bag_collection: nn.Module,
        dense_in_features: int,
        tasks: Sequence[str],
        bottom_layer_sizes: Sequence[int],
        tower_layer_sizes: Sequence[int],
    ) -> None:
        super().__init__()
        if not bottom_layer_sizes:
            raise ValueError("CustomizedSharing needs bottom_layer_sizes")
        self.tasks = list(tasks)
        self.input = SparseDenseInput(embedding_bag_collection, dense_in_features)
        d = self.input.out_features
        self.shared_bottom = MLP(d, bottom_layer_sizes, zero_rows=self.input.padding)
        self.task_bottoms = nn.ModuleDict({t: MLP(d, bottom_layer_sizes, zero_rows=self.input.padding) for t in self.tasks})
        h = bottom_layer_sizes[-1]
        self.towers = nn.ModuleDict({t: Tower(2 * h, tower_layer_sizes) for t in self.tasks})

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        x = self.input(dense, sparse)  # B x D
        shared = self.shared_bottom(x)  # B x H
        return {t: self.towers[t](torch.cat([shared, self.task_bottoms[t](x)], dim=1)) for t in self.tasks}  # B x 2H in
