"""MMoE and OMoE (Ma et al., KDD'18): shared experts mixed by per-task (or one) softmax gates."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.modules.embeddings import SparseDenseInput
from recsys_mtl.modules.experts import Experts
from recsys_mtl.modules.gates import Gates
from recsys_mtl.modules.mlp import Tower


class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts: ``f_k(x) = sum_i g_k(x)_i e_i(x)``, ``g_k = softmax(W_k x)``.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): shared tables.
        dense_in_features (int): number of dense features ``F``.
        tasks (Sequence[str]): task names.
        num_experts (int): shared experts ``E``.
        expert_layer_sizes (Sequence[int]): each expert's MLP widths.
        tower_layer_sizes (Sequence[int]): tower hidden widths.
        one_gate (bool): OMoE: a single gate shared by every task.

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> s = tiny_schema()
        >>> m = MMoE(build_ebc(s, 4), len(s.dense), s.task_names, 3, [8], [4])
        >>> b = tiny_batch(s, batch_size=3)
        >>> m(b.dense, b.sparse)["like"].shape
        torch.Size([3])
    """

    def __init__(
        self,
        embedding_bag_collection: nn.Module,
        dense_in_features: int,
        tasks: Sequence[str],
        num_experts: int,
        expert_layer_sizes: Sequence[int],
        tower_layer_sizes: Sequence[int],
        one_gate: bool = False,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.one_gate = one_gate
        self.input = SparseDenseInput(embedding_bag_collection, dense_in_features)
        d = self.input.out_features
        self.experts = Experts(d, expert_layer_sizes, num_experts, zero_rows=self.input.padding)
        self.gates = Gates(d, num_experts, 1 if one_gate else len(self.tasks), zero_rows=self.input.padding)
        h = self.experts.out_features
        self.towers = nn.ModuleDict({t: Tower(h, tower_layer_sizes) for t in self.tasks})

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        x = self.input(dense, sparse)  # B x D
        experts = self.experts(x)  # E x B x H
        weights = self.gates(x)  # G x B x E
        mixed = torch.einsum("gbe,ebh->gbh", weights, experts)  # G x B x H
        return {t: self.towers[t](mixed[0 if self.one_gate else k]) for k, t in enumerate(self.tasks)}


class OMoE(MMoE):
    """One-gate Mixture-of-Experts (MMoE paper's OMoE baseline)."""

    def __init__(
        self,
        embedding_bag_collection: nn.Module,
        dense_in_features: int,
        tasks: Sequence[str],
        num_experts: int,
        expert_layer_sizes: Sequence[int],
        tower_layer_sizes: Sequence[int],
    ) -> None:
        super().__init__(
            embedding_bag_collection, dense_in_features, tasks, num_experts,
            expert_layer_sizes, tower_layer_sizes, one_gate=True,
        )
