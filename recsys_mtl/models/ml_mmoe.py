"""ML-MMoE: multi-level MMoE, the PLE paper's baseline (Tang et al., RecSys'20, §5.1.2, Fig. 1h).

The PLE paper extends MMoE "by adding multi-level experts for fair comparison": higher-level
experts combine lower-level experts' outputs through gating networks, and "all gating networks
share the same selector". Precisely, with input ``x`` (embeddings ⊕ dense), ``E`` experts per
level and ``L`` levels:

- level 1: ``e¹_i = f¹_i(x)`` for ``i = 1..E``;
- level ``j+1``: expert ``i`` reads its own gated mixture of level ``j``,
  ``e^{j+1}_i = f^{j+1}_i( Σ_k g^j_i(x)_k e^j_k )`` with ``g^j_i(x) = softmax(W^j_i x + b^j_i)``;
- task ``t``'s tower reads ``Σ_k g_t(x)_k e^L_k`` with ``g_t(x) = softmax(W_t x + b_t)``.

Every gate's selector is the model input ``x`` (the paper's "same selector"); PLE instead feeds
its upper gates the lower level's fused outputs. ``L = 1`` is MMoE.
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


class MLMMoE(nn.Module):
    """Multi-level Multi-gate Mixture-of-Experts.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): shared tables.
        dense_in_features (int): number of dense features ``F``.
        tasks (Sequence[str]): task names.
        num_levels (int): expert levels ``L`` (1 = MMoE).
        num_experts (int): experts per level ``E``.
        expert_layer_sizes (Sequence[int]): each expert's MLP widths (every level).
        tower_layer_sizes (Sequence[int]): tower hidden widths.

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> s = tiny_schema()
        >>> m = MLMMoE(build_ebc(s, 4), len(s.dense), s.task_names, num_levels=2, num_experts=3,
        ...            expert_layer_sizes=[8], tower_layer_sizes=[4])
        >>> b = tiny_batch(s, batch_size=3)
        >>> {t: v.shape for t, v in m(b.dense, b.sparse).items()}
        {'click': torch.Size([3]), 'like': torch.Size([3])}
    """

    def __init__(
        self,
        embedding_bag_collection: nn.Module,
        dense_in_features: int,
        tasks: Sequence[str],
        num_levels: int,
        num_experts: int,
        expert_layer_sizes: Sequence[int],
        tower_layer_sizes: Sequence[int],
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"MLMMoE needs num_levels >= 1, got {num_levels}")
        self.tasks = list(tasks)
        self.input = SparseDenseInput(embedding_bag_collection, dense_in_features)
        d = self.input.out_features
        pad = self.input.padding
        experts = [Experts(d, expert_layer_sizes, num_experts, zero_rows=pad)]
        h = experts[0].out_features
        # Level j+1's E experts each read their own mixture: one group of one expert per input slice.
        experts += [
            Experts(h, expert_layer_sizes, 1, num_groups=num_experts, grouped_input=True) for _ in range(1, num_levels)
        ]
        self.experts = nn.ModuleList(experts)
        # Gates between levels (one per upper-level expert) and the task gates; all read x.
        self.level_gates = nn.ModuleList([Gates(d, num_experts, num_experts, zero_rows=pad) for _ in range(1, num_levels)])
        self.task_gates = Gates(d, num_experts, len(self.tasks), zero_rows=pad)
        self.towers = nn.ModuleDict({t: Tower(h, tower_layer_sizes) for t in self.tasks})

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        x = self.input(dense, sparse)  # B x D
        e = self.experts[0](x)  # E x B x H
        for gates, experts in zip(self.level_gates, self.experts[1:]):
            w = gates(x)  # E x B x E: upper expert i's weights over the lower experts
            e = experts(torch.einsum("ibk,kbh->ibh", w, e))  # E x B x H
        weights = self.task_gates(x)  # T x B x E
        mixed = torch.einsum("tbk,kbh->tbh", weights, e)  # T x B x H
        return {t: self.towers[t](mixed[k]) for k, t in enumerate(self.tasks)}
