"""Benchmark workloads (DESIGN.md §7) and their synthetic batches.

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
    """

    name: str
    schema: Schema
    model: ModelConfig
    batch_size: int


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


def w2() -> Workload:
    raise NotImplementedError(
        "workload 'w2' (embedding-heavy STEM-Net, DESIGN.md §7) is not implemented yet; use 'w1'"
    )


WORKLOADS = {"w1": w1, "w1_tiny": w1_tiny, "w2": w2}


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from w1, w2")
    return WORKLOADS[name]()


def zipf_ids(num: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` ids in ``[0, vocab)`` with ``P(k) ~ 1/(k+1)`` (Zipf, exponent 1): log-uniform ranks."""
    u = torch.rand(num, generator=generator, dtype=torch.float64)
    ids = torch.floor(torch.exp(u * math.log(vocab + 1))).long() - 1  # num
    return ids.clamp_(0, vocab - 1)


def make_batches(workload: Workload, num_batches: int, batch_size: int | None = None, seed: int = 0) -> list[MTLBatch]:
    """``num_batches`` synthetic batches: Zipf ids, normal dense values, Bernoulli labels, full mask."""
    schema, bsz = workload.schema, batch_size or workload.batch_size
    g = torch.Generator().manual_seed(seed)
    rates = torch.tensor([0.2, 0.05, 0.1, 0.1][: len(schema.tasks)] + [0.1] * max(0, len(schema.tasks) - 4))
    out = []
    for _ in range(num_batches):
        values = torch.cat([zipf_ids(bsz, f.num_embeddings, g) for f in schema.sparse])  # (F*B)
        lengths = torch.ones(len(schema.sparse) * bsz, dtype=torch.int32)  # F*B, single-valued
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
