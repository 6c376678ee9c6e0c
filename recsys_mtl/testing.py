"""Tiny schemas and batches for docstring examples and tests (not used by library code)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.data.schema import DenseFeature, Schema, SparseFeature, TaskSpec
from recsys_mtl.types import MTLBatch


def tiny_schema(num_tasks: int = 2, num_dense: int = 3) -> Schema:
    """A 4-feature schema (user/item/multi-hot tags/context) with ``num_tasks`` binary tasks."""
    names = ["click", "like", "finish", "share", "comment", "follow"]
    return Schema(
        sparse=(
            SparseFeature("user_id", 50, side="user"),
            SparseFeature("item_id", 80, side="item"),
            SparseFeature("item_tags", 20, multi_hot=True, pooling="mean", side="item"),
            SparseFeature("hour", 24, side="context"),
        ),
        dense=tuple(DenseFeature(f"d{i}") for i in range(num_dense)),
        tasks=tuple(TaskSpec(n) for n in names[:num_tasks]),
        user_id_feature="user_id",
    )


def tiny_batch(schema: Schema, batch_size: int = 8, seed: int = 0) -> MTLBatch:
    """Random ids within each table, random dense values, random 0/1 labels, full mask."""
    g = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for f in schema.sparse:
        ln = (
            torch.randint(0, 4, (batch_size,), generator=g)
            if f.multi_hot
            else torch.ones(batch_size, dtype=torch.long)
        )
        lengths.append(ln)
        values.append(torch.randint(0, f.num_embeddings, (int(ln.sum()),), generator=g))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=schema.sparse_names, values=torch.cat(values), lengths=torch.cat(lengths)
    )
    t = len(schema.tasks)
    return MTLBatch(
        dense=torch.randn(batch_size, len(schema.dense), generator=g),
        sparse=kjt,
        labels=torch.randint(0, 2, (batch_size, t), generator=g).float(),
        label_mask=torch.ones(batch_size, t, dtype=torch.bool),
    )


def write_trust_release(d: str | Path, seed: int = 0, users: int = 40, items: int = 60, groups: int = 4) -> tuple[Path, Path]:
    """A planted Ciao-format release (``rating.mat``, ``trustnetwork.mat``) in ``d``: users and items
    in ``groups`` groups, users rate mostly their group's items (12 ratings each), trust mostly
    within the group (some users trust nobody), an item's category is its group."""
    import scipy.io

    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, users + 1):
        g = u % groups
        for _ in range(12):
            i = int(rng.integers(0, items // groups)) * groups + (g if rng.random() < 0.85 else int(rng.integers(groups)))
            rows.append([u, i + 1, (i % groups) + 1, int(rng.integers(1, 6)), 1])
    trust = [[u, v] for u in range(1, users + 1) for v in range(1, users + 1)
             if u != v and u % groups == v % groups and rng.random() < 0.4 and u % 7]
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(d / "rating.mat", {"rating": np.array(rows, np.int32)})
    scipy.io.savemat(d / "trustnetwork.mat", {"trustnetwork": np.array(trust, np.uint16)})
    return d / "rating.mat", d / "trustnetwork.mat"
