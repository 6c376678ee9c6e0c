"""ESMM: Entire Space Multi-task Model (Ma et al., SIGIR'18).

CTR and CVR networks share the embedding tables; ``pCTCVR = pCTR × pCVR``. ESMM trains
``pCTR`` on the click label and ``pCTCVR`` on the click-and-conversion label, both over the
entire impression space, so ``pCVR`` is learned only through the product and never on the
click-only sample space (no sample-selection bias).

Task mapping: the model's first task is CTR (label: click); the second is **CTCVR** (label:
click AND conversion, defined on every impression). The second output is the *logit* of
``pCTR × pCVR``, so the library's standard per-task BCE on logits over the whole impression
space is exactly ESMM's CTCVR loss. With more tasks the funnel continues:
task ``k``'s probability is ``Π_{j≤k} σ(a_j)`` (each step conditional on the previous one).
A dataset that stores the CVR label only on clicks (null elsewhere) must be turned into
CTCVR labels first: :func:`ctcvr_targets`. pCVR itself is ``sigmoid`` of
:meth:`ESMM.tower_logits`'s second entry.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.modules.embeddings import SparseDenseInput
from recsys_mtl.modules.mlp import Tower


def chained_product_logits(logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of the running products ``p_k = Π_{j≤k} σ(a_j)``, computed in log space.

    ``log p_k = Σ_{j≤k} log σ(a_j)`` and ``log(1 - p_k)`` by the recursion
    ``1 - p_k = (1 - p_{k-1}) + p_{k-1} σ(-a_k)``, i.e.
    ``log(1 - p_k) = logaddexp(log(1 - p_{k-1}), log p_{k-1} + log σ(-a_k))``; both terms are
    finite for finite logits, so neither ``p → 0`` nor ``p → 1`` overflows.

    Args:
        logits (Sequence[torch.Tensor]): per-step logits ``a_j``, each ``B``.

    Returns:
        list[torch.Tensor]: ``logit(p_k) = log p_k - log(1 - p_k)``, each ``B``.

    Example::

        >>> a, b = torch.tensor([0.3, 40.0, -30.0]), torch.tensor([-1.2, 35.0, 2.0])
        >>> z = chained_product_logits([a, b])[1]
        >>> bool(torch.allclose(torch.sigmoid(z), torch.sigmoid(a) * torch.sigmoid(b)))
        True
        >>> bool(torch.isfinite(z).all())
        True
    """
    log_p = F.logsigmoid(logits[0])  # B
    log_1mp = F.logsigmoid(-logits[0])  # B
    out = [logits[0]]  # the first step is its own logit (log p - log(1 - p) = a_1)
    for a in logits[1:]:
        log_1mp = torch.logaddexp(log_1mp, log_p + F.logsigmoid(-a))  # B
        log_p = log_p + F.logsigmoid(a)  # B
        out.append(log_p - log_1mp)
    return out


def ctcvr_targets(
    labels: torch.Tensor, label_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entire-space funnel labels from click-space ones (for :class:`ESMM`).

    A label outside its task's space (masked, e.g. conversion on a non-click) becomes 0 and
    every label becomes valid; task ``k``'s label is ANDed with task ``k-1``'s, so the second
    column is click AND conversion.

    Args:
        labels (torch.Tensor): ``B x T`` in funnel order (click, conversion, ...).
        label_mask (torch.Tensor): ``B x T`` bool, False outside the task's space.

    Returns:
        ``B x T`` funnel labels and an all-True ``B x T`` mask.

    Example::

        >>> y, m = ctcvr_targets(torch.tensor([[1., 1.], [0., 0.], [1., 0.]]),
        ...                      torch.tensor([[True, True], [True, False], [True, True]]))
        >>> y.tolist(), bool(m.all())
        ([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]], True)
    """
    y = torch.where(label_mask, labels, torch.zeros_like(labels))
    y = torch.cummin(y, dim=1).values  # B x T: AND along the funnel (labels are 0/1)
    return y, torch.ones_like(label_mask)


class ESMM(nn.Module):
    """ESMM: one network per funnel step on shared embeddings; outputs chained-product logits.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): the shared tables.
        dense_in_features (int): number of dense features ``F``.
        tasks (Sequence[str]): funnel tasks in order: CTR first, then CTCVR (then further steps).
        tower_layer_sizes (Sequence[int]): hidden widths of each step's network (the paper's
            per-task MLP), before its output Linear.

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> s = tiny_schema()
        >>> m = ESMM(build_ebc(s, 4), len(s.dense), s.task_names, [8, 4])
        >>> b = tiny_batch(s, batch_size=3)
        >>> out, raw = m(b.dense, b.sparse), m.tower_logits(b.dense, b.sparse)
        >>> p_ctcvr = torch.sigmoid(raw["click"]) * torch.sigmoid(raw["like"])  # pCTR x pCVR
        >>> bool(torch.allclose(torch.sigmoid(out["like"]), p_ctcvr, atol=1e-6))
        True
    """

    def __init__(
        self,
        embedding_bag_collection: nn.Module,
        dense_in_features: int,
        tasks: Sequence[str],
        tower_layer_sizes: Sequence[int],
    ) -> None:
        super().__init__()
        if len(tasks) < 2:
            raise ValueError(f"ESMM needs >= 2 funnel tasks (CTR, CTCVR), got {list(tasks)}")
        self.tasks = list(tasks)
        self.input = SparseDenseInput(embedding_bag_collection, dense_in_features)
        self.towers = nn.ModuleDict({t: Tower(self.input.out_features, tower_layer_sizes, zero_rows=self.input.padding)
                                     for t in self.tasks})

    def training_targets(
        self, labels: torch.Tensor, label_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Entire-space funnel labels (:func:`ctcvr_targets`); the train wrapper applies them, so
        data with conversion null outside clicks trains ESMM over the whole impression space."""
        return ctcvr_targets(labels, label_mask)

    def tower_logits(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Each step's own (conditional) logit: pCTR, pCVR, ... before the product; each ``B``."""
        x = self.input(dense, sparse)  # B x D
        return {t: self.towers[t](x) for t in self.tasks}

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        raw = self.tower_logits(dense, sparse)
        return dict(zip(self.tasks, chained_product_logits([raw[t] for t in self.tasks])))
