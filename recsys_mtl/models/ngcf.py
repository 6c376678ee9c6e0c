"""NGCF (Wang et al., "Neural Graph Collaborative Filtering", SIGIR'19) with one propagation layer,
as PMTRec's graph encoder (Yang et al. 2024, §4.3, Fig. 3).

NGCF's first-order propagation (Eq. 3-4, in matrix form Eq. 7) embeds a node ``x`` as

    e_x^{(1)} = LeakyReLU( W1 e_x + Σ_{y ∈ N(x)} p_xy (W1 e_y + W2 (e_y ⊙ e_x)) )
              = LeakyReLU( W1 (e_x + s_x) + W2 (e_x ⊙ s_x) ),   s_x = Σ_{y ∈ N(x)} Â_xy e_y,

with ``p_xy = Â_xy = 1/sqrt(|N_x| |N_y|)`` over the bipartite user–item train graph (``x``'s neighbours
are on the other side) and ``W1``, ``W2`` (``D x D``, with bias) shared by users and items; the
final representation is the concatenation of the layers (Eq. 9), ``concat(e_x, e_x^{(1)})``
(``2D``), scored by inner products (Eq. 10). The data path
(:class:`recsys_mtl.data.interactions.GraphBags`) hands every role ``r`` of the batch to the model
as two weighted bags of one SUM-pooled ``EmbeddingBagCollection``: ``r`` (the id itself, weight 1,
in its own table) and ``r__nbr`` (the row of ``Â`` over ``x``'s neighbours, in the other kind's
table), so the tables stay sharded and PMTRec's per-row gradient pooling applies.

Scope: one layer (``graph_layers = 1``). A second NGCF layer needs every neighbour's own layer-1
state, a nonlinear function of that neighbour's neighbourhood, which is not a weighted bag of
layer-0 rows; the configuration refuses ``graph_layers > 1``. NGCF's message and node dropout are
omitted (the encoder is deterministic; regularisation is left to the optimiser settings), and the
layer outputs are concatenated as in Eq. 9 without the per-layer L2 normalisation some
implementations add. LeakyReLU's negative slope is 0.2.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.data.interactions import GraphBags
from recsys_mtl.models.mf import MatrixFactorization

__all__ = ["NGCF"]

NEGATIVE_SLOPE = 0.2


class _XavierLinear(nn.Linear):
    """``nn.Linear`` with NGCF's Xavier-uniform weights and zero bias (also when materialised from
    ``meta`` by ``DistributedModelParallel``, which calls ``reset_parameters``)."""

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class NGCF(MatrixFactorization):
    """One NGCF layer (Eq. 7) over SUM-pooled weighted bags; final ``concat(e, e^{(1)})`` (Eq. 9);
    MF's pairwise logits.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): a weighted (``is_weighted=True``) SUM
            collection: ``user_emb`` with the user roles and the item roles' ``r__nbr``, ``item_emb``
            with the item roles and the user roles' ``r__nbr``.
        tasks (Sequence[str]): task names.
        dim (int): the embedding width ``D``.
        task_roles (Mapping[str, Sequence[str]] | None): task -> its roles (see
            :class:`~recsys_mtl.models.mf.MatrixFactorization`).

    Example::

        >>> from torchrec.modules.embedding_configs import EmbeddingBagConfig
        >>> ebc = EmbeddingBagCollection(tables=[
        ...     EmbeddingBagConfig(name="user_emb", embedding_dim=4, num_embeddings=3,
        ...                        feature_names=["user", "item__nbr", "neg_item__nbr"]),
        ...     EmbeddingBagConfig(name="item_emb", embedding_dim=4, num_embeddings=5,
        ...                        feature_names=["item", "neg_item", "user__nbr"])], is_weighted=True)
        >>> keys = ["user", "item__nbr", "neg_item__nbr", "item", "neg_item", "user__nbr"]
        >>> lengths = torch.tensor([1, 1, 2, 0, 1, 1, 1, 1, 1, 1, 0, 2])  # 6 features x 2 rows
        >>> kjt = KeyedJaggedTensor(keys, torch.tensor([0, 1, 1, 2, 0, 1, 3, 4, 2, 0, 3, 4]), lengths=lengths,
        ...                         weights=torch.full((12,), 0.5))
        >>> NGCF(ebc, ["rec"], 4)(torch.zeros(2, 0), kjt)["rec"].shape
        torch.Size([2])
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection, tasks: Sequence[str], dim: int,
                 task_roles: Mapping[str, Sequence[str]] | None = None) -> None:
        super().__init__(embedding_bag_collection, tasks, task_roles)
        self.role_names = sorted({r for roles in self.roles.values() for r in roles})
        self.w1 = _XavierLinear(dim, dim)  # W1: self + neighbourhood messages
        self.w2 = _XavierLinear(dim, dim)  # W2: the affinity term e_x ⊙ s_x

    def embed(self, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Role -> ``B x 2D`` final representations ``concat(e_x, e_x^{(1)})`` (NGCF Eq. 7, 9)."""
        pooled = self.ebc(sparse).to_dict()  # feature -> B x D
        out = {}
        for r in self.role_names:
            e, s = pooled[r], pooled[f"{r}__nbr"]  # B x D: e_x, s_x = Σ_y Â_xy e_y
            h = nn.functional.leaky_relu(self.w1(e + s) + self.w2(e * s), NEGATIVE_SLOPE)  # B x D: e_x^{(1)}
            out[r] = torch.cat([e, h], dim=1)  # B x 2D
        return out

    def role_kjt(self, keys: list[str], role: str, ids: torch.Tensor, stride: int,
                 graph: GraphBags) -> KeyedJaggedTensor:
        """The lookup KJT of ``ids`` in ``role`` (the ids and their rows of ``Â`` as bags; every other
        key empty), ``stride`` rows per key: what the full-ranking evaluation looks up."""
        return graph.role_kjt(keys, role, ids, stride)
