"""Matrix factorisation (Rendle et al., BPR, UAI'09) as PMTRec's encoder (Yang et al. 2024, §3.1.1).

Users and items are rows of two embedding tables (``user_emb``, ``item_emb``); a pair's score is the dot
product of its two rows. Every task of an interaction dataset is a pairwise ranking task over
three roles of the batch (``recsys_mtl.data.interactions``, the training schema's
``metadata["task_roles"]``): ``rec`` scores ``(user, item)`` against ``(user, neg_item)`` (BPR), a
pair task (``recsys_mtl.data.pair_tasks``) its anchor and positive against its anchor and negative,
e.g. ``social`` ``(user, friend)`` against ``(user, neg_friend)`` and ``category``
``(item, cat_item)`` against ``(item, neg_cat_item)``; the task's logit is the score difference, so binary cross-entropy with label 1 is each task's BPR loss
``−ln σ(s⁺ − s⁻)``. Every role of a kind shares its table (one row per user / item), which is
what makes PMTRec's per-row gradient pooling meaningful: a user's row collects gradients from
the recommendation task and from the social task.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.data.pair_tasks import BUILTIN, MAIN_ROLES, MAIN_TASK

__all__ = ["MatrixFactorization", "pair_tables"]


def pair_tables(tables: dict[str, list[str]], sizes: dict[str, int], dim: int,
                device: torch.device | None = None) -> EmbeddingBagCollection:
    """One table per kind (``user_emb``, ``item_emb``) holding every role feature of that kind, Xavier
    uniform initialised (``±sqrt(6 / (rows + dim))``, the paper's initialisation)."""
    configs = []
    for name, features in tables.items():
        if not features:
            continue
        bound = math.sqrt(6.0 / (sizes[name] + dim))
        configs.append(EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=sizes[name],
                                          feature_names=list(features), weight_init_min=-bound,
                                          weight_init_max=bound))
    return EmbeddingBagCollection(tables=configs, device=device)


class MatrixFactorization(nn.Module):
    """MF over the ``users`` and ``items`` tables; ``forward`` returns each task's score difference.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): tables from :func:`pair_tables`.
        tasks (Sequence[str]): task names.
        task_roles (Mapping[str, Sequence[str]] | None): task -> ``(anchor, positive, negative)``
            batch features (a training schema's ``metadata["task_roles"]``); None: ``rec`` and the
            built-in ``social`` / ``category`` roles.

    Example::

        >>> ebc = pair_tables({"user_emb": ["user"], "item_emb": ["item", "neg_item"]}, {"user_emb": 3, "item_emb": 5}, 4)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "item", "neg_item"], torch.tensor([0, 1, 2, 4, 3, 0]),
        ...                                           torch.ones(6, dtype=torch.int32))
        >>> out = MatrixFactorization(ebc, ["rec"])(torch.zeros(2, 0), kjt)
        >>> out["rec"].shape
        torch.Size([2])
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection, tasks: Sequence[str],
                 task_roles: Mapping[str, Sequence[str]] | None = None) -> None:
        super().__init__()
        self.ebc = embedding_bag_collection
        self.tasks = list(tasks)
        known = dict(task_roles) if task_roles is not None else {MAIN_TASK: MAIN_ROLES,
                                                                  **{n: t.roles for n, t in BUILTIN.items()}}
        missing = [t for t in self.tasks if t not in known]
        if missing:
            raise ValueError(f"no (anchor, positive, negative) roles for task(s) {missing}; have {', '.join(known)}")
        self.roles = {t: tuple(known[t]) for t in self.tasks}

    def embed(self, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Role -> ``B x D`` representations (the tables' rows; an encoder may refine them)."""
        return self.ebc(sparse).to_dict()

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        emb = self.embed(sparse)  # role -> B x D
        out = {}
        for t, (a, p, n) in self.roles.items():
            out[t] = (emb[a] * emb[p]).sum(1) - (emb[a] * emb[n]).sum(1)  # B: s(a, p) − s(a, n)
        return out

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``U_b x D`` user and ``I x D`` item representations -> ``U_b x I`` scores."""
        return users @ items.t()
