"""Sparse Sharing (Sun et al., "Learning Sparse Sharing Architectures for Multiple Tasks",
AAAI 2020): one bottom MLP, partially shared through a binary weight mask per task.

Task ``t``'s subnetwork is the bottom with weights ``M_t ⊙ Θ`` (CSRec, Bai et al., WWW'22, Eq. 7);
its tower reads that subnetwork's output. The masks are found by per-task iterative magnitude
pruning (``recsys_mtl.modules.masking``) in a procedure outside the model; a freshly built model
has all-one masks, i.e. it starts as Shared-Bottom.

The masked-sharing models (this one, ``CSRec`` and ``MLCSRec`` in :mod:`recsys_mtl.models.csrec`)
share one interface, which the training procedures use:

- ``forward(dense, sparse) -> dict[task, logits]``: each task through its own subnetwork (subnet
  ``k`` for the ``k``-th task), one masked-matmul call per layer for all of them.
- ``pairs``: ``None``, or a list of ``(subnet, tower task)`` pairs; then ``forward`` returns
  ``{pair_key(subnet, task): logits}`` instead, computing only the subnetworks named (still one
  call per layer). Every parameter stays in every forward's graph (see
  :func:`recsys_mtl.modules.masked_mlp.pair_logits`), as a static-graph DDP needs. ``pairs`` acts
  in training mode only; evaluation always runs the task subnetworks.
- ``detached_subnets``: subnetworks whose pairs pass gradient to the masked bottom only (their
  input, towers and any unmasked path read detached): CSRec's contrastive subnetworks.
- ``tasks``, ``num_tasks``, ``num_subnets``, ``masked_layers()`` (the bottom's
  :class:`~recsys_mtl.modules.masked_mlp.MaskedMLP` blocks in order) and
  ``input_field_columns()`` (the first masked layer's input columns of each field).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.modules.embeddings import SparseDenseInput
from recsys_mtl.modules.masked_mlp import MaskedMLP, pair_logits, pairs_subnets
from recsys_mtl.modules.mlp import Tower

DENSE_FIELD = "dense"  # input_field_columns' key for the dense features


def input_field_columns(inp: SparseDenseInput) -> dict[str, slice]:
    """Columns of each sparse feature's pooled embedding in ``inp``'s output (``inp.features``
    order), then ``"dense"`` for the dense features (absent without dense features).

    Example::

        >>> from recsys_mtl.testing import tiny_schema
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> s = tiny_schema(num_dense=3)
        >>> cols = input_field_columns(SparseDenseInput(build_ebc(s, 4), len(s.dense)))
        >>> {f: (c.start, c.stop) for f, c in cols.items()}
        {'user_id': (0, 4), 'item_id': (4, 8), 'item_tags': (8, 12), 'hour': (12, 16), 'dense': (16, 19)}
    """
    widths = {f: cfg.embedding_dim for cfg in inp.ebc.embedding_bag_configs() for f in cfg.feature_names}
    cols, start = {}, 0
    for f in inp.features:
        cols[f] = slice(start, start + widths[f])
        start += widths[f]
    if inp.dense_in_features > 0:
        if DENSE_FIELD in cols:
            raise ValueError(f"a sparse feature is named {DENSE_FIELD!r}, the key of the dense features")
        cols[DENSE_FIELD] = slice(start, start + inp.dense_in_features)
    return cols


class MaskedSharingModel(nn.Module):
    stacked_input = False  # bottom_outputs accepts an S' x B x D input (one per subnet)

    """Base of the masked-sharing models: input, towers, ``pairs`` mode; subclasses build the
    bottom and implement :meth:`bottom_outputs`.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): shared tables.
        dense_in_features (int): number of dense features ``F``.
        tasks (Sequence[str]): task names; the ``k``-th task's subnetwork is subnet ``k``.
        tower_layer_sizes (Sequence[int]): hidden widths of each tower.
    """

    def __init__(
        self,
        embedding_bag_collection: nn.Module,
        dense_in_features: int,
        tasks: Sequence[str],
        tower_layer_sizes: Sequence[int],
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"{type(self).__name__} needs distinct task names, got {self.tasks}")
        self.num_tasks = len(self.tasks)
        # Unpadded: the masks prune weight entries by magnitude and count them (sparsity), and
        # padding rows would take part in both.
        self.input = SparseDenseInput(embedding_bag_collection, dense_in_features, pad_to=1)
        self._tower_layer_sizes = list(tower_layer_sizes)
        self._field_columns = input_field_columns(self.input)
        self._task_subnets = list(range(self.num_tasks))
        self.pairs: list[tuple[int, str]] | None = None
        # Subnets whose pairs pass gradient to the masked bottom only (CSRec's contrastive
        # subnets: Algorithm 1 updates Θ_t; the input, towers and any shared path are read detached).
        self.detached_subnets: frozenset[int] = frozenset()

    def _build_towers(self, in_features: int) -> None:
        self.towers = nn.ModuleDict({t: Tower(in_features, self._tower_layer_sizes) for t in self.tasks})

    @property
    def num_subnets(self) -> int:
        return self.masked_layers()[0].num_subnets

    def masked_layers(self) -> list[MaskedMLP]:
        """Every :class:`MaskedMLP` of the bottom, in order (their subnet ``s`` masks together
        form subnetwork ``s``)."""
        raise NotImplementedError

    def input_field_columns(self) -> dict[str, slice]:
        """Input columns of the first masked layer for each sparse feature and ``"dense"``."""
        return dict(self._field_columns)

    def bottom_outputs(self, x: torch.Tensor, subnets: Sequence[int], detached: bool = False) -> torch.Tensor:
        """``B x D`` bottom input -> ``S' x B x H`` outputs of ``subnets`` (in that order);
        ``detached``: gradient only to the masked layers (not to ``x`` or an unmasked path)."""
        raise NotImplementedError

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        x = self.input(dense, sparse)  # B x D
        if self.pairs is None or not self.training:  # pairs: a training procedure's steps only
            h = self.bottom_outputs(x, self._task_subnets)  # T x B x H
            return {t: self.towers[t](h[k]) for k, t in enumerate(self.tasks)}
        pairs = [(int(s), str(t)) for s, t in self.pairs]
        subnets = pairs_subnets(pairs, self.num_subnets, self.tasks)
        live = [s for s in subnets if s not in self.detached_subnets]
        held = [s for s in subnets if s in self.detached_subnets]
        if live and held and self.stacked_input:  # one op per layer: the held subnets read x detached
            xs = torch.stack([x] * len(live) + [x.detach()] * len(held))  # S' x B x D
            h = self.bottom_outputs(xs, live + held)  # S' x B x H
        else:
            parts = ([self.bottom_outputs(x, live)] if live else []) + (
                [self.bottom_outputs(x, held, detached=True)] if held else [])
            h = parts[0] if len(parts) == 1 else torch.cat(parts)  # S' x B x H, subnets live + held
        return pair_logits(self.towers, pairs, live + held, h, detached=frozenset(held))


class SparseSharing(MaskedSharingModel):
    """Sparse Sharing: embeddings, a :class:`MaskedMLP` bottom with one subnetwork per task, and
    one tower per task reading its task's subnetwork.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): shared tables.
        dense_in_features (int): number of dense features ``F``.
        tasks (Sequence[str]): task names; the output dict's keys.
        bottom_layer_sizes (Sequence[int]): widths of the masked bottom MLP.
        tower_layer_sizes (Sequence[int]): hidden widths of each tower.

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> from recsys_mtl.modules.masked_mlp import pair_key
        >>> s = tiny_schema()
        >>> m = SparseSharing(build_ebc(s, 4), len(s.dense), s.task_names, [8], [4])
        >>> b = tiny_batch(s, batch_size=3)
        >>> {k: v.shape for k, v in m(b.dense, b.sparse).items()}
        {'click': torch.Size([3]), 'like': torch.Size([3])}
        >>> m.num_subnets, len(m.masked_layers())
        (2, 1)
        >>> m.pairs = [(1, "click")]  # like's subnetwork through click's tower
        >>> list(m(b.dense, b.sparse)) == [pair_key(1, "click")]
        True
    """

    subnets_per_task = 1

    def __init__(
        self,
        embedding_bag_collection: nn.Module,
        dense_in_features: int,
        tasks: Sequence[str],
        bottom_layer_sizes: Sequence[int],
        tower_layer_sizes: Sequence[int],
    ) -> None:
        super().__init__(embedding_bag_collection, dense_in_features, tasks, tower_layer_sizes)
        self.bottom = MaskedMLP(self.input.out_features, bottom_layer_sizes, self.subnets_per_task * self.num_tasks)
        self._build_towers(self.bottom.out_features)

    stacked_input = True

    def masked_layers(self) -> list[MaskedMLP]:
        return [self.bottom]

    def bottom_outputs(self, x: torch.Tensor, subnets: Sequence[int], detached: bool = False) -> torch.Tensor:
        return self.bottom(x.detach() if detached else x, subnets)  # S' x B x H (x: B x D or S' x B x D)
