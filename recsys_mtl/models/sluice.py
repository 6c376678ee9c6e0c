"""Sluice networks (Ruder et al., AAAI'19), a baseline of the PLE paper (Fig. 1g).

A generalisation of cross-stitch networks: each task column's layer output is split into
``G`` subspaces, and after every layer one ``α`` matrix of size ``TG x TG`` mixes all tasks'
subspaces (``h̃^l_{t,g} = Σ_{s,g'} α^l_{(t,g),(s,g')} h^l_{s,g'}``), so the model can learn to share
only parts of a layer. Each task's tower reads a β-weighted combination of *all* its layers'
(mixed) outputs (the paper's hierarchical skip connections). Layer widths may differ here, so
the β-scaled outputs are concatenated (``concat_l β_{t,l} h̃^l_t``) rather than summed.

Not included: the paper's subspace-orthogonality penalty ``‖G_{t,1}ᵀ G_{t,2}‖²_F``; it acts on
activations, and models here return only logits.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.modules.cross_stitch import CrossStitchUnit, LayerWeights, TaskColumns
from recsys_mtl.modules.embeddings import SparseDenseInput
from recsys_mtl.modules.mlp import Tower


class Sluice(nn.Module):
    """Sluice network: per-task columns, subspace-level α mixing, β skip weights.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): shared tables.
        dense_in_features (int): number of dense features ``F``.
        tasks (Sequence[str]): task names.
        bottom_layer_sizes (Sequence[int]): each column's layer widths (each divisible by
            ``num_subspaces``).
        tower_layer_sizes (Sequence[int]): tower hidden widths.
        num_subspaces (int): subspaces ``G`` per layer.
        self_weight (float): initial diagonal of every ``α`` (1.0 = separate columns).

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> s = tiny_schema()
        >>> m = Sluice(build_ebc(s, 4), len(s.dense), s.task_names, [8, 4], [4], num_subspaces=2)
        >>> b = tiny_batch(s, batch_size=3)
        >>> m(b.dense, b.sparse)["like"].shape, m.towers["like"].mlp[0].in_features  # 8 + 4
        (torch.Size([3]), 12)
    """

    def __init__(
        self,
        embedding_bag_collection: nn.Module,
        dense_in_features: int,
        tasks: Sequence[str],
        bottom_layer_sizes: Sequence[int],
        tower_layer_sizes: Sequence[int],
        num_subspaces: int = 2,
        self_weight: float = 0.9,
    ) -> None:
        super().__init__()
        bad = [h for h in bottom_layer_sizes if h % num_subspaces]
        if num_subspaces < 1 or bad:
            raise ValueError(f"every bottom layer width must be divisible by num_subspaces={num_subspaces}; got {bad}")
        self.tasks = list(tasks)
        self.num_subspaces = num_subspaces
        self.input = SparseDenseInput(embedding_bag_collection, dense_in_features)
        t = len(self.tasks)
        self.columns = TaskColumns(self.input.out_features, bottom_layer_sizes, t, zero_rows=self.input.padding)
        self.stitches = nn.ModuleList([CrossStitchUnit(t * num_subspaces, self_weight) for _ in bottom_layer_sizes])
        self.layer_weights = LayerWeights(t, len(bottom_layer_sizes))
        self.towers = nn.ModuleDict({task: Tower(sum(bottom_layer_sizes), tower_layer_sizes) for task in self.tasks})

    def _mix(self, stitch: CrossStitchUnit, h: torch.Tensor) -> torch.Tensor:
        t, g = len(self.tasks), self.num_subspaces
        bsz, width = h.shape[1], h.shape[2]
        sub = h.view(t, bsz, g, width // g).transpose(1, 2).reshape(t * g, bsz, width // g)  # (T*G) x B x H/G
        mixed = stitch(sub)  # (T*G) x B x H/G
        return mixed.view(t, g, bsz, width // g).transpose(1, 2).reshape(t, bsz, width)  # T x B x H

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        h = self.input(dense, sparse)  # B x D
        outputs = []
        for i, stitch in enumerate(self.stitches):
            h = self._mix(stitch, self.columns.layer(i, h))  # T x B x H_i
            outputs.append(h)
        z = self.layer_weights(outputs)  # T x B x ΣH_l
        return {t: self.towers[t](z[k]) for k, t in enumerate(self.tasks)}
