"""Benchmark workloads (docs/design.md §7) and their synthetic batches.

Every contender trains on the same batches: they are generated once per process from a fixed
seed (bitwise identical in every process) and converted to each contender's input format
before timing starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.config import ModelConfig
from recsys_mtl.data.schema import DenseFeature, Schema, SparseFeature, TaskSpec
from recsys_mtl.types import MTLBatch


@dataclass(frozen=True)
class Workload:
    """One benchmark setting: schema, architecture and batch size.

    Args:
        name (str): workload name as on the command line (``w1``).
        schema (Schema): features and tasks.
        model (ModelConfig): architecture (shared by all contenders).
        batch_size (int): samples per step.
        sequential (bool): run the contenders one after another, freeing each before building the
            next (tables too large for all contenders to live in one process at once), instead of
            interleaving their timed steps.
        scale (float): factor applied to the docs/design.md §7 vocabulary sizes (1.0 = as specified).
        max_bag (int): longest multi-hot bag (ids per sample of a multi-hot feature).
        mean_bag (float): mean multi-hot bag length (``1 + Poisson(mean_bag - 1)``, clipped to ``max_bag``).
    """

    name: str
    schema: Schema
    model: ModelConfig
    batch_size: int
    sequential: bool = False
    scale: float = 1.0
    max_bag: int = 20
    mean_bag: float = 5.0


def _sparse_features(sizes: list[tuple[int, int]]) -> tuple[SparseFeature, ...]:
    out, i = [], 0
    for count, vocab in sizes:
        for _ in range(count):
            out.append(SparseFeature(f"s{i:02d}", vocab))
            i += 1
    return tuple(out)


def w1_schema(vocab_scale: float = 1.0, num_dense: int = 13) -> Schema:
    """W1's schema: 26 single-valued features (4x1M + 8x100k + 14x10k ids), 13 dense, 2 binary tasks."""
    sizes = [(4, 1_000_000), (8, 100_000), (14, 10_000)]
    sizes = [(c, max(2, int(v * vocab_scale))) for c, v in sizes]
    return Schema(
        sparse=_sparse_features(sizes),
        dense=tuple(DenseFeature(f"d{i:02d}") for i in range(num_dense)),
        tasks=(TaskSpec("click"), TaskSpec("like")),
    )


def w1() -> Workload:
    """W1 — dense-heavy PLE: 2 levels, 2 task + 2 shared experts [256, 128], towers [64], batch 2048."""
    return Workload(
        name="w1",
        schema=w1_schema(),
        model=ModelConfig(
            name="ple", embedding_dim=16, expert_layer_sizes=(256, 128), tower_layer_sizes=(64,),
            num_task_experts=2, num_shared_experts=2, num_levels=2,
        ),
        batch_size=2048,
    )


def w1_tiny() -> Workload:
    """W1's structure at toy size, for tests and smoke runs (not a benchmark)."""
    return Workload(
        name="w1_tiny",
        schema=w1_schema(vocab_scale=1e-3, num_dense=3),
        model=ModelConfig(
            name="ple", embedding_dim=4, expert_layer_sizes=(16, 8), tower_layer_sizes=(4,),
            num_task_experts=2, num_shared_experts=2, num_levels=2,
        ),
        batch_size=64,
    )


W2_MULTI_HOT = 8


def w2_schema(vocab_scale: float = 1.0, num_dense: int = 0) -> Schema:
    """W2's schema: 26 features (8x1M + 18x100k ids), 8 of them multi-hot (sum-pooled), 2 binary tasks.

    The multi-hot features are ``s00-s03`` (1M ids: behaviour-sequence-like) and ``s08-s11``
    (100k ids: tag/category-like); the other 18 are single-valued. No dense features by default.
    """
    sizes = [(8, 1_000_000), (18, 100_000)]
    sizes = [(c, max(2, int(v * vocab_scale))) for c, v in sizes]
    multi_hot = {0, 1, 2, 3, 8, 9, 10, 11}
    assert len(multi_hot) == W2_MULTI_HOT
    feats = tuple(
        SparseFeature(f.name, f.num_embeddings, multi_hot=i in multi_hot)
        for i, f in enumerate(_sparse_features(sizes))
    )
    return Schema(
        sparse=feats,
        dense=tuple(DenseFeature(f"d{i:02d}") for i in range(num_dense)),
        tasks=(TaskSpec("click"), TaskSpec("like")),
    )


def w2() -> Workload:
    """W2 — embedding-heavy STEM-Net: shared + 2 task-specific table sets over all 26 features
    (3 x 9.8M rows x 32 = ~3.76 GB fp32), 1 shared + 1 specific expert [128], towers [64], the
    library's default gate MLP [128, 64] on ``x_task ⊕ x_shared``, batch 4096.

    The contenders run one after another (``sequential``): ours (~3.8 GB of tables) and the plain
    peer (~3.8 GB of tables + ~7.5 GB of SparseAdam state) would need ~15 GB side by side.
    """
    return Workload(
        name="w2",
        schema=w2_schema(),
        model=ModelConfig(
            name="stem", embedding_dim=32, expert_layer_sizes=(128,), tower_layer_sizes=(64,),
            num_shared_experts=1, num_task_experts=1, gate_layer_sizes=(128, 64),
            stem_gate_input="concat", stem_stop_gradient=True, stem_specific_fields="all",
        ),
        batch_size=4096,
        sequential=True,
    )


def w2_tiny() -> Workload:
    """W2's structure at toy size, for tests and smoke runs (not a benchmark)."""
    return Workload(
        name="w2_tiny",
        schema=w2_schema(vocab_scale=1e-3, num_dense=2),
        model=ModelConfig(
            name="stem", embedding_dim=4, expert_layer_sizes=(8,), tower_layer_sizes=(4,),
            num_shared_experts=1, num_task_experts=1, gate_layer_sizes=(8,),
            stem_gate_input="concat", stem_stop_gradient=True, stem_specific_fields="all",
        ),
        batch_size=64,
        sequential=True,
        scale=1e-3,
    )


WORKLOADS = {"w1": w1, "w1_tiny": w1_tiny, "w2": w2, "w2_tiny": w2_tiny}


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from w1, w2")
    return WORKLOADS[name]()


def bag_lengths(num: int, max_bag: int, mean_bag: float, generator: torch.Generator) -> torch.Tensor:
    """``num`` multi-hot bag lengths: ``1 + Poisson(mean_bag - 1)`` clipped to ``[1, max_bag]``."""
    rate = torch.full((num,), float(mean_bag) - 1.0, dtype=torch.float64)
    return (1 + torch.poisson(rate, generator=generator)).clamp_(1, max_bag).to(torch.int32)


def zipf_ids(num: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` ids in ``[0, vocab)`` with ``P(k) ~ 1/(k+1)`` (Zipf, exponent 1): log-uniform ranks."""
    u = torch.rand(num, generator=generator, dtype=torch.float64)
    ids = torch.floor(torch.exp(u * math.log(vocab + 1))).long() - 1  # num
    return ids.clamp_(0, vocab - 1)


def make_batches(workload: Workload, num_batches: int, batch_size: int | None = None, seed: int = 0) -> list[MTLBatch]:
    """``num_batches`` synthetic batches: Zipf ids, normal dense values, Bernoulli labels, full mask.

    Multi-hot features get :func:`bag_lengths` ids per sample (single-valued ones exactly one).
    """
    schema, bsz = workload.schema, batch_size or workload.batch_size
    g = torch.Generator().manual_seed(seed)
    rates = torch.tensor([0.2, 0.05, 0.1, 0.1][: len(schema.tasks)] + [0.1] * max(0, len(schema.tasks) - 4))
    out = []
    for _ in range(num_batches):
        values, lengths = [], []
        for f in schema.sparse:
            if f.multi_hot:
                lens = bag_lengths(bsz, workload.max_bag, workload.mean_bag, g)  # B
            else:
                lens = torch.ones(bsz, dtype=torch.int32)  # B, single-valued
            lengths.append(lens)
            values.append(zipf_ids(int(lens.sum()), f.num_embeddings, g))
        values, lengths = torch.cat(values), torch.cat(lengths)  # sum(lengths), F*B
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=schema.sparse_names, values=values, lengths=lengths)
        labels = (torch.rand(bsz, len(schema.tasks), generator=g) < rates).float()  # B x T
        out.append(
            MTLBatch(
                dense=torch.randn(bsz, len(schema.dense), generator=g),
                sparse=kjt,
                labels=labels,
                label_mask=torch.ones(bsz, len(schema.tasks), dtype=torch.bool),
            )
        )
    return out
