"""Every model in the zoo shards row-wise on 2 gloo ranks and trains through TrainPipelineSparseDist."""

from __future__ import annotations

import math

import pytest

from multirank import run_ranks

STEPS = 3
BATCH = 16


def _worker(variants: list[tuple[str, dict]]) -> dict:
    import dataclasses

    import torch
    import torch.distributed as dist
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from recsys_mtl.config import ModelConfig, OptimConfig, ShardingConfig
    from recsys_mtl.distributed.env import init_distributed
    from recsys_mtl.distributed.optim import make_optimizer
    from recsys_mtl.distributed.sharding import shard_model
    from recsys_mtl.models import build_model
    from recsys_mtl.testing import tiny_batch, tiny_schema
    from recsys_mtl.train.losses import MultiTaskLoss
    from recsys_mtl.train.task import MTLTrainModule

    env = init_distributed()
    schema = tiny_schema()
    base = ModelConfig(embedding_dim=8, expert_layer_sizes=(16, 8), tower_layer_sizes=(8,), gate_layer_sizes=(8,),
                       bottom_layer_sizes=(16, 8), num_experts=3, num_task_experts=1, num_shared_experts=1,
                       num_levels=2)
    optim = OptimConfig(sparse_optimizer="sgd", sparse_lr=0.5, dense_optimizer="adam", dense_lr=1e-2)
    batch = tiny_batch(schema, BATCH, seed=env.rank)  # the same local batch every step: training must move the loss
    out = {}
    for name, overrides in variants:
        torch.manual_seed(0)
        model = MTLTrainModule(build_model(schema, dataclasses.replace(base, name=name, **overrides), "meta"),
                               MultiTaskLoss(schema.tasks))
        num_ebcs = sum(isinstance(m, EmbeddingBagCollection) for m in model.modules())
        dmp, plan = shard_model(model, ShardingConfig(sharding_type="row_wise"), optim, device=env.device,
                                world_size=env.world_size, local_world_size=env.world_size, batch_size=BATCH)
        pipeline = TrainPipelineSparseDist(dmp, make_optimizer(dmp, optim), env.device)
        it = iter([batch] * STEPS)
        losses = []
        for _ in range(STEPS):
            local = pipeline.progress(it)[0].detach().reshape(())
            gathered = [torch.zeros(()) for _ in range(env.world_size)]
            dist.all_gather(gathered, local)
            losses.append(float(torch.stack(gathered).mean()))
        kinds = sorted({ps.sharding_type for m in plan.plan.values() for ps in m.values()})
        out[f"{name}{overrides or ''}"] = {"losses": losses, "num_ebcs": num_ebcs,
                                           "pipelined": len(pipeline._pipelined_modules), "plan_types": kinds}
    return out


@pytest.mark.multirank
def test_every_model_shards_and_trains_pipelined() -> None:
    from recsys_mtl.config import PAIR_MODELS
    from recsys_mtl.models import MODELS

    # (pair models: sharded and pipelined on interaction datasets in tests/data, tests/models)
    variants = [(name, {}) for name in MODELS if name not in PAIR_MODELS] + [("stem", {"stem_specific_fields": "none"})]
    results = run_ranks(_worker, 2, variants, timeout=600)
    assert results[0].keys() == results[1].keys() and len(results[0]) == len(variants)
    for key, r in results[0].items():
        assert r == results[1][key], key  # ranks agree on the (all-gathered) losses and the pipeline
        assert r["plan_types"] == ["row_wise"], (key, r)
        assert r["num_ebcs"] >= 1 and r["pipelined"] == r["num_ebcs"], (key, r)
        assert all(math.isfinite(x) for x in r["losses"]), (key, r)
        assert r["losses"][-1] < r["losses"][0] - 1e-4, (key, r)  # 2 updates on the same batches lowered it
