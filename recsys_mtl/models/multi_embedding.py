"""Multi-embedding baselines of STEM-Net (Su et al., AAAI'24, "Comparison of Gating Networks").

- **ME-MMoE**: MMoE with an independent table set per expert. Its gates are MMoE's *All
  Forward All Backward*: every task tower mixes every expert and back-propagates into every
  expert and hence into every expert's tables, so no table set becomes task-specific.
- **ME-PLE**: PLE with one table set per task (read by that task's expert group) and one for
  the shared experts. Its gates are PLE's *Task-specific Forward Task-specific Backward*: task
  ``k``'s tower mixes only its own and the shared experts. With one level (CGC) task ``k``'s
  loss never reaches another task's tables; with more levels it reaches them through the lower
  levels' shared gate (which mixes all experts), exactly as PLE's routing.

Each table set is a separate ``EmbeddingBagCollection`` (sharded independently).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.models.ple import extraction_levels
from recsys_mtl.modules.experts import Experts
from recsys_mtl.modules.gates import Gates
from recsys_mtl.modules.mlp import Tower
from recsys_mtl.modules.multi_embedding import TableSetInputs


class MEMMoE(nn.Module):
    """Multi-Embedding MMoE: expert ``i`` reads its own table set ``x_i``.

    Each task's gate is MMoE's ``softmax(W_k x̄ + b_k)`` on the mean of the experts' inputs
    ``x̄ = (1/E) Σ_i x_i`` (there is no single shared embedding; the mean keeps the gate's width and
    lets every table set inform every gate).

    Args:
        expert_embedding_bag_collections (Sequence[EmbeddingBagCollection]): one table set per
            expert ``E``, each covering every feature.
        dense_in_features (int): number of dense features ``F``.
        tasks (Sequence[str]): task names.
        expert_layer_sizes (Sequence[int]): each expert's MLP widths.
        tower_layer_sizes (Sequence[int]): tower hidden widths.

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> s = tiny_schema()
        >>> m = MEMMoE([build_ebc(s, 4, prefix=f"expert_{i}") for i in range(3)], len(s.dense),
        ...            s.task_names, expert_layer_sizes=[8], tower_layer_sizes=[4])
        >>> b = tiny_batch(s, batch_size=3)
        >>> m(b.dense, b.sparse)["like"].shape
        torch.Size([3])
    """

    def __init__(
        self,
        expert_embedding_bag_collections: Sequence[nn.Module],
        dense_in_features: int,
        tasks: Sequence[str],
        expert_layer_sizes: Sequence[int],
        tower_layer_sizes: Sequence[int],
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        num_experts = len(expert_embedding_bag_collections)
        self.input = TableSetInputs(
            {f"expert_{i}": ebc for i, ebc in enumerate(expert_embedding_bag_collections)}, dense_in_features
        )
        d = self.input.out_features
        self.experts = Experts(d, expert_layer_sizes, 1, num_groups=num_experts, grouped_input=True)
        self.gates = Gates(d, num_experts, len(self.tasks))
        h = self.experts.out_features
        self.towers = nn.ModuleDict({t: Tower(h, tower_layer_sizes) for t in self.tasks})

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        x, _ = self.input(dense, sparse)  # E x B x D
        experts = self.experts(x)  # E x B x H, expert i on its own tables
        weights = self.gates(x.mean(0))  # T x B x E
        mixed = torch.einsum("tbe,ebh->tbh", weights, experts)  # T x B x H
        return {t: self.towers[t](mixed[k]) for k, t in enumerate(self.tasks)}


class MEPLE(nn.Module):
    """Multi-Embedding PLE: task ``k``'s expert group reads ``x_k``, the shared experts ``x_s``.

    Level 1 is PLE's extraction layer with per-task inputs: task ``k``'s experts and gate read
    ``x_k`` (its table set ⊕ dense), the shared experts and shared gate read ``x_s``; later levels
    are PLE's. A task table set may cover only some features; the others come from the shared
    set (as STEM-Net's task-specific field selection).

    Args:
        shared_embedding_bag_collection (EmbeddingBagCollection): the shared experts' tables.
        task_embedding_bag_collections (dict[str, EmbeddingBagCollection]): one table set per
            task; keys are the task names in order.
        dense_in_features (int): number of dense features ``F``.
        num_levels (int): extraction levels (1 = ME-CGC).
        num_task_experts (int): task-specific experts per task and level.
        num_shared_experts (int): shared experts per level.
        expert_layer_sizes (Sequence[int]): each expert's MLP widths.
        tower_layer_sizes (Sequence[int]): tower hidden widths.

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> s = tiny_schema()
        >>> m = MEPLE(build_ebc(s, 4, prefix="shared"), {t: build_ebc(s, 4, prefix=t) for t in s.task_names},
        ...           len(s.dense), num_levels=2, num_task_experts=1, num_shared_experts=1,
        ...           expert_layer_sizes=[8], tower_layer_sizes=[4])
        >>> b = tiny_batch(s, batch_size=3)
        >>> m(b.dense, b.sparse)["click"].shape
        torch.Size([3])
    """

    def __init__(
        self,
        shared_embedding_bag_collection: nn.Module,
        task_embedding_bag_collections: dict[str, nn.Module],
        dense_in_features: int,
        num_levels: int,
        num_task_experts: int,
        num_shared_experts: int,
        expert_layer_sizes: Sequence[int],
        tower_layer_sizes: Sequence[int],
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"MEPLE needs num_levels >= 1, got {num_levels}")
        self.tasks = list(task_embedding_bag_collections)
        self.input = TableSetInputs(task_embedding_bag_collections, dense_in_features, shared_embedding_bag_collection)
        self.levels, d = extraction_levels(
            self.input.out_features, len(self.tasks), num_levels, num_task_experts, num_shared_experts,
            expert_layer_sizes, first_level_grouped=True,
        )
        self.towers = nn.ModuleDict({t: Tower(d, tower_layer_sizes) for t in self.tasks})

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        task_x, shared_x = self.input(dense, sparse)  # T x B x D, B x D
        for level in self.levels:
            task_x, shared_x = level(task_x, shared_x)  # T x B x H, B x H
        return {t: self.towers[t](task_x[k]) for k, t in enumerate(self.tasks)}
