"""CGC and PLE (Tang et al., RecSys'20): task-specific + shared experts, progressive extraction.

Level ``j`` of PLE (Eq. 4–8 of the paper) holds, per task ``k``, ``num_task_experts`` experts
reading task ``k``'s branch input and ``num_shared_experts`` experts reading the shared branch.
Task ``k``'s gate (one Linear + softmax on its own branch input, Eq. 5) mixes its own and the
shared experts; the shared gate mixes *all* experts and is dropped at the last level. CGC is
PLE with one level.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.modules.embeddings import SparseDenseInput
from recsys_mtl.modules.experts import Experts
from recsys_mtl.modules.gates import Gates
from recsys_mtl.modules.mlp import Tower


class ExtractionLayer(nn.Module):
    """One CGC level (PLE Eq. 4–6, 8).

    Args:
        in_features (int): branch input width ``D``.
        num_tasks (int): tasks ``T``.
        num_task_experts (int): experts per task ``n``.
        num_shared_experts (int): shared experts ``m``.
        expert_layer_sizes (Sequence[int]): each expert's MLP widths (output ``H``).
        with_shared_gate (bool): compute the shared branch output (all but the last level).
        grouped_input (bool): task branches read ``T x B x D`` (levels after the first) instead
            of one ``B x D`` input shared by all branches (the first level).
        zero_rows (int): zero padding columns at the end of the input (the first level's;
            see :class:`~recsys_mtl.modules.embeddings.SparseDenseInput`).
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        num_task_experts: int,
        num_shared_experts: int,
        expert_layer_sizes: Sequence[int],
        with_shared_gate: bool,
        grouped_input: bool,
        zero_rows: int = 0,
    ) -> None:
        super().__init__()
        self.num_tasks, self.n, self.m = num_tasks, num_task_experts, num_shared_experts
        self.task_experts = Experts(
            in_features, expert_layer_sizes, num_task_experts, num_tasks, grouped_input=grouped_input,
            zero_rows=zero_rows,
        )
        self.shared_experts = Experts(in_features, expert_layer_sizes, num_shared_experts, zero_rows=zero_rows)
        self.task_gates = Gates(
            in_features, num_task_experts + num_shared_experts, num_tasks, grouped_input=grouped_input,
            zero_rows=zero_rows,
        )
        self.shared_gate = (
            Gates(in_features, num_tasks * num_task_experts + num_shared_experts, zero_rows=zero_rows)
            if with_shared_gate else None
        )
        self.out_features = self.task_experts.out_features

    def forward(
        self, task_inputs: torch.Tensor, shared_input: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Args:
            task_inputs (torch.Tensor): ``T x B x D`` per-task branch inputs, or ``B x D`` when
                every branch reads the same input (the first level).
            shared_input (torch.Tensor): ``B x D``.

        Returns:
            ``T x B x H`` task branch outputs and ``B x H`` shared branch output (None at the
            last level).
        """
        t, n, m = self.num_tasks, self.n, self.m
        task_out = self.task_experts(task_inputs)  # (T*n) x B x H
        shared_out = self.shared_experts(shared_input)  # m x B x H
        bsz, h = shared_out.shape[1], shared_out.shape[2]
        own = task_out.view(t, n, bsz, h)  # T x n x B x H
        # The gates keep their own GEMMs: merged into the experts' GEMM of the same input (their
        # weight columns concatenated to weight_0, one addmm, the output split) the W1 step was
        # 0.96x eager and 1.01x compiled (2026-12-02, shared 2-core machine, within the noise).
        weights = self.task_gates(task_inputs).unsqueeze(-1)  # T x B x (n+m) x 1
        # The mixtures contract over only n+m (or T*n+m) experts: a multiply-accumulate per expert
        # reads each expert output once, where an einsum would lower to thousands of tiny bmms
        # after permuting copies. Shared experts broadcast over T instead of being copied T times.
        task_mixed = weights[:, :, 0] * own[:, 0]  # T x B x H
        for i in range(1, n):
            task_mixed = task_mixed + weights[:, :, i] * own[:, i]  # T x B x H
        for j in range(m):
            task_mixed = task_mixed + weights[:, :, n + j] * shared_out[j]  # T x B x H
        shared_mixed = None
        if self.shared_gate is not None:
            w_s = self.shared_gate(shared_input)[0].unsqueeze(-1)  # B x (T*n+m) x 1
            shared_mixed = w_s[:, 0] * task_out[0]  # B x H
            for e in range(1, t * n):
                shared_mixed = shared_mixed + w_s[:, e] * task_out[e]  # B x H
            for j in range(m):
                shared_mixed = shared_mixed + w_s[:, t * n + j] * shared_out[j]  # B x H
        return task_mixed, shared_mixed


def extraction_levels(
    in_features: int,
    num_tasks: int,
    num_levels: int,
    num_task_experts: int,
    num_shared_experts: int,
    expert_layer_sizes: Sequence[int],
    first_level_grouped: bool,
    zero_rows: int = 0,
) -> tuple[nn.ModuleList, int]:
    """``num_levels`` stacked :class:`ExtractionLayer` (the shared gate dropped at the last level)
    and the output width. ``first_level_grouped``: the first level's task branches already read
    per-task inputs (ME-PLE's task tables) instead of one shared input (PLE). ``zero_rows``: zero
    padding columns of the first level's input."""
    levels, d = [], in_features
    for j in range(num_levels):
        level = ExtractionLayer(
            d, num_tasks, num_task_experts, num_shared_experts, expert_layer_sizes,
            with_shared_gate=j < num_levels - 1, grouped_input=first_level_grouped or j > 0,
            zero_rows=zero_rows if j == 0 else 0,
        )
        levels.append(level)
        d = level.out_features
    return nn.ModuleList(levels), d


class PLE(nn.Module):
    """Progressive Layered Extraction: ``num_levels`` stacked CGC levels, then towers (Eq. 7).

    Args:
        embedding_bag_collection (EmbeddingBagCollection): shared tables.
        dense_in_features (int): number of dense features ``F``.
        tasks (Sequence[str]): task names.
        num_levels (int): extraction levels (1 = CGC).
        num_task_experts (int): task-specific experts per task and level.
        num_shared_experts (int): shared experts per level.
        expert_layer_sizes (Sequence[int]): each expert's MLP widths.
        tower_layer_sizes (Sequence[int]): tower hidden widths.

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> s = tiny_schema()
        >>> m = PLE(build_ebc(s, 4), len(s.dense), s.task_names, num_levels=2,
        ...         num_task_experts=2, num_shared_experts=1, expert_layer_sizes=[8], tower_layer_sizes=[4])
        >>> b = tiny_batch(s, batch_size=3)
        >>> m(b.dense, b.sparse)["click"].shape
        torch.Size([3])
    """

    def __init__(
        self,
        embedding_bag_collection: nn.Module,
        dense_in_features: int,
        tasks: Sequence[str],
        num_levels: int,
        num_task_experts: int,
        num_shared_experts: int,
        expert_layer_sizes: Sequence[int],
        tower_layer_sizes: Sequence[int],
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"PLE needs num_levels >= 1, got {num_levels}")
        self.tasks = list(tasks)
        self.input = SparseDenseInput(embedding_bag_collection, dense_in_features)
        self.levels, d = extraction_levels(
            self.input.out_features, len(self.tasks), num_levels, num_task_experts, num_shared_experts,
            expert_layer_sizes, first_level_grouped=False, zero_rows=self.input.padding,
        )
        self.towers = nn.ModuleDict({t: Tower(d, tower_layer_sizes) for t in self.tasks})

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        x = self.input(dense, sparse)  # B x D
        task_x, shared_x = x, x
        for level in self.levels:
            task_x, shared_x = level(task_x, shared_x)  # T x B x H, B x H
        return {t: self.towers[t](task_x[k]) for k, t in enumerate(self.tasks)}


class CGC(PLE):
    """Customized Gate Control (PLE §4.2): PLE with a single extraction level."""

    def __init__(
        self,
        embedding_bag_collection: nn.Module,
        dense_in_features: int,
        tasks: Sequence[str],
        num_task_experts: int,
        num_shared_experts: int,
        expert_layer_sizes: Sequence[int],
        tower_layer_sizes: Sequence[int],
    ) -> None:
        super().__init__(
            embedding_bag_collection, dense_in_features, tasks, 1, num_task_experts,
            num_shared_experts, expert_layer_sizes, tower_layer_sizes,
        )
