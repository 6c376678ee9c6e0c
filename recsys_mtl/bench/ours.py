"""recsys_mtl's contender: the library's own training path, as the trainer runs it.

``build_model(workload.schema, workload.model, "meta")`` (any workload's architecture: W1's PLE,
W2's STEM-Net) → :class:`MTLTrainModule` → ``shard_model`` on a one-rank gloo group
(fused EXACT_ROWWISE_ADAGRAD tables) → ``make_optimizer`` (fused sparse + dense Adam); the runner
drives it with ``TrainPipelineSparseDist``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import KeyedOptimizer

from recsys_mtl.bench.workloads import Workload
from recsys_mtl.config import OptimConfig, ShardingConfig
from recsys_mtl.distributed.env import init_distributed
from recsys_mtl.distributed.optim import make_optimizer
from recsys_mtl.distributed.sharding import shard_model
from recsys_mtl.models import build_model
from recsys_mtl.modules.embeddings import SparseDenseInput
from recsys_mtl.train.losses import MultiTaskLoss
from recsys_mtl.train.task import MTLTrainModule

OPTIM = OptimConfig(sparse_optimizer="rowwise_adagrad", sparse_lr=0.05, dense_optimizer="adam", dense_lr=1e-3)
SHARDING = ShardingConfig(sharding_type="table_wise")


def build_ours(workload: Workload, batch_size: int) -> tuple[DistributedModelParallel, KeyedOptimizer, torch.device]:
    """Sharded train module and its combined optimizer (joins or creates a one-rank process group)."""
    env = init_distributed()
    model = build_model(workload.schema, workload.model, "meta")
    train_module = MTLTrainModule(model, MultiTaskLoss(workload.schema.tasks))
    dmp, _ = shard_model(
        train_module, SHARDING, OPTIM, device=env.device,
        world_size=env.world_size, local_world_size=env.local_world_size, batch_size=batch_size,
    )
    return dmp, make_optimizer(dmp, OPTIM), env.device


def find_ebcs(model: nn.Module) -> list[nn.Module]:
    """Every (sharded or unsharded) ``EmbeddingBagCollection`` in the model, in module order
    (PLE's one input EBC; STEM-Net's shared and per-task table sets)."""
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    found = [m for m in model.modules() if isinstance(m, (ShardedEmbeddingBagCollection, EmbeddingBagCollection))]
    if not found:
        raise RuntimeError("no EmbeddingBagCollection in the model")
    return found


def find_input_module(model: nn.Module) -> SparseDenseInput:
    """The model's (sharded) embedding input block."""
    for m in model.modules():
        if isinstance(m, SparseDenseInput):
            return m
    raise RuntimeError("no SparseDenseInput in the model")
