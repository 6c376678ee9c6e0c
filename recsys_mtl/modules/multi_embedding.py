"""Several table sets embedding the same batch: the multi-embedding (ME-MMoE / ME-PLE) inputs.

Each table set is its own ``EmbeddingBagCollection``, so the planner shards each
independently. Outputs are selected by feature name (a sharded EBC may reorder its
``KeyedTensor`` keys) and concatenated in one fixed feature order, so every set yields an
input of the same layout. One ``FeatureRegroup`` assembles every set's input (off CPU a
single fused TorchRec ``KTRegroupAsDict`` permute).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.modules.embeddings import (
    FeatureRegroup,
    cat_dense,
    ebc_out_features,
    embedded_features,
    embedding_lookup,
)


class TableSetInputs(nn.Module):
    """One ``B x D`` input per table set, stacked, plus the shared set's input.

    A table set may cover only some features when a shared set is given: its missing
    features are read from the shared set (as STEM-Net's non-task-specific fields).

    Args:
        embedding_bag_collections (dict[str, EmbeddingBagCollection]): the ``G`` table sets
            (e.g. one per expert or per task), in stacking order.
        dense_in_features (int): dense features ``F`` appended to every input (0 for none).
        shared_embedding_bag_collection (EmbeddingBagCollection | None): a set covering every
            feature; without it every set must cover the same features.

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> s = tiny_schema()
        >>> inp = TableSetInputs({"a": build_ebc(s, 4, prefix="a", features=["user_id"]),
        ...                       "b": build_ebc(s, 4, prefix="b", features=["user_id"])},
        ...                      len(s.dense), build_ebc(s, 4, prefix="shared"))
        >>> b = tiny_batch(s, batch_size=3)
        >>> groups, shared = inp(b.dense, b.sparse)
        >>> groups.shape, shared.shape  # G x B x D, B x D with D = 4 features * 4 + 3 dense
        (torch.Size([2, 3, 19]), torch.Size([3, 19]))
    """

    def __init__(
        self,
        embedding_bag_collections: dict[str, nn.Module],
        dense_in_features: int,
        shared_embedding_bag_collection: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not embedding_bag_collections:
            raise ValueError("TableSetInputs needs at least one table set")
        self.names = list(embedding_bag_collections)
        self.ebcs = nn.ModuleDict(embedding_bag_collections)
        self.shared_ebc = shared_embedding_bag_collection
        self.dense_in_features = dense_in_features
        ref = shared_embedding_bag_collection or next(iter(embedding_bag_collections.values()))
        self.features = embedded_features(ref)
        dims = {f: c.embedding_dim for c in ref.embedding_bag_configs() for f in c.feature_names}
        self.group_features: dict[str, set[str]] = {}
        for name, ebc in embedding_bag_collections.items():
            feats = embedded_features(ebc)
            unknown = set(feats) - set(self.features)
            if unknown:
                raise ValueError(f"table set {name!r} embeds features {sorted(unknown)} absent from {self.features}")
            if shared_embedding_bag_collection is None and sorted(feats) != sorted(self.features):
                raise ValueError(
                    f"without a shared table set every set must cover {self.features}; {name!r} has {feats}"
                )
            for cfg in ebc.embedding_bag_configs():
                for f in cfg.feature_names:
                    if cfg.embedding_dim != dims[f]:
                        raise ValueError(f"feature {f!r}: table set {name!r} differs in embedding_dim")
            self.group_features[name] = set(feats)
        self.out_features = ebc_out_features(ref) + dense_in_features
        # Sources: the shared set (when given) first, then the sets in stacking order.
        offset = 0 if shared_embedding_bag_collection is None else 1
        groups = [] if shared_embedding_bag_collection is None else [[(0, f) for f in self.features]]
        for i, name in enumerate(self.names):
            own = self.group_features[name]
            groups.append([(offset + i, f) if f in own else (0, f) for f in self.features])
        self.regroup = FeatureRegroup(groups)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Args:
            dense (torch.Tensor): ``B x F``.
            sparse (KeyedJaggedTensor): every feature.

        Returns:
            ``G x B x D`` per-set inputs and the shared set's ``B x D`` input (None without one).
        """
        d = dense if self.dense_in_features > 0 else None
        kts = []
        if self.shared_ebc is not None:  # fixed at construction (torch.fx-traceable)
            kts.append(embedding_lookup(self.shared_ebc, sparse))
        kts += [embedding_lookup(self.ebcs[name], sparse) for name in self.names]
        # One B x sum(D) block per group, columns in self.features order. Indexed by constants
        # only: under the pipeline's tracer the result is a single opaque node.
        parts = self.regroup(kts)
        first = 0 if self.shared_ebc is None else 1
        x_s = cat_dense(parts[0], d) if self.shared_ebc is not None else None  # B x D
        groups = [cat_dense(parts[first + i], d) for i in range(len(self.names))]  # B x D each
        return torch.stack(groups), x_s  # G x B x D, B x D
