"""Building embedding tables from a schema and turning their outputs into MLP inputs.

Models never build tables themselves (DESIGN.md §5): the trainer builds
``EmbeddingBagCollection``s with :func:`build_ebc` (usually on ``meta``), passes them in,
and ``DistributedModelParallel`` shards them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.data.schema import Schema


def table_name(prefix: str, feature: str) -> str:
    """Name of the table embedding ``feature`` in the table set ``prefix``."""
    return f"{prefix}__{feature}" if prefix else feature


def build_ebc(
    schema: Schema,
    embedding_dim: int,
    *,
    features: Sequence[str] | None = None,
    prefix: str = "",
    device: torch.device | str | None = None,
) -> EmbeddingBagCollection:
    """One table per sparse feature of ``schema`` (or of ``features``), all of width ``embedding_dim``.

    Args:
        schema (Schema): dataset schema (table sizes, pooling).
        embedding_dim (int): width ``D`` of every table.
        features (Sequence[str] | None): subset of sparse features; all when None.
        prefix (str): table-set name, e.g. ``"shared"`` or ``"task_click"``.
        device: where to allocate; ``"meta"`` to defer to sharding.

    Example::

        >>> from recsys_mtl.data.schema import Schema, SparseFeature, TaskSpec
        >>> s = Schema(sparse=(SparseFeature("u", 10),), dense=(), tasks=(TaskSpec("t"),))
        >>> [t.name for t in build_ebc(s, 4, prefix="shared").embedding_bag_configs()]
        ['shared__u']
    """
    names = schema.sparse_names if features is None else list(features)
    tables = []
    for name in names:
        f = schema.feature(name)
        tables.append(
            EmbeddingBagConfig(
                name=table_name(prefix, name),
                embedding_dim=embedding_dim,
                num_embeddings=f.num_embeddings,
                feature_names=[name],
                pooling=PoolingType.MEAN if f.pooling == "mean" else PoolingType.SUM,
            )
        )
    return EmbeddingBagCollection(tables=tables, device=torch.device(device) if device else None)


def embedded_features(ebc: nn.Module) -> list[str]:
    """Feature names of ``ebc`` in table-config order (the order models concatenate them in).

    A sharded EBC may return its ``KeyedTensor`` keys in another order (grouped by sharding
    and pooling), so models select features by name, never by column position.
    """
    return [feat for cfg in ebc.embedding_bag_configs() for feat in cfg.feature_names]


def ebc_out_features(ebc: nn.Module) -> int:
    return sum(cfg.embedding_dim * len(cfg.feature_names) for cfg in ebc.embedding_bag_configs())


class SparseDenseInput(nn.Module):
    """Pooled embeddings concatenated with dense features: the usual MTL bottom input.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): built (possibly sharded later) tables.
        dense_in_features (int): number of dense features ``F`` (0 for none).

    Example::

        >>> from recsys_mtl.data.schema import Schema, SparseFeature, TaskSpec
        >>> s = Schema(sparse=(SparseFeature("u", 10),), dense=(), tasks=(TaskSpec("t"),))
        >>> inp = SparseDenseInput(build_ebc(s, 4), dense_in_features=2)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["u"], torch.tensor([1, 2]), torch.tensor([1, 1]))
        >>> inp(torch.zeros(2, 2), kjt).shape
        torch.Size([2, 6])
    """

    def __init__(self, embedding_bag_collection: nn.Module, dense_in_features: int) -> None:
        super().__init__()
        self.ebc = embedding_bag_collection
        self.dense_in_features = dense_in_features
        self.features = embedded_features(embedding_bag_collection)
        self.out_features = ebc_out_features(embedding_bag_collection) + dense_in_features

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        emb = self.ebc(sparse).to_dict()  # feature -> B x D_f
        parts = [emb[f] for f in self.features] + ([dense] if self.dense_in_features > 0 else [])
        return torch.cat(parts, dim=1)  # B x (sum(D) + F)
