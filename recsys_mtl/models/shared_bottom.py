"""Shared-Bottom (hard parameter sharing; Caruana 1997) and the single-task baseline."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.modules.embeddings import SparseDenseInput
from recsys_mtl.modules.mlp import MLP, Tower


class SharedBottom(nn.Module):
    """Shared embeddings and bottom MLP, one tower per task.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): shared tables.
        dense_in_features (int): number of dense features ``F``.
        tasks (Sequence[str]): task names; the output dict's keys.
        bottom_layer_sizes (Sequence[int]): shared MLP widths.
        tower_layer_sizes (Sequence[int]): hidden widths of each tower.

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> s = tiny_schema()
        >>> m = SharedBottom(build_ebc(s, 4), len(s.dense), s.task_names, [8], [4])
        >>> b = tiny_batch(s, batch_size=3)
        >>> {k: v.shape for k, v in m(b.dense, b.sparse).items()}
        {'click': torch.Size([3]), 'like': torch.Size([3])}
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
        self.tasks = list(tasks)
        self.input = SparseDenseInput(embedding_bag_collection, dense_in_features)
        self.bottom = MLP(self.input.out_features, bottom_layer_sizes, zero_rows=self.input.padding)
        self.towers = nn.ModuleDict({t: Tower(self.bottom.out_features, tower_layer_sizes) for t in self.tasks})

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        h = self.bottom(self.input(dense, sparse))  # B x H
        return {t: self.towers[t](h) for t in self.tasks}


class SingleTask(nn.Module):
    """Independent single-task models trained side by side: each task has its own tables,
    bottom MLP and tower, so no parameter (and no gradient) is shared between tasks.

    Args:
        task_embedding_bag_collections (dict[str, EmbeddingBagCollection]): one table set per task.
        dense_in_features (int): number of dense features ``F``.
        bottom_layer_sizes (Sequence[int]): per-task MLP widths.
        tower_layer_sizes (Sequence[int]): per-task tower hidden widths.

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> s = tiny_schema()
        >>> m = SingleTask({t: build_ebc(s, 4, prefix=t) for t in s.task_names}, len(s.dense), [8], [4])
        >>> b = tiny_batch(s, batch_size=3)
        >>> sorted(m(b.dense, b.sparse))
        ['click', 'like']
    """

    def __init__(
        self,
        task_embedding_bag_collections: dict[str, nn.Module],
        dense_in_features: int,
        bottom_layer_sizes: Sequence[int],
        tower_layer_sizes: Sequence[int],
    ) -> None:
        super().__init__()
        self.tasks = list(task_embedding_bag_collections)
        self.inputs = nn.ModuleDict(
            {t: SparseDenseInput(ebc, dense_in_features) for t, ebc in task_embedding_bag_collections.items()}
        )
        self.bottoms = nn.ModuleDict(
            {t: MLP(self.inputs[t].out_features, bottom_layer_sizes, zero_rows=self.inputs[t].padding) for t in self.tasks}
        )
        self.towers = nn.ModuleDict(
            {t: Tower(self.bottoms[t].out_features, tower_layer_sizes) for t in self.tasks}
        )

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        # Every table lookup first, then the dense parts: a compiled head is then one graph after
        # the lookups (each lookup is a graph break) instead of one graph per task.
        pooled = [self.inputs[t].lookup(sparse) for t in self.tasks]
        logits = {}
        for t, kt in zip(self.tasks, pooled):
            logits[t] = self.towers[t](self.bottoms[t](self.inputs[t].assemble(dense, kt)))  # B
        return logits
