"""Planning and sharding with TorchRec's planner and DistributedModelParallel."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys_mtl.config import OptimConfig, ShardingConfig

SHARDING_TYPE_VALUES = {
    "table_wise": ShardingType.TABLE_WISE.value,
    "row_wise": ShardingType.ROW_WISE.value,
    "column_wise": ShardingType.COLUMN_WISE.value,
    "table_row_wise": ShardingType.TABLE_ROW_WISE.value,
    "data_parallel": ShardingType.DATA_PARALLEL.value,
}

FUSED_OPTIMIZERS = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
    "partial_rowwise_adam": EmbOptimType.PARTIAL_ROWWISE_ADAM,
    "lamb": EmbOptimType.LAMB,
}
GPU_ONLY_FUSED = {"adam", "partial_rowwise_adam", "lamb"}


class MTLEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """The stock EBC sharder, also offering row-wise and table-row-wise on CPU.

    TorchRec's sharder lists RW/TWRW only for CUDA; fbgemm's CPU kernels run them correctly
    (verified against the unsharded model in tests/distributed), so on CPU we offer every type
    and let the planner or the user's constraints choose.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        for extra in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
            if extra not in types:
                types.append(extra)
        return types


def fused_params(optim: OptimConfig, device: torch.device) -> dict:
    """fbgemm fused-optimizer parameters for model-parallel tables (applied in backward)."""
    name = optim.sparse_optimizer
    if name not in FUSED_OPTIMIZERS:
        raise ValueError(f"unknown sparse optimizer {name!r}; choose from {', '.join(FUSED_OPTIMIZERS)}")
    if device.type == "cpu" and name in GPU_ONLY_FUSED:
        raise ValueError(
            f"sparse optimizer {name!r} is GPU-only in fbgemm; on CPU use sgd, adagrad or rowwise_adagrad"
        )
    params: dict = {"optimizer": FUSED_OPTIMIZERS[name], "learning_rate": optim.sparse_lr}
    if name in ("adagrad", "rowwise_adagrad"):
        params["eps"] = 1e-8
    return params


def make_sharders(optim: OptimConfig, device: torch.device) -> list[EmbeddingBagCollectionSharder]:
    return [MTLEmbeddingBagCollectionSharder(fused_params=fused_params(optim, device))]


def table_names(model: nn.Module) -> list[str]:
    return [
        cfg.name
        for m in model.modules()
        if isinstance(m, EmbeddingBagCollection)
        for cfg in m.embedding_bag_configs()
    ]


def constraints_for(model: nn.Module, sharding: ShardingConfig) -> dict[str, ParameterConstraints]:
    """Per-table planner constraints from the config (unknown table names are errors)."""
    names = table_names(model)
    unknown = set(sharding.per_table) - set(names)
    if unknown:
        raise ValueError(f"sharding.per_table names unknown tables {sorted(unknown)}; tables: {names}")
    out = {}
    for name in names:
        st = sharding.per_table.get(name, sharding.sharding_type)
        if st is None:
            continue
        kernel = (
            EmbeddingComputeKernel.DENSE.value if st == "data_parallel" else EmbeddingComputeKernel.FUSED.value
        )
        out[name] = ParameterConstraints(sharding_types=[SHARDING_TYPE_VALUES[st]], compute_kernels=[kernel])
    return out


def plan_sharding(
    model: nn.Module,
    sharders: Sequence[EmbeddingBagCollectionSharder],
    sharding: ShardingConfig,
    *,
    world_size: int,
    local_world_size: int,
    device: torch.device,
    batch_size: int,
    pg: dist.ProcessGroup | None = None,
) -> ShardingPlan:
    """Runs TorchRec's planner on rank 0 and broadcasts the plan."""
    topology = Topology(
        world_size=world_size,
        local_world_size=local_world_size,
        compute_device=device.type,
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=constraints_for(model, sharding),
        debug=False,
    )
    if pg is not None or dist.is_initialized():
        return planner.collective_plan(model, list(sharders), pg)
    return planner.plan(model, list(sharders))


def shard_model(
    model: nn.Module,
    sharding: ShardingConfig,
    optim: OptimConfig,
    *,
    device: torch.device,
    world_size: int,
    local_world_size: int,
    batch_size: int,
    pg: dist.ProcessGroup | None = None,
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plans and shards every ``EmbeddingBagCollection`` in ``model`` (built on ``meta``).

    Model-parallel tables use fbgemm's fused kernel with the sparse optimizer applied in
    backward; data-parallel tables and dense modules are replicated (DDP) and stepped by the
    dense optimizer.
    """
    sharders = make_sharders(optim, device)
    plan = plan_sharding(
        model, sharders, sharding, world_size=world_size, local_world_size=local_world_size,
        device=device, batch_size=batch_size, pg=pg,
    )
    pg = pg or dist.GroupMember.WORLD
    dmp = DistributedModelParallel(
        module=model,
        device=device,
        env=ShardingEnv.from_process_group(pg),
        plan=plan,
        sharders=list(sharders),
    )
    return dmp, plan


def plan_summary(plan: ShardingPlan) -> str:
    """Human-readable plan: one line per table with its sharding type and shard placement."""
    lines = []
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            ranks = sorted({r for r in (ps.ranks or [])})
            sizes = [s.shard_sizes for s in ps.sharding_spec.shards] if ps.sharding_spec else []
            lines.append(
                f"{module_path or '<root>'}.{table}: {ps.sharding_type} kernel={ps.compute_kernel} "
                f"ranks={ranks} shard_sizes={sizes}"
            )
    return "\n".join(lines)
