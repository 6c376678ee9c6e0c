"""LightGCN (He et al., "LightGCN: Simplifying and Powering Graph Convolution Network for
Recommendation", SIGIR'20) as PMTRec's graph encoder (Yang et al. 2024, §4.3, Fig. 3).

LightGCN's layer is the normalised neighbourhood sum without transformation or nonlinearity
(Eq. 3), ``E^{(k+1)} = Â E^{(k)}`` with ``Â = D^{-1/2} A D^{-1/2}`` over the bipartite user–item
train graph, and the final representation is the layer combination (Eq. 4)
``e_x = Σ_{k=0}^{K} α_k e_x^{(k)}`` with ``α_k = 1/(K+1)``; in matrix form (Eq. 8)
``E_final = P E``, ``P = Σ_k α_k Â^k``. Every final embedding is therefore a fixed weighted sum of
layer-0 table rows: the data path (:class:`recsys_mtl.data.interactions.GraphBags`) hands every
role ``r`` of the batch to the model as two weighted bags, ``r__u`` (the user columns of row ``x`` of
``P``, looked up in ``user_emb``) and ``r__i`` (the item columns, in ``item_emb``), and the model
pools them with SUM pooling: ``e_x = pooled(r__u) + pooled(r__i)``. The tables stay sharded
``EmbeddingBagCollection`` tables (fused optimizers, the sparse-dist pipeline, PMTRec's per-row
gradient pooling all apply), and the propagation runs over the batch's neighbourhoods only.

Differences from the full-graph formulation: ``P`` is built over the train interactions once per
dataset; with ``graph_max_neighbours = N > 0`` each row of ``P`` keeps its N largest weights (an
approximation for ``K >= 2``, whose 2-hop user–user neighbourhoods make large bags). ``K = 0`` is
MF (``P = I``). The scores and task logits are MF's (dot products, per-task
``s(a, p) − s(a, n)``, BPR with label 1).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.data.interactions import GraphBags
from recsys_mtl.models.mf import MatrixFactorization

__all__ = ["LightGCN"]


class LightGCN(MatrixFactorization):
    """LightGCN's final embeddings (Eq. 4) as SUM-pooled weighted bags; MF's pairwise logits.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): a weighted (``is_weighted=True``) SUM
            collection with ``user_emb`` holding every ``r__u`` feature and ``item_emb`` every ``r__i``
            (MF's Xavier-uniform :func:`recsys_mtl.models.mf.pair_tables` configurations, weighted).
        tasks (Sequence[str]): task names.
        task_roles (Mapping[str, Sequence[str]] | None): task -> its roles (see
            :class:`~recsys_mtl.models.mf.MatrixFactorization`).

    Example::

        >>> from torchrec.modules.embedding_configs import EmbeddingBagConfig
        >>> ebc = EmbeddingBagCollection(tables=[
        ...     EmbeddingBagConfig(name="user_emb", embedding_dim=4, num_embeddings=3,
        ...                        feature_names=["user__u", "item__u", "neg_item__u"]),
        ...     EmbeddingBagConfig(name="item_emb", embedding_dim=4, num_embeddings=5,
        ...                        feature_names=["user__i", "item__i", "neg_item__i"])], is_weighted=True)
        >>> keys = ["user__u", "item__u", "neg_item__u", "user__i", "item__i", "neg_item__i"]
        >>> lengths = torch.tensor([1, 0, 2, 0, 1, 1, 0, 0, 0, 0, 1, 0])  # 6 features x 2 rows
        >>> kjt = KeyedJaggedTensor(keys, torch.tensor([0, 1, 2, 0, 2, 4]), lengths=lengths,
        ...                         weights=torch.full((6,), 0.5))
        >>> LightGCN(ebc, ["rec"])(torch.zeros(2, 0), kjt)["rec"].shape
        torch.Size([2])
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection, tasks: Sequence[str],
                 task_roles: Mapping[str, Sequence[str]] | None = None) -> None:
        super().__init__(embedding_bag_collection, tasks, task_roles)
        self.role_names = sorted({r for roles in self.roles.values() for r in roles})

    def embed(self, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Role -> ``B x D`` final embeddings ``Σ_y P_xy E_y`` (LightGCN Eq. 4/8)."""
        pooled = self.ebc(sparse).to_dict()  # feature -> B x D, Σ_p w_p E[id_p]
        return {r: pooled[f"{r}__u"] + pooled[f"{r}__i"] for r in self.role_names}

    def role_kjt(self, keys: list[str], role: str, ids: torch.Tensor, stride: int,
                 graph: GraphBags) -> KeyedJaggedTensor:
        """The lookup KJT of ``ids`` in ``role`` (its rows of ``P`` as bags; every other key empty),
        ``stride`` rows per key: what the full-ranking evaluation looks up."""
        return graph.role_kjt(keys, role, ids, stride)
