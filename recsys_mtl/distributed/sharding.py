"""Planning and sharding with TorchRec's planner and DistributedModelParallel.

The planner runs on a topology of this machine (:func:`make_topology`: TorchRec's
``TopologyFactory`` fed with the real host/device memory and world layout), so a plan that
cannot fit is refused by the planner (:class:`ShardingPlanError`, on every rank) before any
table is allocated. Without an explicit sharding type, every table gets the default plan's
constraints (:func:`constraints_for`).
"""

from __future__ import annotations

import re
import warnings
from typing import Sequence

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    ParameterConstraints,
    PlannerError,
    PlannerErrorType,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys_mtl.config import OptimConfig, ShardingConfig
from recsys_mtl.distributed.hardware import host_memory_bytes
from recsys_mtl.distributed.noise import quiet_known_noise

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


def table_configs(model: nn.Module) -> list[EmbeddingBagConfig]:
    """Every table of every ``EmbeddingBagCollection`` in ``model``, in module order."""
    return [cfg for m in model.modules() if isinstance(m, EmbeddingBagCollection) for cfg in m.embedding_bag_configs()]


def table_names(model: nn.Module) -> list[str]:
    return [cfg.name for cfg in table_configs(model)]


# ---- the default plan ------------------------------------------------------------------------
#
# Why not leave every table to the planner: its choice depends on the world size, and a
# checkpoint only reshards between world sizes when each table stays in one of two families:
#   - replicated (data_parallel): full weights + dense-optimizer state on every rank;
#   - row-wise layouts (table_wise, row_wise, table_row_wise): fbgemm's fused optimizer state is
#     per row, so DCP maps it exactly between any of them and any shard count.
# (column_wise keeps per-column-shard state, and moving a table between the families changes its
# optimizer.) On Census-Income-shaped data (32 tables of 2-53 rows) the unconstrained planner
# made 31 tables data_parallel at 2 ranks but table_row_wise at 1 rank, so a checkpoint written
# on one world size did not load on the other.
#
# Which family: measured with `recsys-mtl bench plans` (2 gloo CPU ranks, one thread each, PLE,
# batch 512 per rank, dim 16; benchmarks/results/plans*.json), replicating the 32 Census tables
# is the fastest plan, 1.11x table_wise and 1.22x row_wise: a sharded table costs latency-bound
# collectives every step (input all-to-all, then a pooled all-to-all / reduce-scatter forward
# and backward: 7-14 ms/step here), while a replicated table only adds rows x dim floats to the
# dense all-reduce and to the dense optimizer step. Per table the two costs scale as its rows
# vs. its lookups per step, so the crossover is in rows: with three of the tables widened to
# 4,096 rows replication still won (1.14x table_wise), at 16,384 rows it tied, at 50,000 rows it
# lost (0.93x) and this rule's plan (those three sharded, the rest replicated) was the fastest.
# Hence: tables with at most `data_parallel_max_rows` rows are data_parallel, larger ones get the
# row-wise family and the planner chooses among its types and places the shards.
#
# The reported slowness of data_parallel here (Census rows, PLE, batch 512, 2 ranks via
# `--nproc-per-node 2`: ~1,100 samples/s for data_parallel and ~2,400 for the old default against
# ~5,800 for row_wise) was not the plan. Profiled (torch.profiler, per-thread CPU time): the same
# ops on the same shapes ran 3x (GEMMs) to 8-11x (elementwise, ReLU, Adam) slower in the
# data_parallel run, and each rank burnt 4x the CPU time per step, while its table lookups took
# under 1 ms/step. The local launcher gave each of the 2 ranks a 2-thread OpenMP pool on 2 cores,
# so every parallel region waited for a preempted thread; row_wise suffered less, its ranks
# spending part of each step blocked in collectives. The launcher now gives each rank its share
# of the cores, as torchrun does, and then data_parallel is the fastest type on that data (CLI,
# same data: ~15,000-19,000 samples/s for data_parallel and the default, ~14,500 for row_wise).
REPLICATED_FAMILY: tuple[str, ...] = ("data_parallel",)
ROW_WISE_FAMILY: tuple[str, ...] = ("table_wise", "row_wise", "table_row_wise")


def default_sharding_types(cfg: EmbeddingBagConfig, sharding: ShardingConfig) -> tuple[str, ...]:
    """The sharding types the default plan allows for table ``cfg`` (independent of world size).

    Example::

        >>> from recsys_mtl.config import ShardingConfig
        >>> small = EmbeddingBagConfig(num_embeddings=50, embedding_dim=16, name="t", feature_names=["t"])
        >>> default_sharding_types(small, ShardingConfig())
        ('data_parallel',)
        >>> default_sharding_types(small, ShardingConfig(data_parallel_max_rows=0))
        ('table_wise', 'row_wise', 'table_row_wise')
    """
    if cfg.num_embeddings <= sharding.data_parallel_max_rows:
        return REPLICATED_FAMILY
    return ROW_WISE_FAMILY


def constraints_for(model: nn.Module, sharding: ShardingConfig) -> dict[str, ParameterConstraints]:
    """Per-table planner constraints: the config's type (``sharding_type`` / ``per_table``) or
    the default plan's family (:func:`default_sharding_types`). Data-parallel tables use the
    dense kernel, the others fbgemm's fused one. Unknown table names are errors."""
    cfgs = table_configs(model)
    names = [c.name for c in cfgs]
    unknown = set(sharding.per_table) - set(names)
    if unknown:
        raise ValueError(f"sharding.per_table names unknown tables {sorted(unknown)}; tables: {names}")
    out = {}
    for cfg in cfgs:
        st = sharding.per_table.get(cfg.name, sharding.sharding_type)
        types = (st,) if st is not None else default_sharding_types(cfg, sharding)
        kernel = EmbeddingComputeKernel.DENSE if types == ("data_parallel",) else EmbeddingComputeKernel.FUSED
        out[cfg.name] = ParameterConstraints(
            sharding_types=[SHARDING_TYPE_VALUES[t] for t in types], compute_kernels=[kernel.value]
        )
    return out


# ---- the topology: this machine --------------------------------------------------------------

GIB = 1 << 30
RESERVED_FRACTION = 0.15  # TorchRec's default margin, on top of the dense model and input buffers


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of a CUDA device (None for CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def make_topology(
    sharding: ShardingConfig, *, world_size: int, local_world_size: int, device: torch.device
) -> Topology:
    """TorchRec ``Topology`` of this job via ``TopologyFactory``.

    Detected (``HardwareConfig``): host memory per rank = :func:`host_memory_bytes` divided by
    the ranks on this host; on CUDA, the device's memory. ``sharding.ddr_cap_gb`` /
    ``hbm_cap_gb`` override them (``TrainerConfig``, which the factory ranks highest) for ranks
    whose hardware differs from this host's. Bandwidths are TorchRec's defaults.

    Example::

        >>> from recsys_mtl.config import ShardingConfig
        >>> t = make_topology(ShardingConfig(ddr_cap_gb=8), world_size=2, local_world_size=2,
        ...                   device=torch.device("cpu"))
        >>> t.world_size, t.devices[1].storage.ddr == 8 * GIB, t.devices[0].storage.hbm
        (2, True, 0)
    """
    hardware = HardwareConfig(
        ddr_cap_bytes=host_memory_bytes() // max(1, local_world_size),
        hbm_cap_bytes=device_memory_bytes(device),
    )
    trainer = TrainerConfig(
        world_size=world_size,
        local_world_size=local_world_size,
        ddr_cap_bytes=None if sharding.ddr_cap_gb is None else int(sharding.ddr_cap_gb * GIB),
        hbm_cap_bytes=None if sharding.hbm_cap_gb is None else int(sharding.hbm_cap_gb * GIB),
    )
    return TopologyFactory.create_topology(trainer, hardware, KernelConfig(compute_device=device.type))


# ---- planning ----------------------------------------------------------------------------------


class ShardingPlanError(RuntimeError):
    """TorchRec's planner found no plan that fits the topology (raised on every rank)."""


def _dense_bytes(model: nn.Module) -> int:
    """Parameters and buffers outside the embedding tables, in bytes."""
    tables = {id(p) for m in model.modules() if isinstance(m, EmbeddingBagCollection) for p in m.parameters()}
    params = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in tables)
    return params + sum(b.numel() * b.element_size() for b in model.buffers())


def _fmt_gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 100 else f"{n / 2**20:.2f} MiB"


def _refusal(
    error: PlannerError, model: nn.Module, sharding: ShardingConfig, topology: Topology, batch_size: int
) -> str:
    cfgs = table_configs(model)
    size = {c.name: c.num_embeddings * c.embedding_dim * 4 for c in cfgs}  # fp32 weights
    biggest = max(cfgs, key=lambda c: size[c.name])
    gpu = topology.compute_device in ("cuda", "mtia")
    cap = topology.devices[0].storage.hbm if gpu else topology.devices[0].storage.ddr
    kind, flag = ("device (HBM)", "--hbm-cap-gb") if gpu else ("host (DDR)", "--ddr-cap-gb")
    given = sharding.hbm_cap_gb if gpu else sharding.ddr_cap_gb
    if given is not None:
        source = f"set by {flag}"
    elif gpu:
        source = "detected: the GPU's memory"
    else:
        source = f"detected: {_fmt_gib(host_memory_bytes())} on this host / {topology.local_world_size} local rank(s)"
    text = str(error)
    if error.error_type != PlannerErrorType.INSUFFICIENT_STORAGE:
        return (f"no sharding plan: TorchRec's planner refused the tables' constraints (nothing was allocated; "
                f"check --sharding / --table-sharding against the tables and {topology.world_size} rank(s)): "
                f"{text.strip()}")
    need = re.search(r"Global storage requirement for model parallel: (Storage\(.*?\))", text)
    have = re.search(r"Global storage available for model parallel: (Storage\(.*?\))", text)
    summary = text.strip().splitlines()[0].strip() if text.strip() else type(error).__name__
    if need and have:
        summary += f" Tables need {need.group(1)} in all, the ranks have {have.group(1)} for them."
    return (
        f"no sharding plan fits: TorchRec's planner refused the tables (nothing was allocated).\n"
        f"  tables: {len(cfgs)}, {_fmt_gib(sum(size.values()))} of fp32 weights; largest {biggest.name}: "
        f"{biggest.num_embeddings:,} rows x {biggest.embedding_dim} = {_fmt_gib(size[biggest.name])}\n"
        f"  memory: {topology.world_size} rank(s) x {_fmt_gib(cap)} of {kind} memory ({source}); "
        f"{RESERVED_FRACTION:.0%} of it, the dense model and the input batches (batch {batch_size}) are kept "
        f"out of the tables' share\n"
        f"  fix: fewer rows, a smaller --embedding-dim or ranks on more hosts; if the ranks have more memory "
        f"than detected (e.g. a cluster job), give it with {flag} GIB_PER_RANK\n"
        f"  planner: {summary}"
    )


class _HostMemoryReservation(HeuristicalStorageReservation):
    """TorchRec's heuristic reservation (margin + dense model + input batches). TorchRec takes
    the margin from HBM only; on CPU the tables live in host memory, so it is taken from DDR."""

    def reserve(self, topology: Topology, *args, **kwargs) -> Topology:
        reserved = super().reserve(topology, *args, **kwargs)
        if topology.compute_device == "cpu":
            for d in reserved.devices:
                d.storage.ddr = int((1 - self._percentage) * d.storage.ddr)
        return reserved


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
    """Runs TorchRec's planner on rank 0 (on this machine's topology) and broadcasts the plan.

    Raises:
        ShardingPlanError: on every rank, when the planner finds no plan that fits; it names
            the tables' size, the memory per rank and the flags that change them.
    """
    quiet_known_noise()  # TorchRec's per-data-parallel-table notices (see distributed/noise.py)
    topology = make_topology(sharding, world_size=world_size, local_world_size=local_world_size, device=device)
    with warnings.catch_warnings():  # TorchRec's default policy; we pass the dense estimate it asks for
        warnings.filterwarnings("ignore", "HeuristicalStorageReservation", FutureWarning)
        reservation = _HostMemoryReservation(
            percentage=RESERVED_FRACTION, dense_tensor_estimate=max(1, 6 * _dense_bytes(model))
        )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=constraints_for(model, sharding),
        storage_reservation=reservation,
        debug=False,
    )

    failure: list[BaseException] = []

    def run() -> ShardingPlan | tuple[str, str]:
        try:
            return planner.plan(model, list(sharders))
        except PlannerError as e:
            return "refused", _refusal(e, model, sharding, topology, batch_size)
        except Exception as e:  # a bug, not a refusal: re-raised here, reported to the other ranks
            failure.append(e)
            return "failed", f"planning failed on rank 0: {type(e).__name__}: {e}"

    if pg is None and dist.is_initialized():
        pg = dist.GroupMember.WORLD
    if pg is None or pg.size() == 1:
        result = run()
    else:  # like planner.collective_plan, but a failure reaches every rank instead of hanging them
        box = [run() if pg.rank() == 0 else None]
        dist.broadcast_object_list(box, group=pg, group_src=0)
        result = box[0]
    if failure:
        raise failure[0]
    if isinstance(result, tuple):
        raise ShardingPlanError(result[1])
    return result


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
    """Plans (:func:`plan_sharding`) and shards every ``EmbeddingBagCollection`` in ``model``
    (built on ``meta``, so a refused plan allocates nothing).

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
