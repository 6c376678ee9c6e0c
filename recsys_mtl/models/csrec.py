"""CSRec and ML-CSRec (CSRec: Bai et al., "A Contrastive Sharing Model for Multi-Task
Recommendation", WWW'22).

CSRec is Sparse Sharing's architecture with a second mask per task: besides task ``t``'s mask
``M_t`` (subnetwork ``t``, Eq. 7) the bottom holds a contrastive mask ``M'_t`` (subnetwork
``T + t``, Eq. 8), generated from ``M_t`` by a contrastive strategy (Sec. 3.3.5,
``recsys_mtl.modules.masking``). Training minimises ``Loss_c = loss_r(M_t) − loss_r(M'_t)`` with
``loss_r = sigmoid(ln loss)`` (Eq. 5–6): the procedure evaluates the pairs
``(t, task_t)`` and ``(T + t, task_t)`` — the contrastive subnetwork through task ``t``'s own
tower — with the model's ``pairs`` mode. At inference only the task subnetworks run.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from recsys_mtl.models.sparse_sharing import MaskedSharingModel, SparseSharing
from recsys_mtl.modules.masked_mlp import MaskedMLP
from recsys_mtl.modules.mlp import MLP


class _ContrastiveSubnets:
    """Subnet numbering of the contrastive models: ``t`` is task ``t``'s, ``T + t`` its contrastive one."""

    tasks: list[str]
    num_tasks: int

    def task_subnet(self, task: str) -> int:
        """Index of ``task``'s subnetwork (mask ``M_t``)."""
        return self.tasks.index(task)

    def contrastive_subnet(self, task: str) -> int:
        """Index of ``task``'s contrastive subnetwork (mask ``M'_t``)."""
        return self.num_tasks + self.tasks.index(task)


class CSRec(_ContrastiveSubnets, SparseSharing):
    """CSRec: a :class:`MaskedMLP` bottom with ``2T`` subnetworks — ``t`` for task ``t``'s mask,
    ``T + t`` for its contrastive mask — and one tower per task.

    ``forward`` without ``pairs`` runs the ``T`` task subnetworks (the contrastive ones are for
    training only).

    Args:
        embedding_bag_collection (EmbeddingBagCollection): shared tables.
        dense_in_features (int): number of dense features ``F``.
        tasks (Sequence[str]): task names; the output dict's keys.
        bottom_layer_sizes (Sequence[int]): widths of the masked bottom MLP (the paper: 256, 192, 128).
        tower_layer_sizes (Sequence[int]): hidden widths of each tower.

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> s = tiny_schema()
        >>> m = CSRec(build_ebc(s, 4), len(s.dense), s.task_names, [8], [4])
        >>> b = tiny_batch(s, batch_size=3)
        >>> m(b.dense, b.sparse)["like"].shape
        torch.Size([3])
        >>> m.num_subnets, m.contrastive_subnet("like")
        (4, 3)
        >>> m.pairs = [(0, "click"), (m.contrastive_subnet("click"), "click")]  # M_t and M'_t of click
        >>> sorted(m(b.dense, b.sparse))
        ['click@0', 'click@2']
    """

    subnets_per_task = 2


class MLCSRec(_ContrastiveSubnets, MaskedSharingModel):
    """ML-CSRec: CSRec's contrastive sharing network stacked over ``num_levels`` levels.

    The paper describes ML-CSRec only as progressively learning information from the contrastive
    sharing networks, built for a fair comparison with PLE (Sec. 3.1.2). Our reading, after PLE's
    progressive layers:

    - every level ``l`` holds a :class:`MaskedMLP` with the ``2T`` task / contrastive subnetworks
      (numbered as in :class:`CSRec`), and levels ``l < L`` also an unmasked shared path (a plain
      MLP, like PLE's shared expert; the last level's would feed nothing, as PLE drops its last
      shared gate);
    - level 1: every subnetwork and the shared path read the bottom input ``x``;
    - level ``l > 1``: subnetwork ``s`` reads ``concat(h_s^{l-1}, h_shared^{l-1})`` (one input per
      subnetwork), the shared path reads ``h_shared^{l-1}``;
    - task ``t``'s tower reads ``h_t^L``; subnetwork ``s`` uses mask ``s`` at every level, so a
      task's mask is the masks of all levels together (pruned together, ``masked_layers()`` lists
      the levels); the shared path is never masked.

    Every level (and every shared path) uses the full ``bottom_layer_sizes``, as PLE in this
    library uses ``expert_layer_sizes`` per level. (The paper's parameter counts — 665k for
    ML-CSRec against CSRec's 648k, Table 3 — suggest its levels split one MLP's depth; pass
    shorter widths for that.) With ``num_levels=1`` this is :class:`CSRec`.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): shared tables.
        dense_in_features (int): number of dense features ``F``.
        tasks (Sequence[str]): task names.
        num_levels (int): levels ``L >= 1``.
        bottom_layer_sizes (Sequence[int]): widths of every level's masked MLP and shared path.
        tower_layer_sizes (Sequence[int]): tower hidden widths.

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> s = tiny_schema()
        >>> m = MLCSRec(build_ebc(s, 4), len(s.dense), s.task_names, num_levels=2,
        ...             bottom_layer_sizes=[8], tower_layer_sizes=[4])
        >>> b = tiny_batch(s, batch_size=3)
        >>> m(b.dense, b.sparse)["click"].shape
        torch.Size([3])
        >>> [(l.in_features, l.num_subnets) for l in m.masked_layers()]  # level 2 reads h_s ⊕ h_shared
        [(19, 4), (16, 4)]
    """

    def __init__(
        self,
        embedding_bag_collection: nn.Module,
        dense_in_features: int,
        tasks: Sequence[str],
        num_levels: int,
        bottom_layer_sizes: Sequence[int],
        tower_layer_sizes: Sequence[int],
    ) -> None:
        super().__init__(embedding_bag_collection, dense_in_features, tasks, tower_layer_sizes)
        if num_levels < 1:
            raise ValueError(f"MLCSRec needs num_levels >= 1, got {num_levels}")
        self.num_levels = num_levels
        s, d = 2 * self.num_tasks, self.input.out_features
        levels, shared = [], []
        for level in range(num_levels):
            masked = MaskedMLP(d if level == 0 else levels[-1].out_features + shared[-1].out_features,
                               bottom_layer_sizes, s)
            levels.append(masked)
            if level < num_levels - 1:
                shared.append(MLP(d if level == 0 else shared[-1].out_features, bottom_layer_sizes))
        self.levels = nn.ModuleList(levels)
        self.shared = nn.ModuleList(shared)
        self._build_towers(self.levels[-1].out_features)

    def masked_layers(self) -> list[MaskedMLP]:
        return list(self.levels)

    def bottom_outputs(self, x: torch.Tensor, subnets: Sequence[int], detached: bool = False) -> torch.Tensor:
        n = len(subnets)
        x = x.detach() if detached else x
        h = self.levels[0](x, subnets)  # S' x B x H
        shared = x  # B x D
        for level in range(1, self.num_levels):
            shared = self.shared[level - 1](shared)  # B x H
            shared = shared.detach() if detached else shared
            inp = torch.cat([h, shared.unsqueeze(0).expand(n, -1, -1)], dim=-1)  # S' x B x 2H
            h = self.levels[level](inp, subnets)  # S' x B x H
        return h
