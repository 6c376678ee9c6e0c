"""Cross-stitch networks (Misra et al., CVPR'16), a baseline of the PLE paper (Fig. 1f).

Every task has its own MLP column on the shared embeddings. After each layer ``l`` a
cross-stitch unit mixes the columns' activations with learnable weights,
``h̃^l_t = Σ_s α^l_{ts} h^l_s``, and the next layer of column ``t`` reads ``h̃^l_t``. ``α`` starts
near identity (``self_weight`` on the diagonal, as the paper's ``α_S``/``α_D`` initialisation), so at
``self_weight=1`` the model is ``T`` separate columns. The combination weights are the same for
every sample (the static sharing PLE contrasts with its gates).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.modules.cross_stitch import CrossStitchUnit, TaskColumns
from recsys_mtl.modules.embeddings import SparseDenseInput
from recsys_mtl.modules.mlp import Tower


class CrossStitch(nn.Module):
    """Per-task columns mixed by a cross-stitch unit after every layer.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): shared tables.
        dense_in_features (int): number of dense features ``F``.
        tasks (Sequence[str]): task names.
        bottom_layer_sizes (Sequence[int]): each column's layer widths.
        tower_layer_sizes (Sequence[int]): tower hidden widths.
        self_weight (float): initial diagonal of every ``α`` (off-diagonals share the rest).

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> s = tiny_schema()
        >>> m = CrossStitch(build_ebc(s, 4), len(s.dense), s.task_names, [8, 8], [4])
        >>> b = tiny_batch(s, batch_size=3)
        >>> m(b.dense, b.sparse)["like"].shape
        torch.Size([3])
        >>> m.stitches[0].alpha.detach()  # near identity at init
        tensor([[0.9000, 0.1000],
                [0.1000, 0.9000]])
    """

    def __init__(
        self,
        embedding_bag_collection: nn.Module,
        dense_in_features: int,
        tasks: Sequence[str],
        bottom_layer_sizes: Sequence[int],
        tower_layer_sizes: Sequence[int],
        self_weight: float = 0.9,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.input = SparseDenseInput(embedding_bag_collection, dense_in_features)
        t = len(self.tasks)
        self.columns = TaskColumns(self.input.out_features, bottom_layer_sizes, t, zero_rows=self.input.padding)
        self.stitches = nn.ModuleList([CrossStitchUnit(t, self_weight) for _ in bottom_layer_sizes])
        self.towers = nn.ModuleDict({task: Tower(self.columns.out_features, tower_layer_sizes) for task in self.tasks})

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        h = self.input(dense, sparse)  # B x D
        for i, stitch in enumerate(self.stitches):
            h = stitch(self.columns.layer(i, h))  # T x B x H_i
        return {t: self.towers[t](h[k]) for k, t in enumerate(self.tasks)}
