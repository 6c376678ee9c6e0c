"""The distributed, pipelined training entry point.

Reads top to bottom (DESIGN.md §5.9): process group → schema → model on ``meta`` → shard →
optimizers → data → pipelined loop → evaluation → outputs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.config import TrainConfig
from recsys_mtl.data.reader import make_dataloader
from recsys_mtl.data.schema import Schema
from recsys_mtl.distributed.env import DistEnv, init_distributed
from recsys_mtl.distributed.optim import make_optimizer
from recsys_mtl.distributed.sharding import plan_summary, shard_model
from recsys_mtl.metrics import MTLMetrics, format_table
from recsys_mtl.models import build_model
from recsys_mtl.train.losses import MultiTaskLoss
from recsys_mtl.train.task import MTLTrainModule
from recsys_mtl.types import MTLBatch

PIPELINES = {"sparse_dist": TrainPipelineSparseDist, "base": TrainPipelineBase}


class SyncedIterator:
    """Iterates a per-rank loader in lock-step with the other ranks.

    Sharded embedding lookups are collectives, so every rank must run the same number of steps.
    ``mode="stop"`` ends as soon as any rank runs out (training); ``mode="pad"`` goes on until
    every rank is out, feeding exhausted ranks an all-masked batch (evaluation, nothing dropped).
    Partial batches are padded to ``batch_size`` with masked rows so every step has one shape.
    """

    def __init__(
        self, it: Iterator[MTLBatch], *, batch_size: int, schema: Schema, mode: str, device: torch.device,
        max_steps: int | None = None,
    ) -> None:
        self.it, self.batch_size, self.schema, self.mode, self.device = it, batch_size, schema, mode, device
        self.max_steps = max_steps
        self.steps = 0
        self.real_samples = 0

    def __iter__(self) -> "SyncedIterator":
        return self

    def __next__(self) -> MTLBatch:
        if self.max_steps is not None and self.steps >= self.max_steps:
            raise StopIteration
        batch = next(self.it, None)
        have = torch.tensor([0 if batch is None else 1], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(have, op=dist.ReduceOp.MIN if self.mode == "stop" else dist.ReduceOp.MAX)
        if int(have) == 0:
            raise StopIteration
        if batch is None:
            batch = empty_batch(self.schema, 0)
        self.real_samples += batch.batch_size
        self.steps += 1
        return pad_batch(batch, self.batch_size).to(self.device)


def empty_batch(schema: Schema, batch_size: int) -> MTLBatch:
    """``batch_size`` rows with no ids, zero dense values and labels, and an all-False mask."""
    t = len(schema.tasks)
    kjt = KeyedJaggedTensor(
        keys=schema.sparse_names,
        values=torch.zeros(0, dtype=torch.long),
        lengths=torch.zeros(batch_size * len(schema.sparse), dtype=torch.int32),
    )
    return MTLBatch(
        dense=torch.zeros(batch_size, len(schema.dense)),
        sparse=kjt,
        labels=torch.zeros(batch_size, t),
        label_mask=torch.zeros(batch_size, t, dtype=torch.bool),
    )


def pad_batch(batch: MTLBatch, batch_size: int) -> MTLBatch:
    """Appends masked empty rows so the batch has exactly ``batch_size`` rows."""
    n = batch.batch_size
    if n == batch_size:
        return batch
    pad = batch_size - n
    kjt = batch.sparse
    keys = kjt.keys()
    lengths = kjt.lengths().view(len(keys), n)  # F x n
    lengths = torch.cat([lengths, torch.zeros(len(keys), pad, dtype=lengths.dtype)], dim=1)  # F x B
    sparse = KeyedJaggedTensor(keys=keys, values=kjt.values(), lengths=lengths.reshape(-1))
    t = batch.labels.shape[1]
    return MTLBatch(
        dense=torch.cat([batch.dense, torch.zeros(pad, batch.dense.shape[1], dtype=batch.dense.dtype)]),
        sparse=sparse,
        labels=torch.cat([batch.labels, torch.zeros(pad, t, dtype=batch.labels.dtype)]),
        label_mask=torch.cat([batch.label_mask, torch.zeros(pad, t, dtype=torch.bool)]),
    )


def evaluate(
    model: nn.Module, cfg: TrainConfig, schema: Schema, env: DistEnv
) -> dict[str, dict[str, float]]:
    """Runs the sharded model over the eval split (every rank its share) and returns per-task metrics."""
    metrics = MTLMetrics(schema.tasks, batch_size=cfg.batch_size, world_size=env.world_size, rank=env.rank,
                         device=env.device)
    loader = make_dataloader(cfg.data, "eval", batch_size=cfg.batch_size, rank=env.rank,
                             world_size=env.world_size, num_workers=cfg.num_workers)
    batches = SyncedIterator(iter(loader), batch_size=cfg.batch_size, schema=schema, mode="pad", device=env.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            _, (_, logits, labels, mask) = model(batch)
            metrics.update(logits, labels, mask)
    model.train(was_training)
    return metrics.compute()


def train(cfg: TrainConfig) -> dict | None:
    """Trains ``cfg.model`` sharded over the current process group; returns the metrics dict
    (written to ``OUTPUT/metrics.json`` by rank 0), None on other ranks."""
    env = init_distributed()
    torch.manual_seed(cfg.seed)
    schema = Schema.load(cfg.data)
    out_dir = Path(cfg.output_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # Model on meta, sharded once; dense parts are materialised and initialised by DMP.
    model = MTLTrainModule(build_model(schema, cfg.model, device="meta"), MultiTaskLoss(schema.tasks))
    dmp, plan = shard_model(
        model, cfg.sharding, cfg.optim, device=env.device, world_size=env.world_size,
        local_world_size=env.local_world_size, batch_size=cfg.batch_size,
    )
    if env.is_main:
        (out_dir / "sharding_plan.txt").write_text(plan_summary(plan) + "\n\n" + str(plan) + "\n")
        print(f"sharding plan ({env.world_size} ranks):\n{plan_summary(plan)}", flush=True)
    optimizer = make_optimizer(dmp, cfg.optim)
    if cfg.pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {cfg.pipeline!r}; choose from {', '.join(PIPELINES)}")
    pipeline = PIPELINES[cfg.pipeline](dmp, optimizer, env.device)

    steps, samples, train_time = 0, 0, 0.0
    history: list[dict] = []
    bar = tqdm(total=cfg.steps, disable=not env.is_main, unit="step", dynamic_ncols=True, mininterval=1.0)
    for epoch in range(cfg.epochs if cfg.steps is None else 1 << 30):
        loader = make_dataloader(cfg.data, "train", batch_size=cfg.batch_size, rank=env.rank,
                                 world_size=env.world_size, num_workers=cfg.num_workers, drop_last=True,
                                 epoch=epoch, seed=cfg.seed)
        remaining = None if cfg.steps is None else cfg.steps - steps
        batches = SyncedIterator(iter(loader), batch_size=cfg.batch_size, schema=schema, mode="stop",
                                 device=env.device, max_steps=remaining)
        dmp.train()
        t0 = time.perf_counter()
        epoch_steps = 0
        while True:
            try:
                loss, *_ = pipeline.progress(batches)
            except StopIteration:
                break
            steps += 1
            epoch_steps += 1
            samples += cfg.batch_size * env.world_size
            if steps % cfg.log_every == 0 or steps == 1:
                elapsed = train_time + time.perf_counter() - t0
                bar.set_postfix(epoch=epoch, loss=f"{float(loss):.4f}", samples_per_s=f"{samples / elapsed:,.0f}")
            bar.update(1)
            if cfg.eval_every and steps % cfg.eval_every == 0:
                train_time += time.perf_counter() - t0
                history.append({"step": steps, "tasks": _eval_detached(pipeline, dmp, cfg, schema, env)})
                t0 = time.perf_counter()
        train_time += time.perf_counter() - t0
        if epoch_steps == 0:
            if steps == 0:
                raise RuntimeError(f"no training batches: the train split of {cfg.data} has fewer than "
                                   f"batch_size={cfg.batch_size} rows on some rank")
            break
        if cfg.steps is not None and steps >= cfg.steps:
            break
    bar.close()

    final = _eval_detached(pipeline, dmp, cfg, schema, env)
    result = {
        "model": cfg.model.name,
        "world_size": env.world_size,
        "steps": steps,
        "samples_per_s": samples / max(train_time, 1e-9),
        "tasks": final,
        "history": history,
        "config": cfg.to_dict(),
    }
    if env.is_main:
        tmp = out_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out_dir / "metrics.json")
        print(f"\n{cfg.model.name}: {steps} steps x {env.world_size} ranks, "
              f"{result['samples_per_s']:,.0f} samples/s; eval metrics:\n{format_table(final)}", flush=True)
    return result if env.is_main else None


def _eval_detached(pipeline, dmp: nn.Module, cfg: TrainConfig, schema: Schema, env: DistEnv):
    # The pipeline rewrote the sharded modules' forwards to consume its prefetched inputs;
    # detach restores them for a plain forward over the eval data, attach re-installs them
    # (in-flight training batches are kept, so no sample is skipped).
    model = pipeline.detach() if hasattr(pipeline, "detach") else dmp
    try:
        return evaluate(model, cfg, schema, env)
    finally:
        if hasattr(pipeline, "attach"):
            pipeline.attach(model)
