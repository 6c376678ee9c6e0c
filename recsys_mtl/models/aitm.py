"""AITM: Adaptive Information Transfer Multi-task (Xi et al., KDD'21).

Tasks form a conversion funnel (e.g. click → conversion). Every task ``t`` has a tower on the
shared embeddings giving ``q_t``. For ``t ≥ 2`` the Adaptive Information Transfer (AIT) module
mixes ``q_t`` with ``p_{t-1} = g_{t-1}(z_{t-1})``, the information transferred from the previous
task (``g``: one Linear + ReLU):

``z_t = Σ_{u ∈ {p_{t-1}, q_t}} w_u h_3(u)``,  ``w_u = softmax_u(<h_1(u), h_2(u)> / √k)``

with ``h_1, h_2, h_3`` Linear maps to ``k`` dims; ``z_1 = q_1``. Each task's predictor MLP reads
``z_t``. The behavioural expectation calibrator, ``α Σ_t max(ŷ_t - ŷ_{t-1}, 0)`` (later funnel
steps should not be more likely than earlier ones), is an extra loss term:
:meth:`AITM.calibrator_loss`, for the train wrapper to add to the BCE losses.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.modules.activations import ReLU
from recsys_mtl.modules.embeddings import SparseDenseInput
from recsys_mtl.modules.mlp import MLP, Tower


class AdaptiveInformationTransfer(nn.Module):
    """The AIT module: self-attention over {transferred info ``p``, own representation ``q``}.

    Args:
        dim (int): width ``k`` of ``p``, ``q`` and the output.

    Example::

        >>> ait = AdaptiveInformationTransfer(4)
        >>> ait(torch.randn(3, 4), torch.randn(3, 4)).shape
        torch.Size([3, 4])
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)  # h_1
        self.key = nn.Linear(dim, dim)  # h_2
        self.value = nn.Linear(dim, dim)  # h_3
        self.scale = 1.0 / math.sqrt(dim)

    def attention_weights(self, u: torch.Tensor) -> torch.Tensor:
        """``u``: ``B x 2 x k`` stacked ``[p, q]`` -> ``B x 2`` attention weights."""
        return torch.softmax((self.query(u) * self.key(u)).sum(-1) * self.scale, dim=1)  # B x 2

    def forward(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Args:
            p (torch.Tensor): ``B x k`` information from the previous task.
            q (torch.Tensor): ``B x k`` this task's tower representation.

        Returns:
            torch.Tensor: ``B x k`` fused representation ``z``.
        """
        u = torch.stack([p, q], dim=1)  # B x 2 x k
        w = self.attention_weights(u)  # B x 2
        return torch.einsum("bu,buk->bk", w, self.value(u))  # B x k


class AITM(nn.Module):
    """AITM over tasks in funnel order.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): shared tables.
        dense_in_features (int): number of dense features ``F``.
        tasks (Sequence[str]): tasks in funnel order (e.g. click, conversion).
        bottom_layer_sizes (Sequence[int]): each task's tower MLP widths; the last is ``k``.
        tower_layer_sizes (Sequence[int]): hidden widths of each task's predictor on ``z_t``.
        calibrator_weight (float): ``α`` of :meth:`calibrator_loss`.

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> s = tiny_schema()
        >>> m = AITM(build_ebc(s, 4), len(s.dense), s.task_names, [8], [4])
        >>> b = tiny_batch(s, batch_size=3)
        >>> logits = m(b.dense, b.sparse)
        >>> logits["like"].shape, m.calibrator_loss(logits).shape
        (torch.Size([3]), torch.Size([]))
    """

    def __init__(
        self,
        embedding_bag_collection: nn.Module,
        dense_in_features: int,
        tasks: Sequence[str],
        bottom_layer_sizes: Sequence[int],
        tower_layer_sizes: Sequence[int],
        calibrator_weight: float = 0.6,
    ) -> None:
        super().__init__()
        if not bottom_layer_sizes:
            raise ValueError("AITM needs bottom_layer_sizes (the task towers' widths)")
        self.tasks = list(tasks)
        self.calibrator_weight = calibrator_weight
        self.input = SparseDenseInput(embedding_bag_collection, dense_in_features)
        d = self.input.out_features
        self.bottoms = nn.ModuleDict({t: MLP(d, bottom_layer_sizes, zero_rows=self.input.padding) for t in self.tasks})
        k = bottom_layer_sizes[-1]
        # Info from task t to t+1 (none out of the last task); AIT for every task but the first.
        self.info = nn.ModuleDict({t: nn.Sequential(nn.Linear(k, k), ReLU()) for t in self.tasks[:-1]})
        self.transfer = nn.ModuleDict({t: AdaptiveInformationTransfer(k) for t in self.tasks[1:]})
        self.towers = nn.ModuleDict({t: Tower(k, tower_layer_sizes) for t in self.tasks})

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        x = self.input(dense, sparse)  # B x D
        logits = {}
        z = self.bottoms[self.tasks[0]](x)  # B x k
        logits[self.tasks[0]] = self.towers[self.tasks[0]](z)
        for prev, t in zip(self.tasks[:-1], self.tasks[1:]):
            p = self.info[prev](z)  # B x k, transferred from the previous task
            z = self.transfer[t](p, self.bottoms[t](x))  # B x k
            logits[t] = self.towers[t](z)
        return logits

    def auxiliary_loss(self, logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Added to the task losses by the train wrapper: the behavioural expectation calibrator."""
        return self.calibrator_loss(logits)

    def calibrator_loss(self, logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Behavioural expectation calibrator ``α · mean_b Σ_{t≥2} max(ŷ_t - ŷ_{t-1}, 0)``.

        Args:
            logits (Mapping[str, torch.Tensor]): this model's output, ``B`` per task.

        Returns:
            torch.Tensor: scalar penalty, already weighted by ``calibrator_weight``.
        """
        probs = torch.stack([torch.sigmoid(logits[t]) for t in self.tasks], dim=1)  # B x T
        violation = torch.relu(probs[:, 1:] - probs[:, :-1])  # B x (T-1)
        return self.calibrator_weight * violation.sum(1).mean()
