"""The default sharding plan, the planner's topology of this machine, and refused plans.

Planning needs only the tables' configs: models are built on ``meta`` and planned for a given
world size without a process group, except where the test is about several ranks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
from pathlib import Path

import pytest
import torch

from checkpoint_state import full_state
from multirank import run_ranks

CPU = torch.device("cpu")
THIRTY_GIB_ROWS = 30 * (1 << 30) // (16 * 4)  # a 30 GiB fp32 table of dim 16


def _train_module(schema, model: str = "ple"):
    from recsys_mtl.config import ModelConfig
    from recsys_mtl.models import build_model
    from recsys_mtl.train.losses import MultiTaskLoss
    from recsys_mtl.train.task import MTLTrainModule

    return MTLTrainModule(build_model(schema, ModelConfig(name=model), "meta"), MultiTaskLoss(schema.tasks))


def _plan_types(module, sharding, world_size: int) -> dict[str, str]:
    from recsys_mtl.config import OptimConfig
    from recsys_mtl.distributed.sharding import make_sharders, plan_sharding

    plan = plan_sharding(module, make_sharders(OptimConfig(), CPU), sharding, world_size=world_size,
                         local_world_size=world_size, device=CPU, batch_size=512)
    return {t: ps.sharding_type for m in plan.plan.values() for t, ps in m.items()}


def _census_with_large_tables():
    """Census-Income's 32 tables, three of them widened to 50k rows."""
    from recsys_mtl.bench.plans import WIDENED, census_schema

    return census_schema(wide_rows=50_000), set(WIDENED)


def _family(sharding_type: str) -> str:
    return {"data_parallel": "replicated", "column_wise": "column_wise"}.get(sharding_type, "row-wise")


def test_default_plan_on_census_keeps_each_table_in_one_family_at_every_world_size():
    from recsys_mtl.bench.plans import census_schema
    from recsys_mtl.config import ShardingConfig

    census = _train_module(census_schema())
    for ws in (1, 2, 4):
        # 32 tables of 3-53 rows: replicated at every world size (the fastest plan on such data).
        assert set(_plan_types(census, ShardingConfig(), ws).values()) == {"data_parallel"}, ws

    schema, big = _census_with_large_tables()
    module = _train_module(schema)
    plans = {ws: _plan_types(module, ShardingConfig(), ws) for ws in (1, 2, 4)}
    for ws, types in plans.items():
        assert len(types) == 32
        assert {t for t, st in types.items() if st != "data_parallel"} == big, (ws, types)
        assert {types[t] for t in big} <= {"table_wise", "row_wise", "table_row_wise"}, (ws, types)
        assert "column_wise" not in types.values()
    # So every table stays in its family whatever the world size: checkpoints reshard.
    assert len({tuple(sorted((t, _family(st)) for t, st in p.items())) for p in plans.values()}) == 1
    # 0 shards every table (no replicas); an explicit type still wins over the default plan.
    assert set(_plan_types(module, ShardingConfig(data_parallel_max_rows=0), 2).values()) <= {
        "table_wise", "row_wise", "table_row_wise"}
    assert set(_plan_types(module, ShardingConfig(sharding_type="column_wise"), 2).values()) == {"column_wise"}


def _meminfo_total() -> int:
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return kib * 1024


def test_topology_is_this_machine_and_flags_override_it(caplog):
    from recsys_mtl.config import ShardingConfig
    from recsys_mtl.distributed.hardware import host_memory_bytes
    from recsys_mtl.distributed.sharding import GIB, make_topology

    host = host_memory_bytes()
    assert 0 < host <= _meminfo_total() and host > _meminfo_total() // 2  # RAM (cgroup-capped), not 128 GB
    with caplog.at_level(logging.WARNING):
        t = make_topology(ShardingConfig(), world_size=4, local_world_size=2, device=CPU)
    assert "constructed directly" not in caplog.text
    assert t.world_size == 4 and t.local_world_size == 2 and t.compute_device == "cpu"
    assert [d.storage.ddr for d in t.devices] == [host // 2] * 4  # two ranks share each host
    assert [d.storage.hbm for d in t.devices] == [0] * 4
    t = make_topology(ShardingConfig(ddr_cap_gb=512), world_size=2, local_world_size=2, device=CPU)
    assert [d.storage.ddr for d in t.devices] == [512 * GIB] * 2


def _assert_refusal(msg: str, ranks: int) -> None:
    assert "no sharding plan fits" in msg and "nothing was allocated" in msg
    assert "huge: 503,316,480 rows x 16 = 30.00 GiB" in msg
    assert f"{ranks} rank(s) x " in msg and "host (DDR) memory (detected:" in msg
    assert "--ddr-cap-gb" in msg and "insufficient storage" in msg


def _huge_schema():
    from recsys_mtl.data.schema import DenseFeature, Schema, SparseFeature, TaskSpec

    return Schema(sparse=(SparseFeature("huge", THIRTY_GIB_ROWS), SparseFeature("small", 10)),
                  dense=(DenseFeature("d"),), tasks=(TaskSpec("click"), TaskSpec("like")))


def test_impossible_table_is_refused_by_the_planner_before_allocation():
    from recsys_mtl.config import OptimConfig, ShardingConfig
    from recsys_mtl.distributed.sharding import ShardingPlanError, shard_model

    module = _train_module(_huge_schema(), "mmoe")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for ws in (1, 2):
        with pytest.raises(ShardingPlanError) as e:
            shard_model(module, ShardingConfig(), OptimConfig(), device=CPU, world_size=ws, local_world_size=ws,
                        batch_size=512)
        _assert_refusal(str(e.value), ws)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 1 << 20  # < 1 GiB (KiB units)
    # Ranks with 64 GiB each (a cluster job, given by flag) can hold it row-wise.
    types = _plan_types(module, ShardingConfig(ddr_cap_gb=64), 2)
    assert types["huge"] in ("row_wise", "table_row_wise") and types["small"] == "data_parallel"


def _shard_huge() -> str:
    from recsys_mtl.config import OptimConfig, ShardingConfig
    from recsys_mtl.distributed.env import init_distributed
    from recsys_mtl.distributed.sharding import ShardingPlanError, shard_model

    env = init_distributed()
    try:
        shard_model(_train_module(_huge_schema(), "mmoe"), ShardingConfig(), OptimConfig(), device=env.device,
                    world_size=env.world_size, local_world_size=env.world_size, batch_size=512)
    except ShardingPlanError as e:
        return str(e)
    return "planned"


@pytest.mark.multirank
def test_refusal_reaches_every_rank():
    for msg in run_ranks(_shard_huge, 2, timeout=120):  # rank 1 gets rank 0's refusal instead of hanging
        _assert_refusal(msg, 2)


# ---- checkpoints of the default plan reshard between 1 and 2 ranks ---------------------------

BATCH = 64


def _cfg(data: str, out: str, ck: str, steps: int):
    from recsys_mtl.config import ModelConfig, OptimConfig, ShardingConfig, TrainConfig

    # 64 rows: the user (60) and hour tables are replicated, items / categories / tags sharded.
    return TrainConfig(
        data=data, output_dir=out, batch_size=BATCH, steps=steps, seed=0, log_every=1000, eval_outputs=False,
        model=ModelConfig(name="mmoe", embedding_dim=8, expert_layer_sizes=(16,), tower_layer_sizes=(8,),
                          num_experts=2),
        sharding=ShardingConfig(data_parallel_max_rows=64), optim=OptimConfig(dense_lr=1e-2),
        checkpoint_dir=ck, keep_last=10, resume_with_new_settings=True,  # resumes run longer than written
    )


def _train(data: str, out: str, ck: str, steps: int) -> dict:
    from recsys_mtl.train.loop import train

    result = train(_cfg(data, out, ck, steps))
    return {"steps": result["steps"]} if result is not None else {}


def _load_resave(data: str, src: str, dst: str) -> list:
    """Loads checkpoint ``src`` into this job's default plan and saves it again to ``dst``."""
    from recsys_mtl.data.schema import Schema
    from recsys_mtl.distributed.env import init_distributed
    from recsys_mtl.distributed.optim import make_optimizer
    from recsys_mtl.distributed.sharding import shard_model
    from recsys_mtl.models import build_model
    from recsys_mtl.train.checkpoint import TrainPosition
    from recsys_mtl.train.loop import make_checkpointer
    from recsys_mtl.train.losses import MultiTaskLoss
    from recsys_mtl.train.task import MTLTrainModule

    env = init_distributed()
    cfg = _cfg(data, dst, dst, 1)
    schema = Schema.load(data)
    model = MTLTrainModule(build_model(schema, cfg.model, "meta"), MultiTaskLoss(schema.tasks))
    dmp, plan = shard_model(model, cfg.sharding, cfg.optim, device=env.device, world_size=env.world_size,
                            local_world_size=env.world_size, batch_size=BATCH)
    opt = make_optimizer(dmp, cfg.optim)
    ck = make_checkpointer(cfg, env, schema, plan)
    pos = ck.load(Path(src), dmp, opt)
    ck.save(dmp, opt, TrainPosition(pos.step, pos.epoch, pos.epoch_batches))
    return sorted({ps.sharding_type for m in plan.plan.values() for ps in m.values()})


@pytest.fixture(scope="module")
def default_plan_runs(tmp_path_factory) -> dict:
    from recsys_mtl.data.synth import generate_recsys

    root = tmp_path_factory.mktemp("reshard")
    data = root / "data"
    generate_recsys(data, rows=800, seed=5, num_users=60, num_items=90, eval_fraction=0.1, rows_per_file=270,
                    row_group_size=90)
    ck2, ck1 = root / "ck2", root / "ck1"
    run_ranks(_train, 2, str(data), str(root / "a"), str(ck2), 6)  # written by 2 ranks
    run_ranks(_train, 1, str(data), str(root / "b"), str(ck1), 5)  # written by 1 rank
    return {"root": root, "data": data, "ck2": ck2 / "step_00000006", "ck1": ck1 / "step_00000005"}


def _full_state(path: Path, tmp: Path) -> dict[str, object]:
    return full_state(path, tmp)


@pytest.mark.multirank
@pytest.mark.parametrize("src, ranks", [("ck2", 1), ("ck1", 2)])
def test_default_plan_checkpoint_reshards_exactly(default_plan_runs, tmp_path, src, ranks):
    path = default_plan_runs[src]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["world_size"] == 3 - ranks
    kinds = {v["sharding_type"] for v in meta["plan"].values()}
    assert "data_parallel" in kinds and kinds - {"data_parallel"}  # both families are covered
    out = run_ranks(_load_resave, ranks, str(default_plan_runs["data"]), str(path), str(tmp_path / "re"))
    assert "data_parallel" in out[0]
    a, b = _full_state(path, tmp_path), _full_state(tmp_path / "re" / path.name, tmp_path)
    assert a.keys() == b.keys()
    # Weights, fused row-wise state, Adam state of the replicated tables and dense layers: exact.
    assert [k for k, v in a.items() if isinstance(v, torch.Tensor) and not torch.equal(v, b[k])] == []


@pytest.mark.multirank
def test_default_plan_training_resumes_on_1_and_on_2_ranks(default_plan_runs):
    root, data = default_plan_runs["root"], str(default_plan_runs["data"])
    ck2 = str(default_plan_runs["ck2"].parent)
    assert run_ranks(_train, 1, data, str(root / "c"), ck2, 9)[0]["steps"] == 9  # 2 ranks -> 1
    assert run_ranks(_train, 2, data, str(root / "d"), ck2, 12)[0]["steps"] == 12  # -> 2 ranks again
    metas = [json.loads((Path(ck2) / f"step_{s:08d}" / "meta.json").read_text()) for s in (6, 9, 12)]
    assert [m["world_size"] for m in metas] == [2, 1, 2]
    families = [{t: _family(v["sharding_type"]) for t, v in m["plan"].items()} for m in metas]
    assert families[0] == families[1] == families[2]


def test_refused_reshard_names_the_flag_that_keeps_the_layout(tmp_path):
    from recsys_mtl.train.checkpoint import CheckpointError, CheckpointMeta, check_compatible

    plan = {"model.input.ebc.user": {"sharding_type": "data_parallel", "num_shards": 0},
            "model.input.ebc.item": {"sharding_type": "row_wise", "num_shards": 2}}
    meta = CheckpointMeta(format=1, step=1, epoch=0, epoch_batches=1, world_size=2, batch_size=8,
                          schema_fingerprint="f", model={}, optim={}, loss={}, plan=plan, plan_summary="",
                          data_positions=[], history=[], files={})
    info = {"schema_fingerprint": "f", "model": {}, "optim": {}, "loss": {}}
    new = {"model.input.ebc.user": {"sharding_type": "row_wise", "num_shards": 1},
           "model.input.ebc.item": {"sharding_type": "column_wise", "num_shards": 1}}
    with pytest.raises(CheckpointError) as e:
        check_compatible(meta, tmp_path, info, new, world_size=1)
    msg = str(e.value)
    assert "table model.input.ebc.user: cannot reshard data_parallel x0 -> row_wise x1" in msg
    assert "table model.input.ebc.item: cannot reshard row_wise x2 -> column_wise x1" in msg
    assert "keep those tables' layouts: --table-sharding item=row_wise --table-sharding user=data_parallel" in msg
    every = {t: {"sharding_type": "table_wise", "num_shards": 1} for t in plan}
    meta = dataclasses.replace(meta, plan={t: {"sharding_type": "data_parallel", "num_shards": 0} for t in plan})
    with pytest.raises(CheckpointError, match="keep those tables' layouts: --sharding data_parallel"):
        check_compatible(meta, tmp_path, info, every, world_size=1)


def test_local_launcher_gives_each_rank_its_share_of_the_cores(monkeypatch):
    import torch.distributed.launcher.api as launcher

    from recsys_mtl import cli

    seen = {}

    def fake_launch(config, entry):
        seen["nproc"] = config.nproc_per_node
        seen["threads"] = os.environ.get("OMP_NUM_THREADS")
        return lambda payload: None

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(launcher, "elastic_launch", fake_launch)
    assert cli._launch_local("train", print, {}, 2) == 0
    assert seen == {"nproc": 2, "threads": str(max(1, (os.cpu_count() or 1) // 2))}
